"""SparseVLM v1's recycling through the shared staged mechanism: each row of a batch equals
the row alone, the KV cache gives what recomputing the whole sequence gives (the recycled
tokens are rebuilt in every pass over the prompt), and M-RoPE decoders refuse it in one line."""

import pytest
import torch

import prumerge
from prumerge.errors import PrumergeError

from .families import CASES, build_batch
from .test_families import ROWS, SPECIAL, answers, generate, greedy_without_cache

V1 = {"keep": 0.3, "layers": "0,1", "version": "v1"}  # recycles, as the release's v1


def test_rows_alone_and_the_kv_cache_agree_with_recycling():
    case = CASES["llava"]
    model = case.build("sdpa", 0)
    inputs = build_batch(case, model, ROWS)
    with prumerge.apply(model, "sparsevlm", **V1) as handle:
        assert handle.fastv.recycle
        batch = generate(model, inputs, suppress_tokens=SPECIAL)
        together = handle.stats.tokens_out
        uncached = greedy_without_cache(model, inputs, steps=5)
        for i, row in enumerate(ROWS):
            one = build_batch(case, model, [row])
            assert (
                answers(batch, inputs)[i]
                == answers(generate(model, one, suppress_tokens=SPECIAL), one)[0]
            )
    assert answers(batch, inputs) == answers(uncached, inputs)
    stages = handle.method.stages(inputs["counts"][0])
    assert together == [sum(stages[-1][1:])] * 3 and stages[-1][2] > 0
    with prumerge.apply(model, "sparsevlm", **V1, recycle=False) as handle:
        generate(model, inputs)
        plain = handle.method.stages(inputs["counts"][0])
        assert handle.stats.tokens_out == [plain[-1][1]] * 3
    assert all(added == 0 for _, _, added in plain) and plain[-1][1] < together[0]


def test_m_rope_decoders_refuse_recycling_in_one_line():
    model = CASES["qwen2_5_vl"].build("sdpa", 0)
    with pytest.raises(PrumergeError, match="supported here: recycle=False") as info:
        prumerge.apply(model, "sparsevlm", **V1)
    assert "\n" not in str(info.value)
    inputs = build_batch(CASES["qwen2_5_vl"], model, ROWS)
    with prumerge.apply(model, "sparsevlm", **V1, recycle=False):
        out = generate(model, inputs, max_new_tokens=2)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    assert torch.isfinite(out.float()).all()
