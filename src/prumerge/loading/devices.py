"""Devices, dtypes and device maps, as ``--device``, ``--dtype`` and ``--device-map`` name them."""

from __future__ import annotations

import json
from typing import Any

import torch

from prumerge.errors import PrumergeError

#: ``--dtype`` values, by the names users write.
DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",  # the checkpoint's own dtype
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

#: ``--device-map`` strategies accelerate knows, besides a device name or a JSON object.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_device(text: str | None, *, flag: str = "--device", local_rank: int = 0) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto``/None (this process's GPU if any, else CPU).

    Raises:
        PrumergeError: an unknown device, CUDA asked for where there is none, or a GPU
            index this machine does not have.
    """
    if text is None or text.strip().lower() in ("", "auto"):
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    text = text.strip()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise PrumergeError(f"{flag}: unknown device {text!r}; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise PrumergeError(f"{flag} {text!r} is not supported; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PrumergeError(f"{flag} {text}: CUDA is not available here")
        if device.index is None:
            return f"cuda:{local_rank}"
        if device.index >= torch.cuda.device_count():
            raise PrumergeError(
                f"{flag} {text}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return str(device)


def resolve_dtype(name: str | torch.dtype | None, device: str) -> torch.dtype | str:
    """The dtype to load with: a name from ``DTYPES``, or the default for ``device``.

    The default is float32 on the CPU and, on CUDA, bfloat16 where the GPU supports it, else
    float16: a 7B model then loads in about 14 GB instead of 28.

    Raises:
        PrumergeError: an unknown name.
    """
    if isinstance(name, torch.dtype):
        return name
    if name is None:
        if str(device).startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    key = str(name).strip().lower().removeprefix("torch.")
    if key not in DTYPES:
        raise PrumergeError(
            f"--dtype: unknown dtype {name!r}; use float32, float16, bfloat16 or auto"
        )
    return DTYPES[key]


def parse_device_map(text: str | dict | None) -> str | dict[str, Any] | None:
    """``--device-map``: accelerate's strategies (auto, balanced, balanced_low_0, sequential),
    one device (cpu, cuda:1) or a JSON object from module names to devices.

    Raises:
        PrumergeError: anything else, or a device that is not there.
    """
    if text is None or isinstance(text, dict):
        return text
    value = text.strip()
    if value in DEVICE_MAP_STRATEGIES:
        return value
    if value.startswith("{"):
        try:
            mapping = json.loads(value)
        except json.JSONDecodeError as exc:
            raise PrumergeError(f"--device-map: not a JSON object ({exc.msg})") from None
        if not isinstance(mapping, dict) or not mapping:
            raise PrumergeError("--device-map: the JSON must map module names to devices")
        for device in mapping.values():
            if isinstance(device, str):
                if device not in ("cpu", "disk"):
                    resolve_device(device, flag="--device-map")
            elif not isinstance(device, int) or isinstance(device, bool) or device < 0:
                raise PrumergeError(f"--device-map: {device!r} is not a device")
            else:  # accelerate reads a number as a GPU's index
                resolve_device(f"cuda:{device}", flag="--device-map")
        return mapping
    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        raise PrumergeError(
            f"--device-map: {value!r} is not {', '.join(DEVICE_MAP_STRATEGIES)}, a device or "
            "a JSON object"
        ) from None
    return resolve_device(value, flag="--device-map")


def model_device(model: Any) -> torch.device:
    """Where a model's inputs go: its input embeddings' device (the first of a device map)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return model.device


def _map_device(device_map: str | dict[str, Any]) -> str:
    """The device a device map mostly puts weights on, for choosing the default dtype."""
    if isinstance(device_map, dict):
        devices = [str(d) for d in device_map.values()]
        gpu = [d for d in devices if d not in ("cpu", "disk")]
        return "cuda" if gpu else "cpu"
    if device_map in DEVICE_MAP_STRATEGIES:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device_map
