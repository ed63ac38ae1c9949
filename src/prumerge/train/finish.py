"""The end of a run: the trained weights written, the default model evaluated as it ships."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from prumerge.train.config import TrainConfig
from prumerge.train.process import log
from prumerge.train.rundir import mean_recent_loss, weights_name
from prumerge.train.trainables import Trainables


def finish(
    cfg: TrainConfig,
    out: Path,
    model: Any,
    trainables: Trainables,
    step: int,
    train_seconds: float,
    stopped_early: bool,
    mixture: list[Any],
) -> dict[str, Any]:
    """Write the trained weights, evaluate the default model as it ships, and report."""
    from safetensors.torch import save_file

    state = trainables.shipped_projector()
    save_file(state, str(out / weights_name(cfg)), metadata={"resolution": str(cfg.resolution)})
    lora_dir = None
    if trainables.peft is not None:
        from prumerge.train.lora import save_lora

        lora_dir = save_lora(trainables.peft, out / "lora")
    log(f"trained {step} steps in {train_seconds / 60:.1f} min; wrote {out}")
    evaluation: dict[str, Any] = {}
    eval_seconds = 0.0
    if cfg.uses_default_model and (cfg.eval_images != 0 or cfg.eval_scenes > 0):
        from prumerge.models.default import build_default_model
        from prumerge.train.evaluate import evaluate_easy_vqa, evaluate_synth

        trainables.restore()
        del model
        shipped, processor = build_default_model(cfg.resolution, projector=state, lora=lora_dir)
        start = time.time()
        for entry in [None] + [e for e in mixture if e.label != "none"]:
            method = "none" if entry is None else entry.method
            options = {} if entry is None else entry.options()
            label = "none" if entry is None else entry.label
            if cfg.eval_images != 0:
                result = evaluate_easy_vqa(
                    shipped,
                    processor,
                    cfg.eval_images,
                    method=method,
                    options=options,
                    batch_images=cfg.eval_batch_images,
                )
                evaluation.setdefault("easy-vqa", {})[label] = result
                log(f"easy-vqa, {label}: {json.dumps(result['accuracy'])}")
            if cfg.eval_scenes > 0:
                result = evaluate_synth(
                    shipped,
                    processor,
                    cfg.eval_scenes,
                    method=method,
                    options=options,
                    batch_images=cfg.eval_batch_images,
                )
                evaluation.setdefault("synth", {})[label] = result
                log(f"synth, {label}: {json.dumps(result['accuracy'])}")
        eval_seconds = time.time() - start
    elif cfg.save_merged and not cfg.uses_default_model:
        trainables.restore()
        if trainables.peft is not None:
            merged = trainables.peft.to(torch.float32).merge_and_unload()
            model.model.language_model = merged
        model.to(torch.float32).save_pretrained(str(out / "merged"))
        log(f"saved the merged model into {out / 'merged'}")
    return {
        "command": cfg.command,
        "config": dataclasses.asdict(cfg),
        "steps_done": step,
        "stopped_early": stopped_early,
        "train_wall_s": round(train_seconds, 1),
        "eval_wall_s": round(eval_seconds, 1),
        "final_loss_mean_last_50": mean_recent_loss(out / "metrics.jsonl", 50),
        "eval": evaluation or None,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
