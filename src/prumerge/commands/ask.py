"""`prumerge ask IMAGE QUESTION`: answer with fewer visual tokens, and show which were kept."""

from __future__ import annotations

import argparse
import json
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
        "ask",
        help="answer a question about an image with reduced visual tokens",
        description="Answer a question about an image on a LLaVA model with visual-token "
        "reduction. Without --model it uses the embedded default model (DINOv2-S + "
        "SmolLM2-135M), built into a local cache on first use.",
    )
    parser.add_argument("image", help="image file (any format PIL reads)")
    parser.add_argument("question", help="the question, in quotes")
    parser.add_argument(
        "--model",
        help="HF LLaVA model id or local directory, or default:base for the embedded model "
        "trained without reduction (default: the embedded model)",
    )
    parser.add_argument(
        "--method", default="prumerge", help="reduction method (see `prumerge methods`)"
    )
    parser.add_argument(
        "--keep", help="token budget: a count (64) or a ratio of the patches (0.25)"
    )
    parser.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="method option, e.g. merge=mean (repeatable)",
    )
    parser.add_argument("--max-new-tokens", default="16", help="tokens to generate at most")
    parser.add_argument(
        "--compare", action="store_true", help="also run without reduction and print speedups"
    )
    parser.add_argument(
        "--repeats", help="timed runs after a warm-up (default 1, or 3 with --compare)"
    )
    parser.add_argument(
        "--show", metavar="PNG", help="write a picture of the kept and merged patches"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda or cuda:N (default: the GPU if any, else cpu)"
    )
    add_model_placement_args(parser)
    parser.add_argument("--cache-dir", help="cache of the built default model")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import prumerge
    from prumerge.generation import check_prompt_length, generate_answers, prepare_inputs
    from prumerge.images import load_image
    from prumerge.loading import resolve_device
    from prumerge.methods.spec import MethodSpec, parse_options, parse_spec

    # Everything the user gave is checked before the model loads.
    question = question_arg(args.question)
    max_new_tokens = int_arg(args.max_new_tokens, "--max-new-tokens", 1)
    repeats = int_arg(args.repeats, "--repeats", 1) if args.repeats is not None else None
    spec = parse_spec(args.method, parse_options(args.option), keep=args.keep)
    method = spec.build()
    if args.show:
        writable_file(args.show, "--show", kind="image")
    device = resolve_device(args.device)
    check_model_placement(args, device)
    image = load_image(args.image)

    model, processor, prompt = load_args_model(args, device, [method])
    repeats = repeats or (3 if args.compare else 1)
    text = prompt(question)
    check_prompt_length(
        model, prepare_inputs(model, processor, [image], [text])["input_ids"], max_new_tokens
    )

    results: dict[str, Any] = {}
    runs = [("none", MethodSpec("none").build())] if args.compare and spec.method != "none" else []
    runs.append((spec.method, method))
    for name, instance in runs:
        with prumerge.apply(model, instance, processor=processor) as handle:
            answer = generate_answers(
                model,
                processor,
                handle,
                [image],
                [text],
                max_new_tokens=max_new_tokens,
                repeats=repeats,
            )
            reduction = handle.last_reduction
        results[name] = answer
    main = results[spec.method]

    report: dict[str, Any] = {
        "answer": main.texts[0],
        "method": spec.method,
        "options": method.options(),
        "visual_tokens_in": main.tokens_in[0],
        "visual_tokens_out": main.tokens_out[0],
        "seconds": {
            "vision": main.timing.vision,
            "prefill": main.timing.prefill,
            "generate": main.timing.generate,
            "total": main.timing.total,
        },
        "new_tokens": main.timing.new_tokens,
        "repeats": repeats,
        "picture": None,
    }
    if "none" in results and spec.method != "none":
        base = results["none"].timing
        report["baseline"] = {
            "answer": results["none"].texts[0],
            "seconds": {
                "vision": base.vision,
                "prefill": base.prefill,
                "generate": base.generate,
                "total": base.total,
            },
        }
        report["speedup"] = {
            "prefill": base.prefill / max(main.timing.prefill, 1e-9),
            "total": base.total / max(main.timing.total, 1e-9),
        }
    # The answer is printed before the picture is written (with --json, the JSON says whether
    # it was): a picture that cannot be written does not lose the answer.
    error = None
    if args.show and args.json:
        error = _save_picture(args.show, image, reduction, main.tokens_in[0])
        report["picture"] = None if error else args.show
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report, spec.method, repeats)
        if args.show:
            error = _save_picture(args.show, image, reduction, main.tokens_in[0])
            if error is None:
                print(f"picture: {args.show}")
    if error is not None:
        raise PrumergeError(error)
    return 0


def _save_picture(path: str, image: Any, reduction: Any, tokens_in: int) -> str | None:
    """Write the kept-token picture; on failure remove any partial file and say why."""
    from pathlib import Path

    from prumerge.viz import save_reduction_picture

    side = int(round(tokens_in**0.5))
    try:
        save_reduction_picture(
            image, reduction.index[0], reduction.assignment[0], (side, tokens_in // side), path
        )
    except (OSError, ValueError, KeyError) as exc:
        Path(path).unlink(missing_ok=True)
        return f"cannot write {path}: {exc}"
    return None


def _print_report(report: dict[str, Any], method: str, repeats: int) -> None:
    seconds = report["seconds"]
    print(f"answer: {report['answer']}")
    print(
        f"visual tokens: {report['visual_tokens_in']} -> {report['visual_tokens_out']} ({method})"
    )
    print(
        f"time: vision {seconds['vision']:.3f} s, prefill {seconds['prefill']:.3f} s, "
        f"generation {seconds['generate']:.3f} s ({report['new_tokens']} new tokens)"
        + (f", median of {repeats}" if repeats > 1 else "")
    )
    if "speedup" in report:
        base = report["baseline"]
        print(
            f"without reduction: answer {base['answer']!r}, prefill {base['seconds']['prefill']:.3f} s, "
            f"total {base['seconds']['total']:.3f} s; speedup: prefill {report['speedup']['prefill']:.2f}x, "
            f"total {report['speedup']['total']:.2f}x"
        )
