"""The projector training loop, end to end on the real default model, a few steps long."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from tests.models.conftest import requires_default_weights

torch = pytest.importorskip("torch")


def _tiny_config(output_dir, **changes):
    from prumerge.models.train import TrainConfig

    config = TrainConfig(
        output_dir=str(output_dir),
        train_images=3,
        stats_images=3,
        batch_size=1,
        steps=2,
        warmup_steps=1,
        checkpoint_every=1,
        log_every=1,
        eval_images=0,
        instruction_rate=0.5,
        synth_scenes=2,
        synth_per_batch=1,
        prompt_tokens=2,
    )
    return dataclasses.replace(config, **changes)


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "projector-224.safetensors"))


@requires_default_weights
def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    from prumerge.errors import PrumergeError
    from prumerge.models.train import train_projector

    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = train_projector(_tiny_config(straight_dir, eval_images=1))
    assert straight["steps_done"] == 2 and not straight["stopped_early"]
    losses = [
        json.loads(x)["loss"] for x in (straight_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    assert straight["eval"]["images"] == 1 and straight["eval"]["questions"] > 0
    accuracy = straight["eval"]["accuracy"]
    assert set(accuracy) >= {"color", "shape", "yes/no", "all"}
    assert all(0.0 <= v <= 1.0 for v in accuracy.values())
    cells = straight["eval"]["yes_no_cells"]
    assert sum(total for _, total in cells.values()) == straight["eval"]["counts"]["yes/no"]
    assert all(0 <= right <= total for right, total in cells.values())

    # A time budget that is spent after the first step interrupts the run there; the same
    # command without it resumes from that checkpoint rather than starting over.
    first = train_projector(_tiny_config(resumed_dir, time_budget_min=1e-9))
    assert first["steps_done"] == 1 and first["stopped_early"]
    resumed = train_projector(_tiny_config(resumed_dir))
    assert resumed["steps_done"] == 2 and resumed["eval"] is None
    assert len((resumed_dir / "metrics.jsonl").read_text().splitlines()) == 2
    a, b = _weights(straight_dir), _weights(resumed_dir)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)

    # The learned prompt embeddings ship in the projector file and load into the model.
    from prumerge.models.default import PROMPT_KEY, build_default_model, format_prompt

    assert a[PROMPT_KEY].shape == (2, 576)
    model, processor = build_default_model(projector=a)
    ids = processor.tokenizer.convert_tokens_to_ids(["<|prompt_0|>", "<|prompt_1|>"])
    torch.testing.assert_close(model.get_input_embeddings().weight[ids], a[PROMPT_KEY])
    assert model.generation_config.suppress_tokens == ids
    assert "user\n<|prompt_0|><|prompt_1|><image>\nwhat?" in format_prompt(processor, "what?")

    # A checkpoint of another configuration is never resumed.
    with pytest.raises(PrumergeError, match="different configuration"):
        train_projector(_tiny_config(resumed_dir, lr=0.5))
