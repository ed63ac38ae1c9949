"""`prumerge ask IMAGE QUESTION`: answer with fewer visual tokens, and show which were kept."""

from __future__ import annotations

import argparse
import json
from typing import Any

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
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument(
        "--compare", action="store_true", help="also run without reduction and print speedups"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs after a warm-up (default 1, or 3 with --compare)",
    )
    parser.add_argument(
        "--show", metavar="PNG", help="write a picture of the kept and merged patches"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", help="cache of the built default model")
    parser.set_defaults(func=run)


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    from prumerge.runtime import parse_keep, parse_options

    options = parse_options(args.option)
    if args.keep is not None:
        try:
            options["keep"] = parse_keep(args.keep)
        except ValueError as exc:
            raise PrumergeError(f"--keep: {exc}") from None
    return options


def run(args: argparse.Namespace) -> int:
    import prumerge
    from prumerge.images import load_image
    from prumerge.methods import build_method
    from prumerge.runtime import generate_answers, load_model

    question = args.question.strip()
    if not question:
        raise PrumergeError("the question is empty")
    if args.max_new_tokens < 1:
        raise PrumergeError("--max-new-tokens must be at least 1")
    options = _method_options(args)
    try:
        method = build_method(args.method, **options)
    except (ValueError, TypeError) as exc:
        raise PrumergeError(str(exc)) from None
    image = load_image(args.image)
    model, processor, prompt = load_model(args.model, device=args.device, cache_dir=args.cache_dir)
    repeats = args.repeats or (3 if args.compare else 1)
    text = prompt(question)

    results: dict[str, Any] = {}
    runs = [("none", build_method("none"))] if args.compare and args.method != "none" else []
    runs.append((args.method, method))
    for name, instance in runs:
        with prumerge.apply(model, instance) as handle:
            answer = generate_answers(
                model,
                processor,
                handle,
                [image],
                [text],
                max_new_tokens=args.max_new_tokens,
                repeats=repeats,
            )
            reduction = handle.last_reduction
        results[name] = answer
    main = results[args.method]

    picture = None
    if args.show:
        from prumerge.viz import save_reduction_picture

        assert reduction is not None
        side = int(round(main.tokens_in[0] ** 0.5))
        rows, cols = side, main.tokens_in[0] // side
        try:
            picture = str(
                save_reduction_picture(
                    image, reduction.index[0], reduction.assignment[0], (rows, cols), args.show
                )
            )
        except OSError as exc:
            raise PrumergeError(f"cannot write {args.show}: {exc}") from None

    report: dict[str, Any] = {
        "answer": main.texts[0],
        "method": args.method,
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
        "picture": picture,
    }
    if "none" in results and args.method != "none":
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
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    seconds = report["seconds"]
    print(f"answer: {report['answer']}")
    print(
        f"visual tokens: {report['visual_tokens_in']} -> {report['visual_tokens_out']} ({args.method})"
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
    if picture:
        print(f"picture: {picture}")
    return 0
