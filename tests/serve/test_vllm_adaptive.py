"""Adaptive PruMerge served: each image's own count, counted in the plugin's processor.

Needs the vLLM environment (scripts/setup-vllm.sh); skipped without it. See conftest.py.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tests.serve.conftest import EXAMPLES, IN_PROCESSOR, MAX_TOKENS, AdaptiveRun


def test_adaptive_answers_equal_the_hugging_face_path(adaptive_run: AdaptiveRun):
    """Parity: greedy answers with PruMerge's per-image IQR count, served and in Python."""
    texts = adaptive_run.vllm["texts"]
    assert len(texts) == len(adaptive_run.hf_texts) == len(adaptive_run.items) >= 27
    differ = [
        f"{item['question']!r} ({item['image']}): vLLM {v!r}, Hugging Face {h!r}"
        for item, v, h in zip(adaptive_run.items, texts, adaptive_run.hf_texts, strict=True)
        if v.strip() != h.strip()
    ]
    assert not differ, f"{len(differ)} of {len(texts)} answers differ:\n" + "\n".join(differ)
    assert all(t.strip() for t in texts)
    assert all(len(ids) <= MAX_TOKENS for ids in adaptive_run.vllm["token_ids"])


def test_each_image_gets_its_own_count_of_placeholders(adaptive_run: AdaptiveRun):
    """The prompt of each request holds the adapter's count for its image, and the counts
    differ between images (the example images keep 17, 30 and 14 patches)."""
    counts = []
    for ids, text_length, tokens_out in zip(
        adaptive_run.vllm["prompt_token_ids"],
        adaptive_run.text_prompt_lengths,
        adaptive_run.hf_tokens_out,
        strict=True,
    ):
        count = ids.count(adaptive_run.image_token_id)
        assert count == tokens_out
        # What usage's prompt_tokens reports: the text, and this image's own count.
        assert len(ids) == text_length - 1 + count
        counts.append(count)
    examples = counts[-len(EXAMPLES) :]
    assert len(set(examples)) == len(EXAMPLES), examples
    assert max(counts) < 256 // 4  # reduced, not the 256 patches


def _pixels(path: str) -> bytes:
    with Image.open(path) as image:
        return image.convert("RGB").tobytes()


def test_the_same_image_again_hits_the_processor_and_prefix_caches(adaptive_run: AdaptiveRun):
    """Sent again, the examples skip the tower (processor cache), reuse their prompt's KV
    (prefix cache), and get the same count and answers."""
    first = adaptive_run.vllm
    repeat = first["repeat"]
    # The tower ran once per distinct image: the questions share their images, and the
    # processor cache served the repeats within the first batch too.
    # (vLLM hashes an image's pixels: examples/easy-vqa-test-0.png is easy-vqa's 0.png.)
    distinct = {_pixels(item["image"]) for item in adaptive_run.items}
    assert len(distinct) < len(adaptive_run.items)
    assert first["images_reduced"] == len(distinct)
    assert repeat["images_reduced"] == 0
    for position, index in enumerate(adaptive_run.repeat):
        assert repeat["prompt_token_ids"][position] == first["prompt_token_ids"][index]
        assert repeat["texts"][position] == first["texts"][index]
        # Whole blocks of the prompt (32 tokens, image placeholders among them) were cached.
        assert repeat["num_cached_tokens"][position] >= 32
        assert repeat["num_cached_tokens"][position] >= first["num_cached_tokens"][index]
    # The astronaut's image is new in the first batch: its hit came from that first request.
    assert first["num_cached_tokens"][adaptive_run.repeat[0]] == 0


@pytest.mark.parametrize("index", range(len(IN_PROCESSOR)), ids=[str(c) for c in IN_PROCESSOR])
def test_processor_reduction_equals_the_adapter(adaptive_run: AdaptiveRun, index: int):
    """The processor's tower and reduction (PruMerge and PruMerge+, adaptive) give the
    adapter's tokens, one count per image."""
    served, adapter = adaptive_run.in_processor_vllm[index], adaptive_run.in_processor_hf[index]
    assert [len(t) for t in served] == [len(t) for t in adapter]
    for ours, theirs in zip(served, adapter, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    if IN_PROCESSOR[index]["method"] == "prumerge+":
        assert len({len(t) for t in served}) > 1  # adaptive: the counts differ


def test_a_failing_reduction_is_an_error_for_that_request_only(adaptive_run: AdaptiveRun):
    """A request whose reduction raises gets vLLM's error; the engine then still answers."""
    (fault,) = adaptive_run.vllm["faults"]
    assert fault is not None and "the reduction failed on a flat image" in fault
    after = adaptive_run.vllm["after_faults"]
    assert after["texts"] == adaptive_run.vllm["texts"][:1]
