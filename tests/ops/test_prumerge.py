import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from prumerge.ops import Reduction, cls_attention, prumerge

from .reference import prumerge_row


def make_inputs(batch=3, n=64, width=16, key_width=8, seed=0, peak=4.0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, n, width, generator=gen)
    keys = torch.randn(batch, n, key_width, generator=gen)
    attn = (torch.randn(batch, n, generator=gen) * peak).softmax(dim=-1)
    return tokens, keys, attn


def assert_matches_reference(result: Reduction, tokens, keys, attn, **options):
    for b in range(tokens.shape[0]):
        expected, index = prumerge_row(tokens[b], keys[b], attn[b], **options)
        length = int(result.lengths[b])
        assert length == len(index)
        assert result.index[b, :length].tolist() == index
        torch.testing.assert_close(
            result.tokens[b, :length].double(), expected, rtol=1e-5, atol=1e-5
        )
        assert (result.tokens[b, length:] == 0).all()
        assert (result.index[b, length:] == -1).all()


OPTION_GRID = [
    dict(zip(("keep", "plus", "supplement", "merge", "order"), combo, strict=True))
    for combo in itertools.product(
        [None, 9, 0.3],
        [False, True],
        [True, False],
        ["sum", "mean", "none"],
        ["raster", "attention"],
    )
] + [
    dict(keep=keep, plus=True, spatial="grid", order=order)
    for keep in (None, 9, 0.3)
    for order in ("raster", "attention")
]


@pytest.mark.parametrize("options", OPTION_GRID, ids=lambda o: "-".join(map(str, o.values())))
def test_matches_slow_reference(options):
    tokens, keys, attn = make_inputs(seed=len(str(options)))
    result = prumerge(tokens, keys, attn, knn=5, **options)
    assert_matches_reference(result, tokens, keys, attn, knn=5, **options)


@pytest.mark.parametrize("spatial", ["stride", "grid"])
def test_matches_reference_on_non_square_grid_with_plus(spatial):
    tokens, keys, attn = make_inputs(n=48)
    options = dict(plus=True, grid=(6, 8), knn=7, spatial=spatial)
    result = prumerge(tokens, keys, attn, **options)
    assert_matches_reference(result, tokens, keys, attn, **options)


@pytest.mark.parametrize("peak", [0.0, 2.0, 8.0, 40.0])
def test_stride_samples_at_every_outlier_count(peak):
    # From one outlier to most of the patches: the release's stride rule where its s >= 2,
    # the real-valued stride where it would be 1 (every patch) or 0 (a crash).
    # 64 patches: s >= 2 below 11 outliers, s = 1 from 11 to 21, s = 0 from 22 on.
    tokens, keys, attn = make_inputs(batch=2, n=64, seed=3, peak=peak)
    for min_keep in (1, 12, 24, 40):
        options = dict(plus=True, knn=3, min_keep=min_keep)
        result = prumerge(tokens, keys, attn, **options)
        assert_matches_reference(result, tokens, keys, attn, **options)


def test_stride_samples_by_hand():
    from prumerge.ops.select import stride_samples

    # 576 patches: 8 outliers -> ratio 1/72, s = 72 // 3 = 24: indices 0, 24, ..., 552.
    # 100 outliers -> int(5.76) = 5, s = 1 in the release (every index below 575); here the
    # real stride 576 / 300 = 1.92: indices floor(1.92 k), 300 of them.
    # 200 outliers -> s = 0 in the release (a crash); here 576 / 600 < 1: every index < 575.
    sampled = stride_samples(torch.tensor([8, 100, 200]), 576)
    assert sampled[0].nonzero().flatten().tolist() == list(range(0, 575, 24))
    assert sampled[1].nonzero().flatten().tolist() == sorted({int(1.92 * k) for k in range(300)})
    assert sampled[2].nonzero().flatten().tolist() == list(range(575))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    batch=st.integers(1, 5),
    side=st.integers(2, 9),
    keep=st.one_of(st.none(), st.integers(1, 90), st.floats(0.01, 1.0)),
    plus=st.booleans(),
    supplement=st.booleans(),
    merge=st.sampled_from(["sum", "mean", "none"]),
    knn=st.integers(0, 100),
    peak=st.sampled_from([0.0, 1.0, 6.0]),
)
def test_batch_independence_and_invariants(
    seed, batch, side, keep, plus, supplement, merge, knn, peak
):
    n = side * side
    tokens, keys, attn = make_inputs(batch, n, seed=seed, peak=peak)
    options = dict(keep=keep, plus=plus, supplement=supplement, merge=merge, knn=knn)
    together = prumerge(tokens, keys, attn, **options)
    for b in range(batch):
        alone = prumerge(tokens[b : b + 1], keys[b : b + 1], attn[b : b + 1], **options)
        length = int(alone.lengths[0])
        assert int(together.lengths[b]) == length
        assert torch.equal(together.index[b, :length], alone.index[0, :length])
        torch.testing.assert_close(together.tokens[b, :length], alone.tokens[0, :length])
        torch.testing.assert_close(together.assignment[b], alone.assignment[0])
    # Raster order: the patch indices of the kept tokens increase along each row.
    kept = together.index
    for row in kept:
        patches = row[row >= 0]
        assert (patches[1:] > patches[:-1]).all()
    # A fixed budget is met exactly (it counts the supplement token).
    if keep is not None:
        budget = min(keep, n) if isinstance(keep, int) else max(1, min(n, round(keep * n)))
        assert together.lengths.tolist() == [budget] * batch
    # Every patch is represented by a valid slot; a kept patch by its own.
    assert (together.assignment >= 0).all()
    assert (together.assignment < together.lengths[:, None]).all()
    slots = together.index.gather(1, together.assignment)
    positions = torch.arange(n).expand(batch, n)
    assert torch.equal(slots == positions, together.kept_mask)


def test_flat_attention_keeps_min_keep_lowest_indices():
    tokens, keys, _ = make_inputs(batch=2, n=36)
    flat = torch.full((2, 36), 1 / 36)
    result = prumerge(tokens, keys, flat, min_keep=3)
    assert result.lengths.tolist() == [4, 4]  # 3 kept + supplement
    assert result.index[:, :3].tolist() == [[0, 1, 2], [0, 1, 2]]


def test_deterministic_with_ties():
    tokens, _, _ = make_inputs(batch=2, n=25)
    keys = torch.ones(2, 25, 4)  # all key similarities tie
    attn = torch.full((2, 25), 0.04)
    runs = [prumerge(tokens, keys, attn, keep=6, plus=True, knn=3) for _ in range(3)]
    for other in runs[1:]:
        assert torch.equal(runs[0].tokens, other.tokens)
        assert torch.equal(runs[0].index, other.index)


def test_budget_at_least_n_returns_all_tokens_unmerged():
    tokens, keys, attn = make_inputs(n=49)
    for keep in (49, 1000, 1.0):
        result = prumerge(tokens, keys, attn, keep=keep)
        assert torch.equal(result.tokens, tokens)
        assert result.index.tolist() == [list(range(49))] * 3


def test_knn_is_clamped():
    tokens, keys, attn = make_inputs(n=16)
    big = prumerge(tokens, keys, attn, keep=5, knn=10_000)
    exact = prumerge(tokens, keys, attn, keep=5, knn=15)
    assert torch.equal(big.tokens, exact.tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtype_and_device_preserved(dtype):
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        tokens, keys, attn = (t.to(device) for t in make_inputs())
        result = prumerge(tokens.to(dtype), keys.to(dtype), attn.to(dtype), plus=True)
        assert result.tokens.dtype == dtype
        assert result.tokens.device.type == device
        assert result.index.device.type == device
        reference = prumerge(tokens, keys, attn.to(dtype).float(), plus=True)
        assert torch.equal(result.index, reference.index)


def test_bad_inputs_raise_value_error():
    tokens, keys, attn = make_inputs()
    with pytest.raises(ValueError, match="NaN"):
        prumerge(tokens.clone().fill_(float("nan")), keys, attn)
    with pytest.raises(ValueError, match="inf"):
        prumerge(tokens, keys, attn.clone().fill_(float("inf")))
    with pytest.raises(ValueError, match="keys must be"):
        prumerge(tokens, keys[:, :10], attn)
    with pytest.raises(ValueError, match="cls_attn must be"):
        prumerge(tokens, keys, attn[:1])
    with pytest.raises(ValueError, match="square"):  # the grid sampler needs the grid
        prumerge(tokens[:, :60], keys[:, :60], attn[:, :60], plus=True, spatial="grid")
    with pytest.raises(ValueError, match="spatial"):
        prumerge(tokens, keys, attn, plus=True, spatial="uniform")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="merge"):
        prumerge(tokens, keys, attn, merge="avg")  # type: ignore[arg-type]


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _op_count(batch, n, **options):
    tokens, keys, attn = make_inputs(batch, n)
    counter = _CountOps()
    with counter:
        prumerge(tokens, keys, attn, **options)
    return counter.calls


@pytest.mark.parametrize("options", [{}, {"plus": True}, {"keep": 0.25, "merge": "mean"}])
def test_no_python_loops_over_rows_or_tokens(options):
    # The number of tensor ops dispatched does not grow with the batch or the token count.
    spatial_warmup = _op_count(1, 16, **options) and _op_count(1, 64, **options)
    assert spatial_warmup
    assert _op_count(1, 16, **options) == _op_count(8, 16, **options) == _op_count(8, 64, **options)


def test_end_to_end_with_cls_attention():
    torch.manual_seed(3)
    q, k = torch.randn(2, 2, 1 + 36, 32).unbind(0)
    attn = cls_attention(q, k, num_heads=4)
    tokens = torch.randn(2, 36, 32)
    result = prumerge(tokens, k[:, 1:], attn, knn=4)
    assert_matches_reference(result, tokens, k[:, 1:], attn, knn=4)


@pytest.mark.parametrize("loop", ["prumerge_loop", "prumerge_released_loop"])
def test_the_speed_benchmarks_loops_agree(loop):
    from tests.scripts import BENCHMARKS, load_script

    loop_fn = getattr(load_script("prumerge_loops", BENCHMARKS), loop)
    tokens, keys, attn = make_inputs(batch=4, n=100, width=32)
    result = prumerge(tokens, keys, attn, knn=8)
    for row, expected in zip(result.unpad(), loop_fn(tokens, keys, attn, knn=8), strict=True):
        torch.testing.assert_close(row, expected, rtol=1e-5, atol=1e-5)
