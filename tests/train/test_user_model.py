"""`prumerge train --model DIR --data JSON`: a user's LLaVA, LLaVA's conversation format,
reduction in the loop, LoRA, and data parallelism over two CPU processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

ARGS = [
    "--packing", "chat", "--batch-size", "4", "--steps", "3", "--warmup-steps", "1",
    "--lr", "1e-2", "--lora-rank", "2", "--lora-lr", "1e-2", "--reduce", "prumerge@8:1,none:1",
    "--checkpoint-every", "1", "--log-every", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    from PIL import Image

    from tests.eval.tiny_model import save_tiny_llava

    root = tmp_path_factory.mktemp("user-llava")
    save_tiny_llava(root / "model")
    gen = torch.Generator().manual_seed(0)
    records = []
    colors = ["red", "green", "blue", "yellow", "purple", "orange"]
    for i in range(6):
        pixels = (torch.rand(42, 42, 3, generator=gen) * 255).byte().numpy()
        Image.fromarray(pixels).save(root / f"{i}.png")
        turns = [
            {"from": "human", "value": "<image>\nwhat color is the object ?"},
            {"from": "gpt", "value": colors[i]},
        ]
        if i % 2:
            turns += [
                {"from": "human", "value": "is there a star ?"},
                {"from": "gpt", "value": "no"},
            ]
        records.append({"id": str(i), "image": f"{i}.png", "conversations": turns})
    (root / "data.json").write_text(json.dumps(records))
    return root


def _run(command, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path.cwd()))
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _weights(out):
    from safetensors.torch import load_file

    weights = load_file(str(out / "projector.safetensors"))
    weights.update(
        {
            f"lora.{k}": v
            for k, v in load_file(str(out / "lora" / "adapter_model.safetensors")).items()
        }
    )
    return weights


def test_two_processes_equal_one(llava_dir, tmp_path):
    common = ["--model", str(llava_dir / "model"), "--data", str(llava_dir / "data.json"), *ARGS]
    one, two = tmp_path / "one", tmp_path / "two"
    _run(
        [sys.executable, "-m", "prumerge.cli", "train", "--output-dir", str(one), *common], tmp_path
    )
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    _run(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "prumerge.cli", "train",
         "--output-dir", str(two), *common],
        tmp_path,
    )  # fmt: skip
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys() and len(a) > 4
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4)
    # Both processes drew the same reductions and summed to the same global losses.
    losses = [
        [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)
    ]
    assert [r["reduce"] for r in losses[0]] == [r["reduce"] for r in losses[1]]
    for r1, r2 in zip(*losses, strict=True):
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-4)
        assert r1["answer_tokens"] == r2["answer_tokens"]
    # The weights moved: training did something.
    from safetensors.torch import load_file

    from tests.eval.tiny_model import save_tiny_llava

    assert (
        a[
            "lora."
            + next(
                k
                for k in load_file(str(one / "lora" / "adapter_model.safetensors"))
                if "lora_B" in k
            )
        ]
        .abs()
        .sum()
        > 0
    )
    assert save_tiny_llava  # the fixture's source


def test_save_merged_gives_a_plain_llava(llava_dir, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from prumerge.cli import main

    out = tmp_path / "run"
    code = main(
        ["train", "--model", str(llava_dir / "model"), "--data", str(llava_dir / "data.json"),
         "--output-dir", str(out), "--save-merged", *ARGS]
    )  # fmt: skip
    assert code == 0
    merged = LlavaForConditionalGeneration.from_pretrained(str(out / "merged"))
    assert not any("lora" in name for name, _ in merged.named_parameters())
    from safetensors.torch import load_file

    projector = load_file(str(out / "projector.safetensors"))
    torch.testing.assert_close(
        merged.model.multi_modal_projector.linear_1.weight, projector["linear_1.weight"]
    )
