"""Copying a finished run's weights into the package as a default-model variant."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from prumerge.errors import PrumergeError

__all__ = ["install_variant"]


def install_variant(run_dir: str | Path, variant: str, resolution: int = 224) -> Path:
    """Install ``projector-<res>.safetensors``, the report (as ``projector-<res>.json``) and
    ``lora/`` of a finished run as ``models/weights/<variant>/``.

    The files are staged in a sibling directory and swapped in with one rename each, so an
    interrupted install leaves the previous weights or the new ones, never a mixture of files
    inside a half-written one.
    """
    from prumerge.models.default import VARIANTS, WEIGHTS_DIR

    if variant not in VARIANTS:
        raise PrumergeError(f"unknown variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    run = Path(run_dir)
    weights = run / f"projector-{resolution}.safetensors"
    report = run / "report.json"
    for path in (weights, report):
        if not path.is_file():
            raise PrumergeError(f"{path} does not exist; has the run finished?")
    staging = WEIGHTS_DIR / f".{variant}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copyfile(weights, staging / weights.name)
    data = json.loads(report.read_text())
    (staging / f"projector-{resolution}.json").write_text(
        json.dumps(data, indent=2, sort_keys=True) + "\n"
    )
    if (run / "lora" / "adapter_config.json").is_file():
        (staging / "lora").mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copyfile(run / "lora" / name, staging / "lora" / name)
    target = WEIGHTS_DIR / variant
    old = WEIGHTS_DIR / f".{variant}.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    print(f"installed {run} as the {variant!r} variant in {target}", flush=True)
    return target
