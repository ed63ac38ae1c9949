import numpy as np
import pytest
import torch

from prumerge.ops import budget_count, iqr_keep_count, spatial_rank


def test_iqr_matches_numpy_per_row():
    torch.manual_seed(0)
    scores = torch.randn(4, 100).exp()
    expected = []
    for row in scores.numpy():
        q1, q3 = np.percentile(row, [25, 75])
        expected.append(int((row > q3 + 1.5 * (q3 - q1)).sum()))
    assert iqr_keep_count(scores, min_keep=0).tolist() == expected


def test_iqr_is_per_row_not_per_batch():
    # The released code takes percentiles over the whole batch: a peaked row next to a
    # flat row would then change the flat row's count. Ours must not.
    flat = torch.linspace(1.0, 1.1, 64)
    peaked = flat.clone()
    peaked[:3] = 50.0
    alone = iqr_keep_count(flat[None])
    together = iqr_keep_count(torch.stack([peaked, flat]))
    assert together[1] == alone[0]
    assert together[0] == 3
    # The batch-global fence would keep only the 3 peaks in both rows' pool.
    q1, q3 = np.percentile(torch.stack([peaked, flat]).numpy(), [25, 75])
    assert int((flat.numpy() > q3 + 1.5 * (q3 - q1)).sum()) != int(alone[0])


def test_iqr_flat_scores_keep_min_keep():
    assert iqr_keep_count(torch.ones(2, 16), min_keep=3).tolist() == [3, 3]
    assert iqr_keep_count(torch.ones(1, 2), min_keep=5).tolist() == [2]


def test_iqr_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        iqr_keep_count(torch.tensor([[1.0, float("nan")]]))


@pytest.mark.parametrize(
    ("keep", "count"), [(10, 10), (1000, 64), (0.25, 16), (1.0, 64), (0.001, 1)]
)
def test_budget_count(keep, count):
    assert budget_count(keep, 64) == count


@pytest.mark.parametrize("keep", [0, -3, 0.0, 1.5, True, "10"])
def test_budget_count_rejects(keep):
    with pytest.raises(ValueError):
        budget_count(keep, 64)


@pytest.mark.parametrize("grid", [(24, 24), (16, 16), (12, 20)])
def test_spatial_rank_prefixes_are_spread_out(grid):
    rows, cols = grid
    rank = spatial_rank(rows, cols)
    assert sorted(rank.tolist()) == list(range(rows * cols))
    cells = torch.cartesian_prod(torch.arange(rows), torch.arange(cols)).float()
    for count in (4, 9, 16, 36, 64, 100, 144):
        spacing = (rows * cols / count) ** 0.5  # side of a square cell of a perfect lattice
        sample = cells[rank < count]
        gaps = torch.cdist(sample, sample) + torch.eye(count) * 1e9
        # Farthest-point sampling: no two samples close together, no cell far from a sample.
        assert gaps.min() >= 0.6 * spacing
        assert torch.cdist(cells, sample).min(dim=1).values.max() <= 1.35 * spacing


def test_topk_lowest_index_ties_matches_a_stable_sort():
    from prumerge.ops.select import topk_lowest_index_ties

    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (3, 5, 40), generator=gen).float()  # many ties
    for k in (1, 7, 40):
        expected = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
        got = topk_lowest_index_ties(scores, k)
        assert torch.equal(got, expected.sort(dim=-1).values)


def test_topk_lowest_index_ties_fast_path_and_mixed_rows():
    from prumerge.ops.select import topk_lowest_index_ties

    gen = torch.Generator().manual_seed(1)
    distinct = torch.randn(4, 6, 50, generator=gen)  # no ties: topk's own indices
    tied = torch.randint(0, 3, (4, 6, 50), generator=gen).float()
    mixed = torch.cat([distinct, tied], dim=0)  # one batch, some rows tied, some not
    for scores in (distinct, mixed):
        for k in (1, 9, 49):
            expected = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
            assert torch.equal(topk_lowest_index_ties(scores, k), expected.sort(dim=-1).values)


def test_split_budget_is_proportional_exact_and_bounded():
    from prumerge.ops.select import split_budget

    assert split_budget(10, [36, 36]) == [5, 5]
    assert split_budget(11, [36, 72]) == [4, 7]  # quotas 3.67 and 7.33
    assert split_budget(2, [36, 144, 4]) == [1, 1, 1]  # at least one each
    assert split_budget(1000, [3, 4]) == [3, 4]  # at most each part's size
    for total in range(3, 60):
        counts = split_budget(total, [36, 12, 100])
        assert sum(counts) == total and all(c >= 1 for c in counts)
    with pytest.raises(ValueError, match="sizes"):
        split_budget(3, [])
