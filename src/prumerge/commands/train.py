"""`prumerge train`: train with visual-token reduction in the loop (CPU, resumable)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from prumerge.errors import PrumergeError


def register(subparsers) -> None:
    """Add the `train` parser."""
    from prumerge.train.config import TrainConfig
    from prumerge.train.lora import DEFAULT_TARGETS

    d = TrainConfig()
    p = subparsers.add_parser(
        "train",
        help="train the projector, prompt embeddings and LoRA with reduction in the loop",
        description=(
            "Fine-tune a LLaVA with visual-token reduction in the training loop. Without "
            "--model it trains the embedded default model (DINOv2-S + SmolLM2-135M) on "
            "easy-vqa and generated scenes and reports exact-match accuracy; with --model and "
            "--data it fine-tunes a Hugging Face LLaVA on LLaVA's instruction JSON. Re-running "
            "with the same --output-dir resumes from its last checkpoint. Data-parallel: "
            "torchrun --nproc-per-node N -m prumerge train ..."
        ),
    )
    p.add_argument("--recipe", help="run a named recipe (stages and all their options): default")
    p.add_argument("--output-dir", default=d.output_dir, help="run directory (checkpoints, logs)")
    p.add_argument("--model", help="HF LLaVA id or directory to fine-tune (default: embedded)")
    p.add_argument("--data", help="LLaVA instruction JSON (image + conversations), for --model")
    p.add_argument("--image-folder", help="where --data's image paths are (default: its folder)")
    p.add_argument(
        "--reduce",
        default=d.reduce,
        help="reductions drawn per step, method[@budget][:weight],... e.g. "
        "none:1,prumerge:2,prumerge+:1,visionzip@64:1 (default: none)",
    )
    p.add_argument(
        "--lora-rank", type=int, default=d.lora_rank, help="LoRA rank on the LLM (0: no LoRA)"
    )
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    p.add_argument(
        "--lora-targets",
        default=d.lora_targets,
        help=f"comma-separated LLM module names to adapt (default: {','.join(DEFAULT_TARGETS)})",
    )
    p.add_argument("--lora-lr", type=float, default=d.lora_lr, help="peak LR of the adapters")
    p.add_argument("--init-lora", help="start from this LoRA adapter directory")
    p.add_argument(
        "--freeze-projector",
        action="store_true",
        help="do not train the projector (train LoRA and/or prompt embeddings only)",
    )
    p.add_argument("--resolution", type=int, default=d.resolution, help="square input size, px")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step")
    p.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="sequences per forward/backward within a step, to bound memory (same gradient; "
        "default: the whole step)",
    )
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of the projector")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="0: no clipping")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--train-images", type=int, default=None, help="use only the first N images")
    p.add_argument(
        "--eval-images",
        type=int,
        default=None,
        help="evaluate on the questions of the first N easy-vqa test images (default: all "
        "1,000; 0: none)",
    )
    p.add_argument(
        "--eval-scenes",
        type=int,
        default=d.eval_scenes,
        help="also evaluate on the first N generated test scenes (default: 0)",
    )
    p.add_argument(
        "--init-projector",
        default=None,
        help="start from these projector weights (.safetensors) instead of a fresh projector",
    )
    p.add_argument(
        "--eval-only",
        action="store_true",
        help="only evaluate a shipped variant, under each reduction of --reduce",
    )
    p.add_argument(
        "--variant", default="default", help="with --eval-only: the variant (default or base)"
    )
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
        default=None,
        help="isolated: each question sees the image and itself only (default model's "
        "default); chat: a multi-turn chat (--model's default)",
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
        "--minority-repeat",
        type=int,
        default=d.minority_repeat,
        metavar="N",
        help="repeat each easy-vqa yes/no question whose answer is its form's minority "
        "(plain 'yes', negated 'no') N times, weighting it N-fold in the loss without "
        "dropping any question (default: 1)",
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
        "--synth-questions",
        default=d.synth_questions,
        metavar="TYPES",
        help="train only on these question types of the generated scenes, comma-separated, "
        "e.g. color,shape (default: all)",
    )
    p.add_argument(
        "--prompt-tokens",
        type=int,
        default=d.prompt_tokens,
        help="learned prompt embeddings placed before the image (new vocabulary rows)",
    )
    p.add_argument("--prompt-lr", type=float, default=d.prompt_lr, help="their peak LR")
    p.add_argument(
        "--save-merged",
        action="store_true",
        help="with --model: also save the whole model with the adapter merged (merged/)",
    )
    p.add_argument(
        "--install",
        nargs="?",
        const="default",
        default=None,
        metavar="VARIANT",
        help="copy the result into the package as this default-model variant (default or "
        "base; with --recipe, every stage as its own variant)",
    )
    p.add_argument("--json", action="store_true", help="print the final report as JSON")
    p.set_defaults(func=run)


def _command() -> str:
    return "prumerge " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def run(args: argparse.Namespace) -> int:
    """Run a training, a recipe or (with --eval-only) an evaluation; returns an exit code."""
    from prumerge.train.config import TrainConfig

    if args.recipe is not None:
        from prumerge.train.recipe import run_recipe

        record = run_recipe(
            args.recipe, args.output_dir, install=args.install is not None, command=_command()
        )
        print(json.dumps(record if args.json else _recipe_summary(record), indent=2))
        return 0
    if args.eval_only:
        return _eval_only(args)
    packing = args.packing or ("isolated" if args.model is None else "chat")
    cfg = TrainConfig(
        output_dir=args.output_dir,
        model=args.model,
        data=args.data,
        image_folder=args.image_folder,
        resolution=args.resolution,
        seed=args.seed,
        batch_size=args.batch_size,
        micro_batch=args.micro_batch,
        steps=args.steps,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        train_images=args.train_images,
        eval_images=args.eval_images,
        eval_scenes=args.eval_scenes,
        train_dtype=args.train_dtype,
        init_projector=args.init_projector,
        init_lora=args.init_lora,
        time_budget_min=args.time_budget_min,
        packing=packing,
        instruction_rate=args.instruction_rate,
        balance_yes_no=args.balance_yes_no,
        minority_repeat=args.minority_repeat,
        synth_scenes=args.synth_scenes,
        synth_per_batch=args.synth_per_batch,
        synth_questions=args.synth_questions,
        prompt_tokens=args.prompt_tokens,
        prompt_lr=args.prompt_lr,
        reduce=args.reduce,
        train_projector=not args.freeze_projector,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_targets=args.lora_targets,
        lora_lr=args.lora_lr,
        save_merged=args.save_merged,
        install=args.install,
        command=_command(),
    )
    from prumerge.train.loop import train

    report = train(cfg)
    if report and report.get("eval"):
        summary = {
            bench: {label: r["accuracy"] for label, r in results.items()}
            for bench, results in report["eval"].items()
        }
        print(json.dumps(report if args.json else summary, indent=2))
    elif report and args.json:
        print(json.dumps(report, indent=2))
    return 0


def _recipe_summary(record: dict) -> dict:
    return {
        "stages": [
            {
                "name": s["name"],
                "train_min": round(s["train_wall_s"] / 60, 1),
                "eval": s["eval"]
                and {
                    bench: {label: r["accuracy"]["all"] for label, r in results.items()}
                    for bench, results in s["eval"].items()
                },
            }
            for s in record["stages"]
        ],
        "train_min_total": round(record.get("train_wall_s_total", 0) / 60, 1),
    }


def _eval_only(args: argparse.Namespace) -> int:
    from prumerge.models.default import VARIANTS, build_default_model
    from prumerge.train.evaluate import evaluate_easy_vqa, evaluate_synth
    from prumerge.train.mixture import parse_mixture

    if args.variant not in VARIANTS:
        raise PrumergeError(f"--variant must be one of: {', '.join(VARIANTS)}")
    if args.eval_images == 0 and args.eval_scenes == 0:
        raise PrumergeError("--eval-only needs --eval-images or --eval-scenes above 0")
    if args.eval_images is not None and args.eval_images < 0:
        raise PrumergeError("--eval-images must be >= 0")
    if args.eval_scenes < 0:
        raise PrumergeError("--eval-scenes must be >= 0")
    mixture = parse_mixture(args.reduce)
    model, processor = build_default_model(
        args.resolution, projector="shipped", variant=args.variant
    )
    results: dict = {}
    for entry in mixture:
        if args.eval_images != 0:
            results.setdefault("easy-vqa", {})[entry.label] = evaluate_easy_vqa(
                model, processor, args.eval_images, method=entry.method, options=entry.options()
            )
        if args.eval_scenes:
            results.setdefault("synth", {})[entry.label] = evaluate_synth(
                model, processor, args.eval_scenes, method=entry.method, options=entry.options()
            )
    print(json.dumps({"variant": args.variant, "results": results}, indent=2))
    return 0
