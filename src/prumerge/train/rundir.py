"""The run directory: its config (a run of another configuration is refused), checkpoint,
metrics and weights, each written whole or not at all."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from prumerge.train.config import TrainConfig, config_difference


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(obj: Any, path: Path) -> None:
    _atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def prepare_output(cfg: TrainConfig, out: Path) -> str | None:
    """Create the run directory, or refuse one holding a run of another configuration."""
    config_path = out / "config.json"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"--output-dir {out}: {exc.strerror or exc}"
    if (out / "checkpoint.pt").is_file() and config_path.is_file():
        recover = f"delete {out} (its checkpoint is of an unknown configuration) or use another --output-dir"  # noqa: E501
        try:
            old = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            return f"{config_path} is damaged (line {exc.lineno}: {exc.msg}); {recover}"
        except (OSError, UnicodeDecodeError):
            return f"{config_path} is unreadable; {recover}"
        if not isinstance(old, dict):
            return f"{config_path} is damaged (not a JSON object); {recover}"
        differences = config_difference(old, cfg)
        if differences:
            return (
                f"{out} holds a checkpoint of a different configuration "
                f"({'; '.join(differences)}); use another --output-dir"
            )
    atomic_write_json(dataclasses.asdict(cfg), config_path)
    return None


def trim_metrics(path: Path, step: int) -> None:
    """Drop metric records past the checkpoint being resumed (they will be written again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a torn last line from a killed run
    _atomic_write_text("".join(line + "\n" for line in kept), path)


def weights_name(cfg: TrainConfig) -> str:
    return (
        f"projector-{cfg.resolution}.safetensors"
        if cfg.uses_default_model
        else "projector.safetensors"
    )


def mean_recent_loss(path: Path, count: int) -> float | None:
    if not path.is_file():
        return None
    losses = [json.loads(line)["loss"] for line in path.read_text().splitlines() if line.strip()]
    return round(sum(losses[-count:]) / len(losses[-count:]), 5) if losses else None
