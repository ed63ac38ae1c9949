"""`prumerge bench`: measured speedups of visual-token reduction, beside the predicted ones.

Every configuration runs the same batches against the ``none`` baseline in one process,
round-robin, after warm-up rounds; the tables give medians with min-max spreads, speedups as
per-round paired ratios, and the cost model's prediction for the same prompt shapes. Input is
validated before the model loads, and bad input is one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prumerge.commands._args import (
    add_model_placement_args,
    check_model_placement,
    int_arg,
    load_args_model,
    question_arg,
    writable_file,
)
from prumerge.errors import PrumergeError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench",
        help="measure time to first token, decode speed and memory per method vs none",
        description="Time visual-token reduction methods against no reduction on one model: "
        "time to first token split into vision, reduction and LLM prefill, decode tokens/s, "
        "peak memory and end-to-end latency, with the cost model's predicted speedup for the "
        "same prompt shapes next to each measured one. Without --model it uses the embedded "
        "default model (DINOv2-S + SmolLM2-135M).",
    )
    parser.add_argument(
        "--methods",
        default="prumerge,prumerge+",
        help="comma-separated methods, each optionally with a budget: prumerge,pool@64 "
        "(default prumerge,prumerge+; none is always measured)",
    )
    parser.add_argument(
        "--keep",
        help="comma-separated budgets for methods given without one: counts (64), ratios of "
        "the patches (0.25) or adaptive (the method's default: adaptive for prumerge and "
        "prumerge+); default adaptive",
    )
    parser.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="method option for every listed method that takes it, e.g. merge=mean (repeatable)",
    )
    parser.add_argument(
        "--images", required=True, help="comma-separated image files (any format PIL reads)"
    )
    parser.add_argument("--question", default="Describe the image.", help="the prompt's question")
    parser.add_argument("--batch", default="1", help="images per generate call (default 1)")
    parser.add_argument("--repeats", default="3", help="timed rounds (default 3)")
    parser.add_argument("--warmup", default="1", help="untimed rounds first (default 1)")
    parser.add_argument(
        "--new-tokens", default="16", help="tokens generated per answer, exactly (default 16)"
    )
    parser.add_argument(
        "--model",
        help="HF LLaVA model id or local directory, or default:base for the embedded model "
        "trained without reduction (default: the embedded model)",
    )
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda or cuda:N (default: the GPU if any, else cpu)"
    )
    add_model_placement_args(parser)
    parser.add_argument(
        "--threads", help="torch CPU threads (default: torch's); 1 is steadier on a busy machine"
    )
    parser.add_argument("--cache-dir", help="cache of the built default model")
    parser.add_argument(
        "--hardware",
        default="auto",
        help="cost-model hardware preset (see `prumerge cost`), or custom with --bandwidth and "
        "--peak-fp16; default auto: the CUDA device's preset if known, else v100",
    )
    parser.add_argument("--bandwidth", help="custom hardware: memory bandwidth in bytes/s")
    parser.add_argument("--peak-fp16", help="custom hardware: peak FP16 ops/s")
    parser.add_argument("--plot", metavar="PNG", help="write a plot of the results")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)


def _positive(value: str | None, flag: str) -> float:
    if value is None:
        raise PrumergeError(f"--hardware custom needs {flag}")
    try:
        number = float(value)
    except ValueError:
        raise PrumergeError(f"{flag} must be a number, got {value!r}") from None
    if not 0 < number < float("inf"):
        raise PrumergeError(f"{flag} must be a positive finite number, got {value!r}")
    return number


def _hardware(args: argparse.Namespace, device: Any) -> Any:
    from prumerge.bench import hardware_for
    from prumerge.cost import custom_hardware

    if args.hardware.strip().lower() == "custom":
        return custom_hardware(
            _positive(args.bandwidth, "--bandwidth"), _positive(args.peak_fp16, "--peak-fp16")
        )
    if args.bandwidth is not None or args.peak_fp16 is not None:
        raise PrumergeError("--bandwidth and --peak-fp16 need --hardware custom")
    return hardware_for(args.hardware, device)


def run(args: argparse.Namespace) -> int:
    import torch

    from prumerge.bench import (
        decoder_spec,
        format_report,
        make_batches,
        measure,
        model_attention,
        model_precision,
        parse_configs,
        predict,
        save_plot,
        summarise,
        to_json,
    )
    from prumerge.generation import check_prompt_length
    from prumerge.images import load_image
    from prumerge.loading import resolve_device
    from prumerge.methods.spec import parse_options

    configs = parse_configs(args.methods, args.keep, parse_options(args.option))
    batch = int_arg(args.batch, "--batch", 1)
    repeats = int_arg(args.repeats, "--repeats", 1)
    warmup = int_arg(args.warmup, "--warmup", 0)
    new_tokens = int_arg(args.new_tokens, "--new-tokens", 1)
    threads = None if args.threads is None else int_arg(args.threads, "--threads", 1)
    question = question_arg(args.question, "--question")
    paths = [p.strip() for p in args.images.split(",")]
    if not args.images.strip() or any(not p for p in paths):
        raise PrumergeError(f"--images must be comma-separated image files, got {args.images!r}")
    if args.plot:
        writable_file(args.plot, "--plot", kind="plot")
    images = [load_image(p) for p in paths]
    device = resolve_device(args.device)
    check_model_placement(args, device)
    hardware = _hardware(args, torch.device(device))

    if threads is not None:
        torch.set_num_threads(threads)
    model, processor, prompt_fn = load_args_model(args, device, [c.build() for c in configs])
    name = args.model or "default model (DINOv2-S/14 + SmolLM2-135M)"
    batches = make_batches(model, processor, prompt_fn(question), images, paths, batch)
    check_prompt_length(model, batches[0].inputs["input_ids"], new_tokens)

    def progress(message: str) -> None:
        if not args.json:
            print(f"bench: {message}", file=sys.stderr, flush=True)

    samples, observed, memory_kind = measure(
        model,
        processor,
        batches,
        configs,
        repeats=repeats,
        warmup=warmup,
        new_tokens=new_tokens,
        progress=progress,
    )
    spec = decoder_spec(model, args.model or "smollm2-135m (default model)")
    precision = model_precision(model)
    attention = model_attention(model)
    predictions = {
        c.label: predict(
            spec, hardware, precision, attention, batches, observed[c.label], new_tokens
        )
        for c in configs
    }
    report: dict[str, Any] = {
        "setup": {
            "model": name,
            "device": str(device),
            "dtype": str(model.dtype).removeprefix("torch."),
            "torch_threads": torch.get_num_threads(),
            "images": len(images),
            "image_files": paths,
            "question": question,
            "batch": batch,
            "batches": len(batches),
            "repeats": repeats,
            "warmup": warmup,
            "new_tokens": new_tokens,
        },
        "cost_model": {
            "decoder": spec.to_dict(),
            "hardware": hardware.to_dict(),
            "precision": precision.w_bits,
            "attention": attention,
        },
        "memory": memory_kind,
        "results": summarise(configs, samples, observed, predictions),
    }
    # The table is printed before the plot is drawn (with --json, the JSON says whether it
    # was): a plot that cannot be written does not lose the measurements.
    error = None
    if args.plot and args.json:
        error = _save_plot(report, args.plot, save_plot)
    if args.json:
        print(to_json(report))
    else:
        print(format_report(report))
        if args.plot:
            error = _save_plot(report, args.plot, save_plot)
            if error is None:
                print(f"plot: {args.plot}")
    if error is not None:
        raise PrumergeError(error)
    return 0


def _save_plot(report: dict[str, Any], path: str, save_plot: Any) -> str | None:
    """Draw the plot into ``path`` (recorded in ``report``); on failure remove any partial
    file and say why."""
    try:
        report["plot"] = str(save_plot(report, path))
    except (OSError, ValueError, PrumergeError) as exc:
        Path(path).unlink(missing_ok=True)
        report["plot"] = None
        return str(exc) if isinstance(exc, PrumergeError) else f"cannot write {path}: {exc}"
    return None
