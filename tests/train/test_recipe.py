"""The recipe runner: stages in order, each continuing the previous, resumable, installable."""

from __future__ import annotations

import json

import pytest


def test_recipe_runs_stages_in_order_and_skips_finished_ones(tmp_path, monkeypatch):
    from prumerge.train import install as install_module
    from prumerge.train import loop, recipe

    calls = []

    def fake_train(cfg):
        calls.append(cfg)
        report = {"steps_done": cfg.steps, "train_wall_s": 10.0, "eval_wall_s": 1.0,
                  "run_wall_s": 12.0, "eval": None}  # fmt: skip
        (tmp_path / "run" / cfg.output_dir.rsplit("/", 1)[-1]).mkdir(parents=True, exist_ok=True)
        (tmp_path / "run" / cfg.output_dir.rsplit("/", 1)[-1] / "report.json").write_text(
            json.dumps(report)
        )
        return report

    installed = []
    monkeypatch.setattr(loop, "train", fake_train)
    monkeypatch.setattr(
        install_module, "install_variant", lambda run, variant, res: installed.append(variant)
    )
    stages = [
        recipe.Stage("base-1", {"steps": 2}),  # an intermediate stage: never installed
        recipe.Stage("base", {"steps": 5, "lora_rank": 4}, init_from="base-1"),
        recipe.Stage(
            "default", {"steps": 3, "lora_rank": 4, "reduce": "prumerge"}, init_from="base"
        ),
    ]
    monkeypatch.setitem(recipe.RECIPES, "tiny", stages)
    from prumerge.models import default as default_module

    monkeypatch.setattr(default_module, "WEIGHTS_DIR", tmp_path / "weights")
    (tmp_path / "weights").mkdir()

    record = recipe.run_recipe("tiny", str(tmp_path / "run"), install=True, command="cmd")
    assert [c.output_dir for c in calls] == [
        str(tmp_path / "run" / "base-1"),
        str(tmp_path / "run" / "base"),
        str(tmp_path / "run" / "default"),
    ]
    assert calls[0].install is None and calls[1].install == "base"
    assert calls[1].init_lora is None  # base-1 trains no LoRA
    second = calls[2]
    assert second.init_projector == str(tmp_path / "run" / "base" / "projector-224.safetensors")
    assert second.init_lora == str(tmp_path / "run" / "base" / "lora")
    assert second.reduce == "prumerge" and second.install == "default"
    assert [s["name"] for s in record["stages"]] == ["base-1", "base", "default"]
    assert record["train_wall_s_total"] == 30.0
    assert json.loads((tmp_path / "weights" / "recipe.json").read_text())["recipe"] == "tiny"

    # Run again: both stages finished, so nothing trains; their weights are installed again.
    calls.clear()
    installed.clear()
    again = recipe.run_recipe("tiny", str(tmp_path / "run"), install=True, command="cmd")
    assert calls == [] and installed == ["base", "default"]
    assert [s["steps_done"] for s in again["stages"]] == [2, 5, 3]


def test_unknown_recipe():
    from prumerge.errors import PrumergeError
    from prumerge.train.recipe import run_recipe

    with pytest.raises(PrumergeError, match="unknown recipe 'nope'; available: default"):
        run_recipe("nope", "/tmp/never-created-by-this-test")


def test_the_default_recipe_is_a_valid_configuration(tmp_path):

    import torch
    from safetensors.torch import save_file

    from prumerge.train.config import check_config
    from prumerge.train.recipe import RECIPES, stage_config

    for stage in RECIPES["default"]:
        cfg = stage_config(stage, tmp_path, install=True, command="", stages=RECIPES["default"])
        if stage.init_from:  # the previous stage's outputs, as a finished run leaves them
            source = tmp_path / stage.init_from
            (source / "lora").mkdir(parents=True, exist_ok=True)
            (source / "lora" / "adapter_config.json").write_text("{}")
            save_file({"linear_1.weight": torch.zeros(1)}, cfg.init_projector)
        check_config(cfg)
