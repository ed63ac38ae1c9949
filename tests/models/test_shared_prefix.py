"""Shared-prefix answering gives exactly the answers of `generate` with the same reduction."""

from __future__ import annotations

import pytest
import torch

import prumerge
from prumerge.shared_prefix import answer_shared_prefix

from .conftest import requires_default_weights


def _generate_each(model, processor, images, questions, prompt_fn, max_new_tokens):
    """Reference: one left-padded `generate` batch per image, through the patched model."""
    processor.tokenizer.padding_side = "left"
    answers = []
    for image, qs in zip(images, questions, strict=True):
        prompts = [prompt_fn(q) for q in qs]
        inputs = processor(
            images=[image] * len(qs), text=prompts, padding=True, return_tensors="pt"
        )
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        answers.append([a.strip() for a in processor.batch_decode(new, skip_special_tokens=True)])
    return answers


@requires_default_weights
@pytest.mark.parametrize(
    "method, options",
    [
        ("none", {}),
        ("prumerge", {}),
        ("prumerge+", {}),
        ("tome", {"keep": 0.25}),
        ("pool", {"keep": 16}),
    ],
)
def test_default_model_answers_equal_generate(default_model, method, options):
    from prumerge.data.easy_vqa import load_easy_vqa
    from prumerge.data.sample import SHORT_ANSWER
    from prumerge.models.default import format_prompt

    model, processor = default_model
    ids, turns, paths = load_easy_vqa("test")
    from PIL import Image

    chosen = ids[:3]
    images = [Image.open(paths[i]).convert("RGB") for i in chosen]
    # Half the questions carry the eval harness's instruction, so suffix lengths differ.
    questions = [
        [q + (SHORT_ANSWER if k % 2 else "") for k, (q, _) in enumerate(turns[i])] for i in chosen
    ]
    prompt_fn = lambda q: format_prompt(processor, q)  # noqa: E731
    with prumerge.apply(model, method, **options) as handle:
        shared = answer_shared_prefix(
            model, processor, handle, images, questions, prompt_fn, max_new_tokens=6
        )
        counts = list(handle.stats.tokens_out)
        expected = _generate_each(model, processor, images, questions, prompt_fn, 6)
    assert shared == expected
    if method == "prumerge":
        assert len(set(counts)) > 1, "the adaptive counts should differ, so prefixes are padded"


def test_tiny_model_with_unequal_prefixes_equals_generate():
    from PIL import Image

    from tests.adapters.conftest import tiny_llava
    from tests.eval.tiny_model import build_processor

    model = tiny_llava("clip")
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    processor = build_processor()
    gen = torch.Generator().manual_seed(0)
    images = [
        Image.fromarray((torch.rand(42, 42, 3, generator=gen) * 255 * s).byte().numpy())
        for s in (1.0, 0.3, 0.7)
    ]
    questions = [
        ["is there a red circle ?", "what color"],
        ["how many"],
        ["is the star left", "a", "b c d"],
    ]
    prompt_fn = lambda q: f"USER : <image> {q} ASSISTANT :"  # noqa: E731
    with prumerge.apply(model, "prumerge+") as handle:
        shared = answer_shared_prefix(
            model, processor, handle, images, questions, prompt_fn, max_new_tokens=5
        )
        counts = list(handle.stats.tokens_out)
        expected = _generate_each(model, processor, images, questions, prompt_fn, 5)
    assert shared == expected
    assert len(set(counts)) > 1
    assert all(len(a) == len(q) for a, q in zip(shared, questions, strict=True))


def test_fastv_is_refused():
    from tests.adapters.conftest import tiny_llava
    from tests.eval.tiny_model import build_processor

    model = tiny_llava("clip", text_layers=3)
    with (
        prumerge.apply(model, "fastv", keep=8) as handle,
        pytest.raises(prumerge.errors.PrumergeError),
    ):
        answer_shared_prefix(model, build_processor(), handle, [], [], str)


def test_original_positions_are_refused_and_the_predictor_answers_in_full():
    """The shared prefix numbers positions compactly; with positions="original" the
    predictor falls back to `generate` (one vision pass per question)."""
    from prumerge.data import synth
    from prumerge.eval.predictor import ModelPredictor
    from tests.adapters.conftest import tiny_llava
    from tests.eval.tiny_model import build_processor

    model = tiny_llava("clip")
    processor = build_processor()
    with (
        prumerge.apply(model, "prumerge", positions="original") as handle,
        pytest.raises(prumerge.errors.PrumergeError, match="positions='compact'"),
    ):
        answer_shared_prefix(model, processor, handle, [], [], str)

    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    processor.tokenizer.padding_side = "left"
    samples = list(synth.iter_samples(3, split="test"))[:5]  # questions of one scene
    prompt_fn = lambda q: f"USER : <image> {q} ASSISTANT :"  # noqa: E731
    with ModelPredictor(model, processor, prompt_fn, "prumerge", max_new_tokens=2) as predictor:
        predictor.handle.positions = "original"
        predictor.predict(samples)
        assert predictor.handle.stats.tokens_in == [36] * len(samples)


def test_predictor_answers_equal_generate_on_the_generated_benchmark():
    """`prumerge eval`'s predictor shares prefixes by image; its answers are `generate`'s."""
    from prumerge.data import synth
    from prumerge.eval.predictor import ModelPredictor
    from tests.adapters.conftest import tiny_llava
    from tests.eval.tiny_model import build_processor

    model = tiny_llava("clip")
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    processor = build_processor()
    processor.tokenizer.padding_side = "left"
    samples = list(synth.iter_samples(3, split="test"))[:25]  # questions of 3 scenes
    prompt_fn = lambda q: f"USER : <image> {q} ASSISTANT :"  # noqa: E731
    with ModelPredictor(model, processor, prompt_fn, "prumerge", max_new_tokens=4) as predictor:
        shared = predictor.predict(samples)
        assert predictor.handle.stats.tokens_in == [36] * 3  # one vision pass per scene
        one_by_one = predictor.generate(
            [prompt_fn(s.prompt) for s in samples],
            [[s.load_image()] for s in samples],
            formatted=True,
        )
    assert [p.text for p in shared] == [g.text for g in one_by_one]
    assert [p.tokens_out for p in shared] == [g.tokens_out for g in one_by_one]


def test_benchmark_files_share_one_vision_pass_per_image():
    """The loaders wrap every sample's file in its own ImageFile; questions about one file
    are still one image to the predictor (a regression: keyed by object, nothing was shared
    and every question paid for the vision tower and the LLM's pass over the image)."""
    from prumerge.eval.datasets import load_benchmark
    from prumerge.eval.predictor import ModelPredictor
    from tests.adapters.conftest import tiny_llava
    from tests.eval.tiny_model import build_processor

    model = tiny_llava("clip")
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    processor = build_processor()
    processor.tokenizer.padding_side = "left"
    samples = load_benchmark("easy-vqa", limit=25).samples
    files = list(dict.fromkeys(str(s.image) for s in samples))
    assert 1 < len(files) < len(samples)  # several questions per image
    prompt_fn = lambda q: f"USER : <image> {q} ASSISTANT :"  # noqa: E731
    with ModelPredictor(model, processor, prompt_fn, "prumerge", max_new_tokens=2) as predictor:
        shared = predictor.predict(samples)
        assert len(predictor.handle.stats.tokens_in) == len(files)  # one vision pass per image
        one_by_one = predictor.generate(
            [prompt_fn(s.prompt) for s in samples],
            [[s.load_image()] for s in samples],
            formatted=True,
        )
    assert [p.text for p in shared] == [g.text for g in one_by_one]
