"""`prumerge train`: train the default model's projector on easy-vqa (CPU, resumable)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from prumerge.errors import PrumergeError


def register(subparsers) -> None:
    """Add the `train` parser."""
    from prumerge.models.train import TrainConfig

    d = TrainConfig()
    p = subparsers.add_parser(
        "train",
        help="train the default model's projector on easy-vqa",
        description=(
            "Train the LLaVA projector of the embedded default model (DINOv2-S + SmolLM2-135M) "
            "on easy-vqa with the vision tower and LLM frozen, then report exact-match "
            "accuracy on the test split. Re-running with the same --output-dir resumes from "
            "its last checkpoint."
        ),
    )
    p.add_argument("--output-dir", default=d.output_dir, help="run directory (checkpoints, logs)")
    p.add_argument("--resolution", type=int, default=d.resolution, help="square input size, px")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--train-images", type=int, default=None, help="use only the first N images")
    p.add_argument(
        "--eval-images",
        type=int,
        default=None,
        help="evaluate on the questions of the first N test images (default: all 1,000; "
        "0: train only, no evaluation)",
    )
    p.add_argument(
        "--init-projector",
        default=None,
        help="start from these projector weights (.safetensors) instead of a fresh projector",
    )
    p.add_argument("--eval-only", action="store_true", help="only evaluate the shipped projector")
    p.add_argument(
        "--train-dtype",
        choices=("float32", "bfloat16"),
        default=d.train_dtype,
        help="dtype of the frozen LLM during training",
    )
    p.add_argument(
        "--time-budget-min",
        type=float,
        default=None,
        help="stop training after this many minutes of steps (recorded in the report)",
    )
    p.add_argument(
        "--packing",
        choices=("isolated", "chat"),
        default=d.packing,
        help="isolated: each question sees the image and itself only (default); chat: a "
        "multi-turn chat in which later questions see earlier answers",
    )
    p.add_argument(
        "--instruction-rate",
        type=float,
        default=d.instruction_rate,
        help="fraction of questions given LLaVA's short-answer instruction (default: 0)",
    )
    p.add_argument(
        "--balance-yes-no",
        action="store_true",
        help="subsample easy-vqa's yes/no questions so that yes and no are equally frequent "
        "among plain and among negated questions",
    )
    p.add_argument(
        "--synth-scenes",
        type=int,
        default=d.synth_scenes,
        help="generated multi-object training scenes to mix in (default: none)",
    )
    p.add_argument(
        "--synth-per-batch",
        type=int,
        default=d.synth_per_batch,
        help="generated scenes per step, added to --batch-size easy-vqa images",
    )
    p.add_argument(
        "--prompt-tokens",
        type=int,
        default=d.prompt_tokens,
        help="learned prompt embeddings placed before the image and trained with the "
        "projector (new vocabulary rows; the LLM's weights stay frozen; default: none)",
    )
    p.add_argument(
        "--prompt-lr",
        type=float,
        default=d.prompt_lr,
        help="peak learning rate of the prompt embeddings",
    )
    p.add_argument(
        "--install",
        action="store_true",
        help="copy the final projector and report into the package's weights folder",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the training (or, with --eval-only, the evaluation); returns an exit code."""
    import json

    from prumerge.models.train import TrainConfig, evaluate_easy_vqa, train_projector

    for name in ("batch_size", "steps", "checkpoint_every", "log_every", "resolution"):
        if getattr(args, name) <= 0:
            raise PrumergeError(f"--{name.replace('_', '-')} must be positive")
    if args.train_images is not None and args.train_images <= 0:
        raise PrumergeError("--train-images must be positive")
    if args.eval_images is not None and args.eval_images < 0:
        raise PrumergeError("--eval-images must not be negative")
    if args.eval_only and args.eval_images == 0:
        raise PrumergeError("--eval-only needs at least one --eval-images")
    if args.lr <= 0:
        raise PrumergeError("--lr must be positive")
    if args.init_projector is not None and not os.path.isfile(args.init_projector):
        raise PrumergeError(f"--init-projector: no such file: {args.init_projector}")
    if args.eval_only:
        from prumerge.models.default import build_default_model

        model, processor = build_default_model(args.resolution, projector="shipped")
        result = evaluate_easy_vqa(model, processor, max_images=args.eval_images)
        print(json.dumps(result, indent=2))
        return 0
    cfg = TrainConfig(
        output_dir=args.output_dir,
        resolution=args.resolution,
        seed=args.seed,
        batch_size=args.batch_size,
        steps=args.steps,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        train_images=args.train_images,
        eval_images=args.eval_images,
        train_dtype=args.train_dtype,
        init_projector=args.init_projector,
        time_budget_min=args.time_budget_min,
        packing=args.packing,
        instruction_rate=args.instruction_rate,
        balance_yes_no=args.balance_yes_no,
        synth_scenes=args.synth_scenes,
        synth_per_batch=args.synth_per_batch,
        prompt_tokens=args.prompt_tokens,
        prompt_lr=args.prompt_lr,
        install=args.install,
        command="prumerge " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )
    report = train_projector(cfg)
    if report["eval"] is not None:
        print(json.dumps(report["eval"]["accuracy"], indent=2))
    return 0
