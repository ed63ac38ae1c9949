"""Qwen2.5-VL served with reduced tokens: a tiny random checkpoint, one engine per module.

vLLM's own Qwen2.5-VL module does not import without torchvision; the plugin's
``PrumergeQwen2_5_VLForConditionalGeneration`` reduces in the multimodal processor with the
Hugging Face adapter's code and gives every kept token its original M-RoPE position. Needs
the vLLM environment (scripts/setup-vllm.sh); skipped without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from prumerge.serve.config import QWEN_ARCHITECTURE
from tests.serve.conftest import (
    EXAMPLES,
    MAX_TOKENS,
    REPO,
    _hf_answers,
    _start_worker,
    _stop,
    _vllm_available,
    _wait_for,
)
from tests.serve.tiny_qwen import tiny_served_qwen

#: The served config: a fixed budget (each tiny image has 12 or 16 merged cells).
SERVED = {"method": "prumerge+", "keep": 8}
#: Configs whose processor-side reduction (tokens and anchors) is compared with the adapter's.
IN_PROCESSOR = [
    {"method": "none"},
    {"method": "prumerge"},
    {"method": "prumerge+"},
    {"method": "prumerge+", "keep": 8},
    {"method": "prumerge", "keep": 6},
    {"method": "visionzip", "keep": 8},
    {"method": "cls_topk", "keep": 6},
    {"method": "vispruner", "keep": 6},
    {"method": "pool", "keep": 4},
    {"method": "random", "keep": 6},
    {"method": "tome", "keep": 6},
    {"method": "divprune", "keep": 6},
]
NUM_QUESTIONS = 24


@dataclass
class QwenRun:
    items: list[dict[str, Any]]
    vllm: dict[str, Any]
    hf_texts: list[str]
    hf_counts: list[int]
    text_lengths: list[int]
    image_token_id: int
    in_processor_vllm: list[Any]  # per config: (tokens per image, anchors per image)
    in_processor_hf: list[Any]


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QwenRun]:
    reason = _vllm_available()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("easy_vqa")
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration

    import prumerge
    from prumerge.eval.datasets import load_benchmark
    from prumerge.loading.checkpoint import load_processor
    from prumerge.serve.config import parse_serve_config

    work = tmp_path_factory.mktemp("vllm-qwen")
    checkpoint = tiny_served_qwen(work)
    processor = load_processor(str(checkpoint))

    def prompt(question: str) -> str:
        content = [{"type": "image"}, {"type": "text", "text": question}]
        return processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )

    samples = load_benchmark("easy-vqa", limit=NUM_QUESTIONS).samples
    items = [
        {
            "prompt": prompt(s.meta["question"]),
            "image": str(s.image),
            "question": s.meta["question"],
        }
        for s in samples
    ]
    examples = [str(REPO / "examples" / name) for name in EXAMPLES]
    items += [{"prompt": prompt("what is the shape?"), "image": p, "question": p} for p in examples]
    spec = {
        "model": str(checkpoint),
        "architecture": QWEN_ARCHITECTURE,
        "serve": SERVED,
        "items": items,
        "max_tokens": MAX_TOKENS,
        "qwen_in_processor": {
            "images": examples,
            "configs": IN_PROCESSOR,
            "out": str(work / "in-processor.pt"),
        },
    }
    engine = _start_worker(work, spec)
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(checkpoint)).eval()
        hf_texts, hf_counts, lengths = _hf_answers(model, processor, items, SERVED)
        images = [Image.open(p).convert("RGB") for p in examples]
        pixels = dict(processor.image_processor(images=images, return_tensors="pt"))
        in_processor_hf = []
        for config in IN_PROCESSOR:
            options = parse_serve_config(config, projected=True).options  # "adaptive": None
            with prumerge.apply(model, config["method"], **options) as handle, torch.no_grad():
                encoded = handle.adapter.encode(pixels)
            in_processor_hf.append(
                ([t.float() for t in encoded.features], [a.long() for a in encoded.anchors])
            )
        result = _wait_for(engine, work)
        yield QwenRun(
            items=items,
            vllm=result,
            hf_texts=hf_texts,
            hf_counts=hf_counts,
            text_lengths=lengths,
            image_token_id=model.config.image_token_id,
            in_processor_vllm=torch.load(work / "in-processor.pt"),
            in_processor_hf=in_processor_hf,
        )
    finally:
        _stop(engine)


def test_served_qwen_answers_equal_the_hugging_face_path(qwen_run: QwenRun):
    """Parity: greedy answers of the served tiny Qwen2.5-VL (PruMerge+ at 8
    tokens per image, kept tokens at their original M-RoPE positions) and of prumerge.apply."""
    texts = qwen_run.vllm["texts"]
    assert len(texts) == len(qwen_run.hf_texts) == NUM_QUESTIONS + len(EXAMPLES)
    differ = [
        f"{item['question']!r}: vLLM {v!r}, Hugging Face {h!r}"
        for item, v, h in zip(qwen_run.items, texts, qwen_run.hf_texts, strict=True)
        if v.strip() != h.strip()
    ]
    assert not differ, f"{len(differ)} of {len(texts)} answers differ:\n" + "\n".join(differ)
    # Random weights, yet not one repeated token everywhere: the answers differ by image.
    assert len(set(texts)) > 1


def test_each_served_qwen_prompt_holds_the_reduced_count(qwen_run: QwenRun):
    for ids, length, count in zip(
        qwen_run.vllm["prompt_token_ids"], qwen_run.text_lengths, qwen_run.hf_counts, strict=True
    ):
        assert count == SERVED["keep"]
        assert ids.count(qwen_run.image_token_id) == count
        assert len(ids) == length - 1 + count


@pytest.mark.parametrize("index", range(len(IN_PROCESSOR)), ids=[str(c) for c in IN_PROCESSOR])
def test_qwen_processor_reduction_equals_the_adapter(qwen_run: QwenRun, index: int):
    """The processor's tower and reduction give the adapter's tokens and anchors."""
    (tokens, anchors), (hf_tokens, hf_anchors) = (
        qwen_run.in_processor_vllm[index],
        qwen_run.in_processor_hf[index],
    )
    assert [len(t) for t in tokens] == [len(t) for t in hf_tokens]
    for ours, theirs in zip(anchors, hf_anchors, strict=True):
        assert torch.equal(ours, theirs)
    for ours, theirs in zip(tokens, hf_tokens, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
