"""The method zoo's ops on hand-worked examples, against slow per-row references, and for loops.

Registry-wide properties (budgets, batch independence, dtypes, keep >= N) are tested for every
registered method in tests/methods/test_registry.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from prumerge.ops import (
    cls_topk,
    divprune,
    pooled_grid,
    random_sample,
    spatial_pool,
    tome,
    visionzip,
)
from prumerge.ops.visionzip import contextual_count


def make_inputs(batch=3, n=64, width=16, key_width=8, seed=0, peak=4.0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, n, width, generator=gen)
    keys = torch.randn(batch, n, key_width, generator=gen)
    attn = (torch.randn(batch, n, generator=gen) * peak).softmax(dim=-1)
    return tokens, keys, attn


def scalar_tokens(n: int) -> torch.Tensor:
    """(1, n, 2) tokens whose first channel is the patch index and second is 1."""
    return torch.stack([torch.arange(n, dtype=torch.float32), torch.ones(n)], dim=1)[None]


def unit_angles(degrees) -> torch.Tensor:
    """(1, n, 2) unit vectors at the given angles."""
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1)[None].float()


# ---- random ---------------------------------------------------------------------------------


def test_random_is_seeded_per_image_and_uniform():
    tokens, _, _ = make_inputs(batch=4, n=36)
    a = random_sample(tokens, keep=9, seed=3)
    assert torch.equal(a.index, random_sample(tokens, keep=9, seed=3).index)
    assert not torch.equal(a.index, random_sample(tokens, keep=9, seed=4).index)
    assert len({tuple(row.tolist()) for row in a.index}) == 4  # every image its own sample
    # A row's sample depends on the row only, not on its place in the batch.
    flipped = random_sample(tokens.flip(0), keep=9, seed=3)
    assert torch.equal(flipped.index, a.index.flip(0))
    # Kept tokens are the patches themselves.
    assert torch.equal(a.tokens, tokens.gather(1, a.index[..., None].expand(-1, -1, 16)))
    # Over many seeds every patch is kept about keep/N of the time.
    counts = torch.zeros(16)
    for seed in range(300):
        result = random_sample(tokens[:1, :16], keep=4, seed=seed)
        counts += result.kept_mask[0].float()
    frequency = counts / 300
    assert (frequency - 0.25).abs().max() < 0.1, frequency


def test_random_rejects_bad_seed():
    tokens, _, _ = make_inputs()
    for seed in (-1, 2**32, 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            random_sample(tokens, keep=4, seed=seed)


# ---- pool -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "cols", "budget", "expected"),
    [
        (24, 24, 144, (12, 12)),  # 2x2 pooling
        (24, 24, 64, (8, 8)),  # 3x3 pooling
        (24, 24, 192, (12, 16)),  # the most cells within the aspect bound
        (24, 24, 32, (5, 6)),  # 4x8 would distort the aspect by 2x
        (24, 24, 575, (23, 24)),
        (16, 16, 64, (8, 8)),
        (2, 8, 4, (1, 4)),
        (4, 4, 1, (1, 1)),
    ],
)
def test_pooled_grid(rows, cols, budget, expected):
    assert pooled_grid(rows, cols, budget) == expected


def test_pool_two_by_two_by_hand():
    tokens = scalar_tokens(16)  # 4x4 grid, channel 0 = patch index
    result = spatial_pool(tokens, keep=4)
    # Cell (0, 0) holds patches 0, 1, 4, 5, whose mean index is 2.5, and so on.
    assert result.tokens[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]
    assert result.tokens[0, :, 1].tolist() == [1.0] * 4
    assert result.assignment[0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
    assert result.index.tolist() == [[-1] * 4]
    assert result.lengths.tolist() == [4]


def test_pool_adaptive_and_non_square():
    tokens, _, _ = make_inputs(batch=2, n=9)
    result = spatial_pool(tokens, keep=4)  # 3x3 -> 2x2 with overlapping windows
    image = tokens.transpose(1, 2).reshape(2, 16, 3, 3)
    expected = F.adaptive_avg_pool2d(image, (2, 2)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(result.tokens, expected)
    # Each patch is assigned to a cell that contains it: the centre to the first.
    assert result.assignment[0].tolist() == [0, 0, 1, 0, 0, 1, 2, 2, 3]
    wide = spatial_pool(scalar_tokens(16), keep=4, grid=(2, 8))
    assert wide.tokens[0, :, 0].tolist() == [4.5, 6.5, 8.5, 10.5]
    with pytest.raises(ValueError, match="square"):
        spatial_pool(scalar_tokens(12), keep=4)
    # A budget that fits no grid exactly gives fewer tokens, never more.
    assert spatial_pool(make_inputs(n=576, width=4)[0], keep=32).lengths.tolist() == [30] * 3


# ---- cls_topk -------------------------------------------------------------------------------


def test_cls_topk_by_hand():
    tokens = scalar_tokens(16)
    attn = torch.full((1, 16), 0.01)
    attn[0, [9, 2, 14]] = torch.tensor([0.5, 0.3, 0.2])
    # Keys: patches in the top half point one way, the bottom half the other.
    keys = torch.zeros(1, 16, 2)
    keys[0, :8, 0] = 1.0
    keys[0, 8:, 1] = 1.0
    keys[0, 2] = torch.tensor([1.0, 0.0])
    keys[0, 9] = torch.tensor([0.1, 1.0])
    keys[0, 14] = torch.tensor([0.0, 1.0])
    result = cls_topk(tokens, attn, keys=keys, keep=3)
    assert result.index.tolist() == [[2, 9, 14]]  # raster order, not attention order
    assert result.tokens[0, :, 0].tolist() == [2.0, 9.0, 14.0]
    assert result.attention_selected[0].nonzero().flatten().tolist() == [2, 9, 14]
    # Top half -> patch 2 (slot 0); bottom half -> patch 14 (slot 2, key (0, 1) exactly).
    expected = [0] * 8 + [2] * 8
    expected[9] = 1
    assert result.assignment[0].tolist() == expected


def test_cls_topk_ties_go_to_lower_index():
    tokens, keys, _ = make_inputs(batch=2, n=16)
    result = cls_topk(tokens, torch.ones(2, 16), keys=keys, keep=4)
    assert result.index.tolist() == [[0, 1, 2, 3]] * 2


# ---- visionzip ------------------------------------------------------------------------------


def test_visionzip_paper_split():
    assert [contextual_count(10 / 64, b) for b in (64, 128, 192)] == [10, 20, 30]
    assert contextual_count(3, 2) == 2
    with pytest.raises(ValueError, match="contextual"):
        contextual_count(-1, 10)
    with pytest.raises(ValueError, match="contextual"):
        contextual_count(1.5, 10)


def _visionzip_hand_inputs():
    tokens = scalar_tokens(16)
    attn = torch.full((1, 16), 0.01)
    attn[0, [5, 10, 15]] = 0.3
    # Targets: the remaining patches are 0 1 2 3 4 6 7 8 9 11 12 13 14; R = 13, two
    # contextual tokens, step 13 // 2 = 6, so the targets are positions 0 and 6: patches 0, 7.
    keys = torch.zeros(1, 16, 2)
    keys[0, :8] = torch.tensor([1.0, 0.1])  # rows 0-1 lean to patch 0's key
    keys[0, 8:] = torch.tensor([0.1, 1.0])  # rows 2-3 lean to patch 7's key
    keys[0, 0] = torch.tensor([1.0, 0.0])
    keys[0, 7] = torch.tensor([0.0, 1.0])
    return tokens, keys, attn


def test_visionzip_by_hand():
    tokens, keys, attn = _visionzip_hand_inputs()
    result = visionzip(tokens, keys, attn, keep=5, contextual=2)
    assert result.index.tolist() == [[5, 10, 15, -1, -1]]
    assert result.lengths.tolist() == [5]
    first = result.tokens[0, :, 0].tolist()
    assert first[:3] == [5.0, 10.0, 15.0]
    # The released formula: the target plus the mean of the patches assigned to it.
    assert first[3] == pytest.approx(0 + (1 + 2 + 3 + 4 + 6) / 5)
    assert first[4] == pytest.approx(7 + (8 + 9 + 11 + 12 + 13 + 14) / 6)
    assert result.tokens[0, :, 1].tolist() == pytest.approx([1.0] * 3 + [2.0] * 2)
    groups = [3] * 16
    groups[5], groups[10], groups[15] = 0, 1, 2
    for patch in (7, 8, 9, 11, 12, 13, 14):
        groups[patch] = 4
    assert result.assignment[0].tolist() == groups
    assert result.attention_selected[0].nonzero().flatten().tolist() == [5, 10, 15]


def test_visionzip_mean_option_by_hand():
    tokens, keys, attn = _visionzip_hand_inputs()
    result = visionzip(tokens, keys, attn, keep=5, contextual=2, contextual_merge="mean")
    first = result.tokens[0, :, 0].tolist()
    # The plain mean of the target and its members (prumerge's former default).
    assert first[3] == pytest.approx((0 + 1 + 2 + 3 + 4 + 6) / 6)
    assert first[4] == pytest.approx((7 + 8 + 9 + 11 + 12 + 13 + 14) / 7)
    assert result.tokens[0, :, 1].tolist() == pytest.approx([1.0] * 5)  # means, not sums


def test_visionzip_sends_cls_first_within_the_budget():
    tokens, keys, attn = _visionzip_hand_inputs()
    cls = torch.tensor([[-1.0, 4.0]])
    # keep=5 with two contextual tokens: [CLS] and the two most attended patches (5, 10 or
    # 15; ties go to the lower index, so 15 joins the remaining patches).
    result = visionzip(tokens, keys, attn, keep=5, contextual=2, cls_token=cls)
    assert result.index.tolist() == [[-1, 5, 10, -1, -1]]
    assert result.tokens[0, 0].tolist() == [-1.0, 4.0]
    assert result.tokens[0, 1:3, 0].tolist() == [5.0, 10.0]
    assert result.lengths.tolist() == [5]
    assert (result.assignment[0] != 0).all()  # no patch stands behind [CLS]
    only_cls = visionzip(tokens, keys, attn, keep=1, contextual=0, cls_token=cls)
    assert only_cls.tokens.tolist() == [[[-1.0, 4.0]]]
    assert only_cls.assignment.tolist() == [[0] * 16]


def visionzip_row(x, keys, attn, keep, n_ctx, merge="target_plus_mean"):
    """Slow VisionZip for one image: Python lists, explicit tie-breaking."""
    n = x.shape[0]
    a = attn.tolist()
    dominant = sorted(sorted(range(n), key=lambda j: (-a[j], j))[: keep - n_ctx])
    rest = [j for j in range(n) if j not in dominant]
    targets = rest[:: max(1, len(rest) // n_ctx)][:n_ctx] if n_ctx else []
    unit = F.normalize(keys.double(), dim=-1)
    groups = {t: [] for t in targets}
    for j in rest:
        if j in targets or not targets:
            continue
        sims = [float(unit[j] @ unit[t]) for t in targets]
        groups[targets[sims.index(max(sims))]].append(j)
    out = [x[j].double() for j in dominant]
    for t in targets:
        members = [x[j].double() for j in groups[t]]
        total = sum(members, torch.zeros_like(x[t].double()))
        if merge == "target_plus_mean":
            out.append(x[t].double() + total / max(len(members), 1))
        else:
            out.append((x[t].double() + total) / (1 + len(members)))
    return torch.stack(out), dominant


@pytest.mark.parametrize("merge", ["target_plus_mean", "mean"])
@pytest.mark.parametrize(("keep", "n_ctx"), [(12, 3), (20, 1), (7, 0), (5, 5), (63, 10)])
def test_visionzip_matches_slow_reference(keep, n_ctx, merge):
    tokens, keys, attn = make_inputs(n=64)
    result = visionzip(tokens, keys, attn, keep=keep, contextual=n_ctx, contextual_merge=merge)
    for b in range(3):
        expected, dominant = visionzip_row(tokens[b], keys[b], attn[b], keep, n_ctx, merge)
        assert result.index[b].tolist() == dominant + [-1] * n_ctx
        torch.testing.assert_close(result.tokens[b].double(), expected, rtol=1e-5, atol=1e-6)


# ---- tome -----------------------------------------------------------------------------------


def test_tome_one_round_by_hand():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [5.0, 1.0]]])
    # A = {0, 2}, B = {1, 3}. Patch 0 matches 3 (cos 0.99), patch 2 matches 1 (cos 0.9).
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.44, 0.9], [0.99, 0.141]]])
    one = tome(x, keys, keep=3)
    # Only the best-matched A token (0) merges, into 3; representatives 1, 2, 3.
    assert one.index.tolist() == [[1, 2, 3]]
    torch.testing.assert_close(one.tokens[0], torch.tensor([[0.0, 2.0], [3.0, 3.0], [3.0, 0.5]]))
    assert one.assignment.tolist() == [[2, 0, 1, 2]]
    two = tome(x, keys, keep=2)
    assert two.index.tolist() == [[1, 3]]
    torch.testing.assert_close(two.tokens[0], torch.tensor([[1.5, 2.5], [3.0, 0.5]]))
    assert two.assignment.tolist() == [[1, 0, 0, 1]]


def test_tome_later_rounds_weigh_by_size():
    # keep=2 of 4 with r=1 takes two rounds. Round 1: A = {0, 2}, B = {1, 3}; patch 0 matches
    # 3 (cos 0.96) better than 2 matches 3 (cos 0.6), so 0 merges into 3: [2, 1, g = {0, 3}].
    # Round 2: A = {2, g}, B = {1}; g's mean key (0.71, 0.71) beats 2's (1, 0), so g merges
    # into 1 with weight 2: (3 + 2 * 4.5) / 3 = 4, not the pairwise mean 3.75.
    x = torch.tensor([[[0.0], [3.0], [6.0], [9.0]]])
    keys = torch.tensor([[[0.8, 0.6], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]]])
    result = tome(x, keys, keep=2, r=1)
    assert result.index.tolist() == [[1, 2]]
    assert result.tokens[0, :, 0].tolist() == pytest.approx([4.0, 6.0])
    assert result.assignment.tolist() == [[0, 0, 1, 0]]


@pytest.mark.parametrize("r", [None, 1, 5, 40])
@pytest.mark.parametrize("keep", [1, 7, 0.3, 63])
def test_tome_tokens_are_group_means(keep, r):
    # Size-weighted merging makes every output token the mean of the patches it holds, so
    # the size-weighted sum of the outputs equals the sum of the inputs.
    tokens, keys, _ = make_inputs(n=64)
    tokens64 = tokens.double()
    result = tome(tokens64, keys.double(), keep=keep, r=r)
    sizes = F.one_hot(result.assignment, result.tokens.shape[1]).sum(1)  # (B, K)
    assert (sizes >= 1).all()
    weighted = (sizes[..., None] * result.tokens).sum(1)
    torch.testing.assert_close(weighted, tokens64.sum(1))
    members = F.one_hot(result.assignment, result.tokens.shape[1]).double()  # (B, N, K)
    means = members.transpose(1, 2) @ tokens64 / sizes[..., None]
    torch.testing.assert_close(result.tokens, means)
    # Each output token holds its representative patch; representatives are in raster order.
    assert torch.equal(
        result.assignment.gather(1, result.index),
        torch.arange(result.index.shape[1]).expand_as(result.index),
    )
    assert (result.index[:, 1:] > result.index[:, :-1]).all()


def tome_row(x, keys, keep, r=None):
    """Slow ToMe for one image: groups of patch ids, Python loops over tokens."""
    groups = [[j] for j in range(x.shape[0])]
    while len(groups) > keep:
        t = len(groups)
        r_t = min(t // 2, t - keep, r or t)
        metric = [F.normalize(keys[g].double().sum(0), dim=0) for g in groups]
        a, b = list(range(0, t, 2)), list(range(1, t, 2))
        best = []
        for i in a:
            sims = [float(metric[i] @ metric[j]) for j in b]
            best.append((max(sims), sims.index(max(sims))))
        order = sorted(range(len(a)), key=lambda i: (-best[i][0], i))
        merged = {b_i: list(groups[b[b_i]]) for b_i in range(len(b))}
        for i in order[:r_t]:
            merged[best[i][1]] += groups[a[i]]
        # Unmatched A tokens come first, in matching order, as in ToMe.
        groups = [groups[a[i]] for i in order[r_t:]] + [merged[b_i] for b_i in range(len(b))]
    return groups


def test_tome_matches_slow_reference():
    tokens, keys, _ = make_inputs(n=36)
    for keep, r in ((9, None), (20, 3), (2, None)):
        result = tome(tokens, keys, keep=keep, r=r)
        for b in range(3):
            groups = tome_row(tokens[b], keys[b], keep, r)
            got = [
                sorted((result.assignment[b] == slot).nonzero().flatten().tolist())
                for slot in range(keep)
            ]
            assert sorted(map(sorted, groups)) == sorted(got)
            for slot, members in enumerate(got):
                torch.testing.assert_close(result.tokens[b, slot], tokens[b, members].mean(0))


# ---- divprune -------------------------------------------------------------------------------


def test_divprune_by_hand():
    # Angles 0, 10, 20, 120, 240 degrees; cosine distance 1 - cos(angle between).
    # Start: 240 is the most isolated (nearest other at 120 degrees). Next: 20 (140 degrees
    # from 240). Then 120 (100 degrees from 20, beats 0 and 10, which sit near 20).
    features = unit_angles([0, 10, 20, 120, 240])
    result = divprune(features, keep=3)
    assert result.index.tolist() == [[2, 3, 4]]
    assert torch.equal(result.tokens, features[:, 2:])
    assert result.assignment.tolist() == [[0, 0, 0, 1, 2]]
    first = divprune(features, keep=1)
    assert first.index.tolist() == [[4]]


def divprune_row(x, keep):
    unit = F.normalize(x.double(), dim=-1)
    n = x.shape[0]
    dist = [[1 - float(unit[i] @ unit[j]) for j in range(n)] for i in range(n)]
    isolation = [min(dist[i][j] for j in range(n) if j != i) for i in range(n)]
    chosen = [max(range(n), key=lambda i: (isolation[i], -i))]
    while len(chosen) < keep:
        rest = [j for j in range(n) if j not in chosen]
        chosen.append(max(rest, key=lambda j: (min(dist[c][j] for c in chosen), -j)))
    return sorted(chosen)


def test_divprune_matches_slow_reference():
    tokens, _, _ = make_inputs(n=49, width=6)
    for keep in (1, 5, 20):
        result = divprune(tokens, keep=keep)
        for b in range(3):
            assert result.index[b].tolist() == divprune_row(tokens[b], keep)


def test_divprune_with_duplicates_never_repeats_a_patch():
    tokens = torch.ones(2, 16, 4)  # all distances 0
    result = divprune(tokens, keep=5)
    assert result.index.tolist() == [[0, 1, 2, 3, 4]] * 2


# ---- shared ---------------------------------------------------------------------------------

OPS = {
    "random": lambda t, k, a, keep: random_sample(t, keep=keep, seed=1),
    "pool": lambda t, k, a, keep: spatial_pool(t, keep=keep),
    "cls_topk": lambda t, k, a, keep: cls_topk(t, a, keys=k, keep=keep),
    "visionzip": lambda t, k, a, keep: visionzip(t, k, a, keep=keep),
    "tome": lambda t, k, a, keep: tome(t, k, keep=keep),
    "tome_r": lambda t, k, a, keep: tome(t, k, keep=keep, r=2),
    "divprune": lambda t, k, a, keep: divprune(t, keep=keep),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_bad_inputs_raise_value_error(name):
    op = OPS[name]
    tokens, keys, attn = make_inputs(n=16)
    with pytest.raises(ValueError, match="NaN"):
        op(tokens.clone().fill_(float("nan")), keys, attn, 4)
    with pytest.raises(ValueError, match="tokens must be"):
        op(tokens[0], keys, attn, 4)
    with pytest.raises(ValueError, match="keep"):
        op(tokens, keys, attn, 0)
    with pytest.raises(ValueError, match="keep"):
        op(tokens, keys, attn, 1.5)
    if name in ("cls_topk", "visionzip", "tome", "tome_r"):
        with pytest.raises(ValueError, match="keys must be"):
            op(tokens, keys[:, :10], attn, 4)
    if name in ("cls_topk", "visionzip"):
        with pytest.raises(ValueError, match="cls_attn must be"):
            op(tokens, keys, attn[:1], 4)
        with pytest.raises(ValueError, match="inf"):
            op(tokens, keys, attn.clone().fill_(float("inf")), 4)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _op_count(name, batch, n, keep):
    tokens, keys, attn = make_inputs(batch, n)
    OPS[name](tokens, keys, attn, keep)  # warm caches (random's position weights)
    counter = _CountOps()
    with counter:
        OPS[name](tokens, keys, attn, keep)
    return counter.calls


@pytest.mark.parametrize("name", sorted(OPS))
def test_no_python_loops_over_rows_or_tokens(name):
    # The number of tensor ops does not grow with the batch, nor with N at a fixed count
    # budget (DivPrune loops over the kept count only; ToMe over rounds, which a budget
    # ratio fixes).
    keep = 0.25 if name.startswith("tome") else 4
    counts = {(b, n): _op_count(name, b, n, keep) for b, n in ((1, 16), (8, 16), (8, 64))}
    if name == "tome_r":
        # r=2 merges 2 per round: rounds grow with N, but not with the batch.
        assert counts[(1, 16)] == counts[(8, 16)]
    else:
        assert len(set(counts.values())) == 1, counts


def test_anchors_of_kept_merged_and_supplement_tokens():
    from prumerge.ops import Reduction, prumerge, spatial_pool

    torch.manual_seed(0)
    tokens, keys = torch.randn(2, 16, 8), torch.randn(2, 16, 4)
    attn = torch.randn(2, 16).softmax(-1)
    red = prumerge(tokens, keys, attn, keep=5)  # 4 kept patches + the supplement
    anchors = red.anchors()
    assert torch.equal(anchors[:, :4], red.index[:, :4])
    assert anchors[:, 4].tolist() == [15, 15]  # the supplement stands at the last patch
    pooled = spatial_pool(tokens, keep=4, grid=(4, 4))  # 2x2 cells of 2x2 patches
    assert pooled.anchors().tolist() == [[0, 2, 8, 10]] * 2  # each cell's top-left patch
    padded = Reduction(
        tokens=torch.zeros(1, 3, 2),
        lengths=torch.tensor([2]),
        index=torch.tensor([[3, -1, -1]]),
        assignment=torch.tensor([[0, 1, 1, 0]]),
        attention_selected=torch.zeros(1, 4, dtype=torch.bool),
    )
    assert padded.anchors().tolist() == [[3, 1, -1]]
