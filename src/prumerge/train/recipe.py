"""Named recipes: the stages that rebuild the shipped weights from scratch, in one command.

``prumerge train --recipe default --output-dir runs/recipe`` runs each stage in its own
sub-directory (``runs/recipe/base``, ``runs/recipe/default``). Every stage checkpoints and
resumes, and a finished stage is not run again, so re-running the command after an
interruption continues where it stopped. ``recipe.json`` records every stage's configuration,
wall time and evaluation; with ``--install`` each stage's weights become the package's
variant of the same name, and the recipe record is stored with them.
"""

from __future__ import annotations

import dataclasses
import json
import time
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


# Shared by both stages: the data (per step 3 of easy-vqa's 4,000 training images and 3 of
# 8,000 generated training scenes, half the questions with the short-answer instruction), the
# trainable parts (the projector, 16 prompt embeddings and rank-16 LoRA on every linear layer of
# the LLM) and the bfloat16 LLM of training. Each stage has its own seed, so the second one
# draws other scenes first.
_COMMON: dict[str, Any] = {
    "batch_size": 3,
    "synth_scenes": 8000,
    "synth_per_batch": 3,
    "instruction_rate": 0.5,
    "prompt_tokens": 16,
    "lora_rank": 16,
    "train_dtype": "bfloat16",
    "checkpoint_every": 20,
    "log_every": 10,
    "eval_images": 200,
    "eval_scenes": 100,
}

RECIPES: dict[str, list[Stage]] = {
    "default": [
        Stage(
            "base",
            {
                **_COMMON,
                "seed": 0,
                "steps": 900,
                "lr": 1e-3,
                "prompt_lr": 1e-2,
                "lora_lr": 3e-4,
                "warmup_steps": 30,
                "reduce": "none",
            },
            notes="all visual tokens: the reference for training-free reduction",
        ),
        Stage(
            "default",
            {
                **_COMMON,
                "seed": 1,
                "steps": 700,
                "lr": 3e-4,
                "prompt_lr": 3e-3,
                "lora_lr": 2e-4,
                "warmup_steps": 20,
                "reduce": "none:1,prumerge:2,prumerge+:1,visionzip@64:1",
            },
            init_from="base",
            notes="continues base with reduction in the loop",
        ),
    ],
}


def stage_config(stage: Stage, root: Path, install: bool, command: str) -> TrainConfig:
    options = dict(stage.options)
    if stage.init_from is not None:
        source = root / stage.init_from
        options["init_projector"] = str(source / "projector-224.safetensors")
        if options.get("lora_rank"):
            options["init_lora"] = str(source / "lora")
    return TrainConfig(
        output_dir=str(root / stage.name),
        install=stage.name if install else None,
        command=f"{command}  # stage {stage.name}",
        **options,
    )


def run_recipe(
    name: str, output_dir: str, *, install: bool = False, command: str = ""
) -> dict[str, Any]:
    """Run every stage of a recipe in order (resuming any that did not finish)."""
    from prumerge.train.loop import atomic_write_json, train

    if name not in RECIPES:
        raise PrumergeError(f"unknown recipe {name!r}; available: {', '.join(sorted(RECIPES))}")
    root = Path(output_dir)
    if root.exists() and not root.is_dir():
        raise PrumergeError(f"--output-dir {root} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    record_path = root / "recipe.json"
    record: dict[str, Any] = {"recipe": name, "command": command, "stages": []}
    for stage in RECIPES[name]:
        cfg = stage_config(stage, root, install, command)
        report_path = Path(cfg.output_dir) / "report.json"
        if report_path.is_file():
            report = json.loads(report_path.read_text())
            print(
                f"stage {stage.name}: finished earlier ({report['steps_done']} steps)", flush=True
            )
            if install:
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
