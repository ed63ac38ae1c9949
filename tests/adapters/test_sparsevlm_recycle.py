"""SparseVLM v1's recycling through the shared staged mechanism. On LLaMA's 1-D positions each
row of a batch equals the row alone and the KV cache gives what recomputing the whole sequence
gives (the recycled tokens are rebuilt in every pass over the prompt). On M-RoPE decoders the
recycled tokens take their centres' slots, and each row equals the row alone."""

import torch

import prumerge

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


def test_m_rope_decoders_recycle_in_place():
    # Qwen2.5-VL keeps M-RoPE's original 3-D indices, so no token moves: the kept tokens stay
    # in their slots and each cluster's mean takes the slot of its centre (one of its
    # members); every row still equals the row alone. (No check against decoding without
    # the cache here: recomputed, the generated tokens join the raters and rank anew.)
    case = CASES["qwen2_5_vl"]
    model = case.build("sdpa", 0)
    inputs = build_batch(case, model, ROWS)
    with prumerge.apply(model, "sparsevlm", **V1) as handle:
        assert handle.fastv.recycle and handle.fastv.in_place
        disarm = handle.fastv.disarm
        handle.fastv.disarm = lambda: None  # keep the call's state for inspection
        with torch.no_grad():
            model(**{k: v for k, v in inputs.items() if k != "counts"})
        rewrites, dropped = handle.fastv.call.rewrites, handle.fastv.call.dropped
        disarm()
        handle.fastv.disarm = disarm
        batch = generate(model, inputs, suppress_tokens=SPECIAL)
        together = handle.stats.tokens_out
        for i, row in enumerate(ROWS):
            one = build_batch(case, model, [row])
            assert (
                answers(batch, inputs)[i]
                == answers(generate(model, one, suppress_tokens=SPECIAL), one)[0]
            )
    stages = [handle.method.stages(n) for n in inputs["counts"]]
    assert together == [sum(s[-1][1:]) for s in stages] and all(s[-1][2] > 0 for s in stages)
    last = rewrites[-1]
    for row in range(len(ROWS)):
        mine = last.batch == row
        targets, sources = last.target[mine], last.source[mine]
        assert set(targets.tolist()) <= set(sources.tolist())  # a centre is its cluster's
        assert len(set(targets.tolist())) == stages[row][-1][2]
        assert not dropped[row, targets].any()  # the clusters reach the last layer
        for t in set(targets.tolist()):  # each cluster token is its members' mean
            torch.testing.assert_close(
                last.weight[mine][targets == t].sum(),
                torch.tensor(1.0, dtype=torch.float64),
                atol=1e-5,
                rtol=0,
            )
