"""ToMe against the release transcription (tome_release.py): one matching and merge at the
op level, and the whole tower run as ToMe's patched ViT at the model level."""

import pytest
import torch

from prumerge.methods import build_method
from prumerge.ops import key_head_mean
from prumerge.ops.tome import TokenMerger, bipartite_matching

from .harness import BATCHES, SHAPE_IDS, SHAPES, images, projector_inputs, release_llava
from .tome_release import bipartite_release, clip_tower_with_tome, merge_wavg_release


def test_keep_maps_to_the_per_layer_schedule():
    # LLaVA-1.5: 576 patches, 23 layers before hidden_states[-2]; 512 merges for keep=64.
    plan = build_method("tome", keep=64).tower_merge(
        num_patches=576, num_prefix_tokens=1, num_layers=23
    )
    assert plan.schedule == [23] * 6 + [22] * 17
    assert plan.protected == 1 and plan.metric == "key_mean" and plan.proportional_attention
    assert (
        build_method("tome", where="after").tower_merge(
            num_patches=576, num_prefix_tokens=1, num_layers=23
        )
        is None
    )


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize(("num", "width", "heads"), SHAPES, ids=SHAPE_IDS)
def test_two_merging_layers_equal_the_release_op_level(batch, num, width, heads):
    gen = torch.Generator().manual_seed(num + batch)
    x = torch.randn(batch, 1 + num, width, generator=gen, dtype=torch.float64)
    plan = build_method("tome", keep=64).tower_merge(
        num_patches=num, num_prefix_tokens=1, num_layers=23 if num == 576 else 11
    )
    merger = TokenMerger(batch, 1 + num, "cpu")
    ours = x
    release = [(x[b], torch.ones(1 + num, dtype=torch.float64)) for b in range(batch)]
    for r in plan.schedule[:2]:
        keys = torch.randn(batch, ours.shape[1], width, generator=gen, dtype=torch.float64)
        metric = key_head_mean(keys, heads)  # ToMe's k.mean(1)
        matching = bipartite_matching(metric, r, protected=1, sort_unmerged=True)
        (ours,) = merger.merge([ours], matching)
        for b in range(batch):
            unmerged, pairs = bipartite_release(metric[b], r, class_token=True)
            release[b] = merge_wavg_release(*release[b], unmerged, pairs)
    for b in range(batch):
        torch.testing.assert_close(ours[b], release[b][0])
        torch.testing.assert_close(merger.size[b, :, 0].double(), release[b][1])


@pytest.mark.parametrize("batch", BATCHES)
def test_the_tokens_reaching_the_projector_are_the_releases(batch):
    # keep=16 of 64 patches over the 3 layers before hidden_states[-2]: 16 merges each.
    model = release_llava()
    pixels = images(batch)
    tower = model.model.vision_tower
    raster, handle = projector_inputs(model, "tome", pixels, keep=16)
    assert handle.adapter.tower.tome_tower(64).plan.schedule == [16, 16, 16]
    merged_order, _ = projector_inputs(model, "tome", pixels, keep=16, order="tome")
    assignment = handle.last_reduction.assignment
    for row in range(batch):
        with torch.no_grad():
            expected, groups = clip_tower_with_tome(tower, pixels[row : row + 1], [16, 16, 16])
        # order="tome": the release's order exactly.
        torch.testing.assert_close(merged_order[row].double(), expected[1:], rtol=1e-4, atol=1e-4)
        # The default: the same tokens, in raster order of the patch each stands for.
        ours = [sorted((assignment[row] == s).nonzero().flatten().tolist()) for s in range(16)]
        by_group = {tuple(g): t for g, t in zip(groups, expected[1:], strict=True)}
        assert sorted(ours) == sorted(groups)
        # Raster order of the patch each token stands for (the root of its merges).
        stands_for = handle.last_reduction.index[row].tolist()
        assert stands_for == sorted(stands_for)
        assert all(patch in group for patch, group in zip(stands_for, ours, strict=True))
        for group, token in zip(ours, raster[row], strict=True):
            torch.testing.assert_close(token.double(), by_group[tuple(group)], rtol=1e-4, atol=1e-4)
