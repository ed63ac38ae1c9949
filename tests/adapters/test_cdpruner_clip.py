"""``cdpruner`` with ``relevance="clip"`` on the families: LLaVA-NeXT's views (a CLIP tower)
run it; Qwen2.5-VL, whose merger leaves no per-patch tower features, refuses it in one line."""

from pathlib import Path

import pytest

import prumerge
from prumerge.errors import PrumergeError
from tests.eval.tiny_model import build_tokenizer
from tests.tiny_clip import save_tiny_clip

from .families import CASES, build_batch
from .test_families import ROWS, generate


def _kept(handle) -> list[list[int]]:
    return [row.tolist() for r in handle.last_reductions for row in r.index]


def test_llava_next_views_take_their_relevance_from_clip(tmp_path: Path) -> None:
    case = CASES["llava_next"]
    model = case.build("sdpa", 0)
    checkpoint = save_tiny_clip(tmp_path / "clip", model.model.vision_tower)
    inputs = build_batch(case, model, ROWS)
    options = dict(keep=9, relevance="clip", text_tower=str(checkpoint))
    with prumerge.apply(model, "cdpruner", processor=build_tokenizer(), **options) as handle:
        out = generate(model, inputs, max_new_tokens=2)
        assert handle.stats.tokens_out == [9, 9, 9]  # 8 content tokens + one newline
        clip = _kept(handle)
    with prumerge.apply(model, "cdpruner", keep=9) as handle:
        generate(model, inputs, max_new_tokens=2)
        assert _kept(handle) != clip  # the LLM relevance weighs other patches
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


def test_qwen2_5_vl_refuses_clip_relevance_in_one_line(tmp_path: Path) -> None:
    case = CASES["qwen2_5_vl"]
    model = case.build("sdpa", 0)
    checkpoint = save_tiny_clip(
        tmp_path / "clip", CASES["llava"].build("sdpa", 0).model.vision_tower
    )
    inputs = build_batch(case, model, ROWS)
    options = dict(keep=0.5, relevance="clip", text_tower=str(checkpoint))
    handle = prumerge.apply(model, "cdpruner", processor=build_tokenizer(), **options)
    with handle, pytest.raises(PrumergeError, match="no per-patch tower features") as info:
        generate(model, inputs, max_new_tokens=1)
    assert "\n" not in str(info.value)
