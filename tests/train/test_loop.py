"""The training loop end to end on the real default model, a few steps long."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from tests.default_model import requires_default_weights

torch = pytest.importorskip("torch")


def _tiny_config(output_dir, **changes):
    from prumerge.train.config import TrainConfig

    config = TrainConfig(
        output_dir=str(output_dir),
        train_images=3,
        stats_images=3,
        batch_size=1,
        steps=3,
        warmup_steps=1,
        checkpoint_every=1,
        log_every=1,
        eval_images=0,
        instruction_rate=0.5,
        synth_scenes=2,
        synth_per_batch=1,
        prompt_tokens=2,
        lora_rank=2,
        reduce="none:1,prumerge:1,prumerge+:1",
        train_dtype="bfloat16",
    )
    return dataclasses.replace(config, **changes)


def _weights(run_dir):
    from safetensors.torch import load_file

    weights = load_file(str(run_dir / "projector-224.safetensors"))
    weights.update(
        {
            f"lora.{k}": v
            for k, v in load_file(str(run_dir / "lora" / "adapter_model.safetensors")).items()
        }
    )
    return weights


@requires_default_weights
def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    from prumerge.errors import PrumergeError
    from prumerge.train.loop import train

    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = train(_tiny_config(straight_dir, eval_images=1, eval_scenes=1))
    assert straight["steps_done"] == 3 and not straight["stopped_early"]
    records = [json.loads(x) for x in (straight_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    assert {r["reduce"] for r in records} <= {"none", "prumerge", "prumerge+"}
    # The evaluation ran with all tokens and with each reduction of the mixture.
    for bench, questions in (("easy-vqa", 1), ("synth", 1)):
        results = straight["eval"][bench]
        assert set(results) == {"none", "prumerge", "prumerge+"}
        assert results["none"]["mean_tokens"] == 256.0
        assert results["prumerge"]["mean_tokens"] < 256
        assert all(0.0 <= r["accuracy"]["all"] <= 1.0 for r in results.values())
        assert results["none"]["images"] == questions

    # A time budget spent after the first step interrupts the run there. A torn metrics line
    # and a record past the checkpoint, as a killed run leaves them, are dropped on resume.
    first = train(_tiny_config(resumed_dir, time_budget_min=1e-9))
    assert first["steps_done"] == 1 and first["stopped_early"]
    with open(resumed_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 2, "loss": 9.9}) + "\n" + '{"step": 3, "lo')
    resumed = train(_tiny_config(resumed_dir))
    assert resumed["steps_done"] == 3 and resumed["eval"] is None
    steps = [
        json.loads(x)["step"] for x in (resumed_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3]
    a, b = _weights(straight_dir), _weights(resumed_dir)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)

    # A checkpoint of another configuration is never resumed, and the message says why.
    with pytest.raises(PrumergeError, match=r"different configuration \(lr: 0.001 -> 0.5\)"):
        train(_tiny_config(resumed_dir, lr=0.5))

    # The prompt embeddings ship in the projector file and the adapter merges into the LLM.
    from prumerge.models.default import PROMPT_KEY, build_default_model, format_prompt
    from prumerge.train.lora import add_lora, load_lora_state

    assert a[PROMPT_KEY].shape == (2, 576)
    model, processor = build_default_model(
        projector=straight_dir / "projector-224.safetensors", lora=straight_dir / "lora"
    )
    ids = processor.tokenizer.convert_tokens_to_ids(["<|prompt_0|>", "<|prompt_1|>"])
    torch.testing.assert_close(model.get_input_embeddings().weight[ids], a[PROMPT_KEY])
    assert model.generation_config.suppress_tokens == ids
    assert "user\n<|prompt_0|><|prompt_1|><image>\nwhat?" in format_prompt(processor, "what?")
    # The merged LLM computes what the LLM with the adapter injected computes.
    from safetensors.torch import load_file

    unmerged, _ = build_default_model(projector=straight_dir / "projector-224.safetensors")
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        plain_out = unmerged.model.language_model(input_ids=tokens).last_hidden_state
        peft_model = add_lora(unmerged.model.language_model, 2)
        load_lora_state(
            peft_model, load_file(str(straight_dir / "lora" / "adapter_model.safetensors"))
        )
        merged_out = model.model.language_model(input_ids=tokens).last_hidden_state
        adapted_out = unmerged.model.language_model(input_ids=tokens).last_hidden_state
    # Merging reorders the float sums, so the two differ by rounding (up to 4e-4 seen on
    # some CPUs); the adapter's own effect is far larger than that.
    torch.testing.assert_close(merged_out, adapted_out, atol=2e-3, rtol=1e-3)
    rounding = (merged_out - adapted_out).abs().max()
    assert (merged_out - plain_out).abs().max() > 10 * rounding  # the adapter did train
    assert type(model).__name__ == "LlavaForConditionalGeneration"


@requires_default_weights
def test_gradients_flow_through_the_merged_features(default_model):
    """With PruMerge's merge the pruned patches reach the projector's gradient; without it
    (merge="none") they do not, so the two gradients differ."""
    from PIL import Image

    import prumerge
    from prumerge.models.default import format_prompt
    from prumerge.train.packing import encode_isolated_turns
    from prumerge.train.step import step_loss

    model, processor = default_model
    image = Image.open("examples/easy-vqa-test-0.png").convert("RGB")
    sequence = encode_isolated_turns(
        processor,
        [("what color is the shape?", "red")],
        model.config.image_seq_length,
        lambda q: format_prompt(processor, q),
        "<|im_end|>",
    )
    projector = model.model.multi_modal_projector
    grads = {}
    try:
        for p in projector.parameters():
            p.requires_grad_(True)
        for merge in ("sum", "none"):
            projector.zero_grad(set_to_none=True)
            loss, _ = step_loss(
                model, processor, "prumerge", {"merge": merge}, [image], [sequence], 1.0
            )
            loss.backward()
            grads[merge] = projector.linear_1.weight.grad.clone()
    finally:
        for p in projector.parameters():
            p.requires_grad_(False)
            p.grad = None
    assert grads["sum"].abs().sum() > 0
    assert not torch.allclose(grads["sum"], grads["none"])
    assert prumerge  # the reduction ran through prumerge.apply inside step_loss
