"""Named recipes: the stages that rebuild the shipped weights from scratch, in one command.

``prumerge train --recipe default --output-dir runs/recipe`` runs each stage in its own
sub-directory (``runs/recipe/base-1`` ... ``runs/recipe/default``), each starting from the
weights its ``init_from`` stage wrote. Every stage checkpoints and resumes, and a finished stage
is not run again, so re-running the command after an interruption continues where it stopped.
``recipe.json`` records every stage's configuration, wall time and evaluation; with
``--install`` the stages named after a variant (``base``, ``default``) become the package's
variants, and the recipe record is stored with them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prumerge.errors import PrumergeError
from prumerge.train.config import TrainConfig

__all__ = ["RECIPES", "Stage", "run_recipe"]


@dataclass(frozen=True)
class Stage:
    """One run of a recipe.

    Attributes:
        name: the stage, its sub-directory and the variant it installs as.
        options: ``TrainConfig`` fields.
        init_from: a previous stage whose projector, prompt embeddings and LoRA it continues.
    """

    name: str
    options: dict[str, Any]
    init_from: str | None = None
    notes: str = ""
    eval: dict[str, Any] = field(default_factory=dict)


# The base variant: four projector-only stages (the LLM frozen, no reduction), the commands
# that produced the shipped ``base`` weights (recorded in models/weights/base/projector-224.json;
# they ran before the recipe existed, one command each). Stage 1 packs each image's questions
# as one multi-turn chat; stage 2 adds one generated scene per step and LLaVA's short-answer
# instruction on half the questions; stage 3 learns 16 prompt embeddings on yes/no questions
# balanced per (plain/negated, answer) cell; stage 4 returns to easy-vqa's own distribution.
_BASE: dict[str, Any] = {
    "seed": 0,
    "batch_size": 4,
    "train_dtype": "bfloat16",
    "checkpoint_every": 20,
    "log_every": 10,
    "eval_images": 0,
    "reduce": "none",
}

# The four reduction stages of the default variant share these: per step 3 easy-vqa training
# images and 3 of 8,000 generated training scenes, 16 prompt embeddings, rank-16 LoRA.
_REDUCE: dict[str, Any] = {
    "batch_size": 3,
    "micro_batch": 3,  # one forward/backward per 3 sequences: bounded activations
    "synth_scenes": 8000,
    "synth_per_batch": 3,
    "instruction_rate": 0.5,
    "prompt_tokens": 16,
    "lora_rank": 16,
    "lora_lr": 2e-4,
    "train_dtype": "bfloat16",
    "log_every": 10,
    "eval_images": 0,
    "steps": 300,
}

# The shipped default variant was trained when "prumerge+" meant today's prumerge+ with
# spatial="grid" and "visionzip@64" today's visionzip with contextual_merge="mean",
# metric="keys", cls_token=False (issue 24 made the defaults the released code's). Mixture
# entries cannot carry options yet, so these stages now train with the new defaults; see
# docs/training.md.
# The last three stages (reduce-2, reduce-3, default) differ only in seed and length.
_FOCUS: dict[str, Any] = {
    **_REDUCE,
    "minority_repeat": 3,
    "prompt_lr": 2e-3,
    "checkpoint_every": 10,
    "lr": 2e-4,
    "warmup_steps": 10,
    "reduce": "none:1,prumerge:3,prumerge+:1,visionzip@64:1",
}

RECIPES: dict[str, list[Stage]] = {
    "default": [
        Stage(
            "base-1",
            {**_BASE, "packing": "chat", "steps": 600, "lr": 1e-3, "warmup_steps": 10},
            notes="projector only, easy-vqa, chat packing",
        ),
        Stage(
            "base-2",
            {
                **_BASE,
                "synth_scenes": 2000,
                "synth_per_batch": 1,
                "instruction_rate": 0.5,
                "steps": 700,
                "lr": 1e-3,
                "warmup_steps": 20,
            },
            init_from="base-1",
            notes="projector only, isolated turns, one generated scene per step",
        ),
        Stage(
            "base-3",
            {
                **_BASE,
                "balance_yes_no": True,
                "instruction_rate": 0.5,
                "prompt_tokens": 16,
                "prompt_lr": 1e-2,
                "steps": 450,
                "lr": 3e-4,
                "warmup_steps": 20,
            },
            init_from="base-2",
            notes="16 prompt embeddings, balanced yes/no",
        ),
        Stage(
            "base",
            {
                **_BASE,
                "instruction_rate": 0.5,
                "prompt_tokens": 16,
                "prompt_lr": 3e-3,
                "steps": 100,
                "lr": 1e-4,
                "warmup_steps": 10,
                "eval_images": 200,
            },
            init_from="base-3",
            notes="easy-vqa's own yes/no distribution, lower rate: the base variant, the "
            "reference for training-free reduction",
        ),
        # The default variant, in four stages: the base continued with reduction in the loop
        # and LoRA (rank 16, every linear layer of SmolLM2). Per step 3 easy-vqa training
        # images and 3 of 8,000 generated training scenes; each step draws one reduction from
        # the mixture.
        Stage(
            "reduce-1",
            {
                **_REDUCE,
                "seed": 1,
                "prompt_lr": 3e-3,
                "checkpoint_every": 20,
                "lr": 3e-4,
                "warmup_steps": 20,
                "reduce": "none:1,prumerge:2,prumerge+:1,visionzip@64:1",
            },
            init_from="base",
            notes="the base continued with reduction in the loop and LoRA",
        ),
        # Adaptive PruMerge drawn half the time, and easy-vqa's minority yes/no answers
        # (plain "yes", negated "no") weighted 3-fold: at ~29 tokens the first stage still
        # answered those from the wording. The last two stages are the same again, shorter,
        # each with another seed.
        Stage(
            "reduce-2",
            {**_FOCUS, "seed": 3},
            init_from="reduce-1",
            notes="more adaptive PruMerge, minority yes/no answers weighted",
        ),
        Stage(
            "reduce-3",
            {**_FOCUS, "seed": 4, "steps": 240},
            init_from="reduce-2",
            notes="reduce-2 continued with another seed",
        ),
        Stage(
            "default",
            {**_FOCUS, "seed": 5, "steps": 150},
            init_from="reduce-3",
            notes="reduce-3 continued with another seed: the default variant",
        ),
    ],
}


def stage_config(
    stage: Stage, root: Path, install: bool, command: str, stages: Sequence[Stage] = ()
) -> TrainConfig:
    """The training configuration of ``stage``; ``stages`` are the recipe's (for init_from)."""
    from prumerge.models.default import VARIANTS

    options = dict(stage.options)
    if stage.init_from is not None:
        source = root / stage.init_from
        options["init_projector"] = str(source / "projector-224.safetensors")
        parent = next((s for s in stages if s.name == stage.init_from), None)
        if parent is not None and parent.options.get("lora_rank"):
            options["init_lora"] = str(source / "lora")
    return TrainConfig(
        output_dir=str(root / stage.name),
        install=stage.name if install and stage.name in VARIANTS else None,
        command=f"{command}  # stage {stage.name}",
        **options,
    )


def run_recipe(
    name: str, output_dir: str, *, install: bool = False, command: str = ""
) -> dict[str, Any]:
    """Run every stage of a recipe in order (resuming any that did not finish)."""
    from prumerge.train.loop import train
    from prumerge.train.rundir import atomic_write_json

    if name not in RECIPES:
        raise PrumergeError(f"unknown recipe {name!r}; available: {', '.join(sorted(RECIPES))}")
    root = Path(output_dir)
    if root.exists() and not root.is_dir():
        raise PrumergeError(f"--output-dir {root} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    record_path = root / "recipe.json"
    record: dict[str, Any] = {"recipe": name, "command": command, "stages": []}
    for stage in RECIPES[name]:
        cfg = stage_config(stage, root, install, command, RECIPES[name])
        report_path = Path(cfg.output_dir) / "report.json"
        if report_path.is_file():
            report = json.loads(report_path.read_text())
            print(
                f"stage {stage.name}: finished earlier ({report['steps_done']} steps)", flush=True
            )
            if cfg.install:  # stages named after a variant only
                from prumerge.train.install import install_variant

                install_variant(cfg.output_dir, stage.name, cfg.resolution)
        else:
            print(f"stage {stage.name}: {stage.notes}", flush=True)
            start = time.time()
            report = train(cfg)
            report["stage_wall_s"] = round(time.time() - start, 1)
        record["stages"].append(
            {
                "name": stage.name,
                "notes": stage.notes,
                "init_from": stage.init_from,
                "config": dataclasses.asdict(cfg),
                "steps_done": report["steps_done"],
                "train_wall_s": report["train_wall_s"],
                "eval_wall_s": report["eval_wall_s"],
                "run_wall_s": report.get("run_wall_s"),
                "eval": report["eval"],
            }
        )
        atomic_write_json(record, record_path)
    record["train_wall_s_total"] = round(sum(s["train_wall_s"] for s in record["stages"]), 1)
    record["run_wall_s_total"] = round(sum(s["run_wall_s"] or 0 for s in record["stages"]), 1)
    atomic_write_json(record, record_path)
    if install:
        from prumerge.models.default import WEIGHTS_DIR

        atomic_write_json(record, WEIGHTS_DIR / "recipe.json")
    return record
