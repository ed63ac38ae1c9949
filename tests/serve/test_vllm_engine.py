"""The vLLM plugin end to end, on the embedded default model (one engine per session).

Needs the vLLM environment (scripts/setup-vllm.sh); skipped without it. See conftest.py.
"""

from __future__ import annotations

import pytest
import torch

from prumerge.methods import build_method
from prumerge.serve.vision import layers_needed, layout_of
from tests.serve.conftest import (
    ENCODED,
    MAX_TOKENS,
    NUM_QUESTIONS,
    SERVED,
    TOWER_METHODS,
    EngineRun,
)


def test_vllm_answers_equal_the_hugging_face_path(engine_run: EngineRun):
    """Parity: greedy answers to the easy-vqa questions, same model, method and budget."""
    vllm_texts = engine_run.vllm["texts"]
    assert len(vllm_texts) == len(engine_run.hf_texts) == NUM_QUESTIONS >= 20
    differ = [
        f"{item['question']!r}: vLLM {v!r}, Hugging Face {h!r}"
        for item, v, h in zip(engine_run.items, vllm_texts, engine_run.hf_texts, strict=True)
        if v.strip() != h.strip()
    ]
    assert not differ, f"{len(differ)} of {NUM_QUESTIONS} answers differ:\n" + "\n".join(differ)
    # The answers are real generations, not empty strings that would match trivially.
    assert all(t.strip() for t in vllm_texts)
    assert all(len(ids) <= MAX_TOKENS for ids in engine_run.vllm["token_ids"])


def test_each_prompt_holds_the_reduced_count_of_placeholders(engine_run: EngineRun):
    """Placeholder count: every request's prompt has K image tokens, K the adapter's count."""
    assert set(engine_run.hf_tokens_out) == {SERVED["keep"]}
    for ids, text_length, tokens_out in zip(
        engine_run.vllm["prompt_token_ids"],
        engine_run.text_prompt_lengths,
        engine_run.hf_tokens_out,
        strict=True,
    ):
        assert ids.count(engine_run.image_token_id) == tokens_out
        # The prompt's one <image> token became K placeholders: K - 1 more tokens.
        assert len(ids) == text_length - 1 + tokens_out


@pytest.mark.parametrize("index", range(len(ENCODED)), ids=[str(c) for c in ENCODED])
def test_served_tokens_equal_the_adapter_tokens(engine_run: EngineRun, index: int):
    """Each method's reduced, projected tokens inside the engine equal the adapter's."""
    assert engine_run.encoded_vllm is not None
    served, adapter = engine_run.encoded_vllm[index], engine_run.encoded_hf[index]
    assert len(served) == len(adapter)
    for ours, theirs in zip(served, adapter, strict=True):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "index", range(len(TOWER_METHODS)), ids=[f"{t}-{c}" for t, c in TOWER_METHODS]
)
def test_vllm_towers_keep_the_adapters_tokens(engine_run: EngineRun, index: int):
    """vLLM's CLIP and SigLIP, unrolled layer by layer for the q/k, reduce like the adapter's
    Hugging Face towers."""
    served, adapter = engine_run.tower_vllm[index], engine_run.tower_hf[index]
    assert served["lengths"].tolist() == adapter.lengths.tolist()
    assert torch.equal(served["index"], adapter.index)
    torch.testing.assert_close(served["tokens"], adapter.tokens, rtol=1e-4, atol=1e-5)
    # Built up to the deepest layer read: PruMerge's attention layer is one past the features.
    tower, config = TOWER_METHODS[index]
    method = build_method(config["method"], **{k: v for k, v in config.items() if k != "method"})
    assert served["layers_built"] == layers_needed(
        layout_of(engine_run.tower_configs[tower], method)
    )
