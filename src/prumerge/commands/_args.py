"""Argument checks shared by the command modules: one-line errors for bad values."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from prumerge.errors import PrumergeError


def int_arg(value: str, flag: str, minimum: int) -> int:
    """An integer option value of at least ``minimum``, or a ``PrumergeError`` naming ``flag``."""
    try:
        number = int(str(value).strip())
    except ValueError:
        raise PrumergeError(f"{flag} must be an integer, got {value!r}") from None
    if number < minimum:
        raise PrumergeError(f"{flag} must be at least {minimum}, got {number}")
    return number


def question_arg(value: str, flag: str = "the question") -> str:
    """The question, checked by ``prumerge.questions.check_question``."""
    from prumerge.questions import check_question

    return check_question(value, flag)


def add_model_placement_args(parser: argparse.ArgumentParser) -> None:
    """``--dtype`` and ``--device-map``, given to ``from_pretrained`` by ``load_model``."""
    parser.add_argument(
        "--dtype",
        help="weights' dtype: float32, float16, bfloat16 or auto (the checkpoint's own); "
        "default: float32 on the CPU, bfloat16 (float16 where unsupported) on CUDA",
    )
    parser.add_argument(
        "--device-map",
        metavar="MAP",
        help="accelerate device map instead of --device: auto, balanced, sequential, a device, "
        "or a JSON object of module -> device (spreads a large model over several GPUs)",
    )


def check_model_placement(args: argparse.Namespace, device: str | None) -> None:
    """Check ``--dtype`` and ``--device-map`` before any model loads."""
    from prumerge.loading import parse_device_map, resolve_dtype

    resolve_dtype(args.dtype, device or "cpu")
    if args.device_map is not None:
        if str(getattr(args, "device", "auto") or "auto").lower() != "auto":
            raise PrumergeError("give --device or --device-map, not both")
        parse_device_map(args.device_map)


def load_args_model(args: argparse.Namespace, device: str | None, methods: list[Any]) -> Any:
    """``load_model`` with the command's ``--model``, ``--cache-dir``, ``--dtype`` and
    ``--device-map``; a method of ``methods`` the checkpoint's family cannot run is refused
    before any weights load."""
    from prumerge.loading import load_model

    return load_model(
        args.model,
        device=device,
        cache_dir=args.cache_dir,
        dtype=args.dtype,
        device_map=args.device_map,
        methods=methods,
    )


def writable_file(path: str, flag: str, *, kind: str = "image") -> Path:
    """Check, before any work, that ``path`` can be written as an image or a plot.

    The suffix must name a format PIL (``kind="image"``) or matplotlib (``kind="plot"``)
    writes, the path must not be a folder, and its folder must exist and be writable.
    """
    target = Path(path).expanduser()
    if target.is_dir() or path.endswith(("/", os.sep)):
        raise PrumergeError(f"{flag} {path}: is a folder; give a file name such as kept.png")
    suffix = target.suffix.lower()
    formats = _plot_formats() if kind == "plot" else _image_formats()
    if suffix not in formats:
        shown = ".png, .pdf, .svg" if kind == "plot" else ".png, .jpg, .webp"
        raise PrumergeError(
            f"{flag} {path}: the name must end in the suffix of {'a plot' if kind == 'plot' else 'an image'} format ({shown}, ...)"
        )
    folder = target.resolve().parent
    if not folder.is_dir():
        raise PrumergeError(f"{flag} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (
        target.exists() and not os.access(target, os.W_OK)
    ):
        raise PrumergeError(f"{flag} {path}: cannot write there (permission denied)")
    return target


def _image_formats() -> set[str]:
    from PIL import Image

    Image.init()
    # These formats save only through handlers that an application must install first.
    needs_handler = {"BUFR", "GRIB", "HDF5", "WMF"}
    return {
        ext
        for ext, fmt in Image.registered_extensions().items()
        if fmt in Image.SAVE and fmt not in needs_handler
    }


def _plot_formats() -> set[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return {f".{ext}" for ext in FigureCanvasAgg.get_supported_filetypes()}
