"""scripts/synth_probe.py: the patches of each synth cell, and the probe on separable data."""

from __future__ import annotations

import pytest
import torch

from tests.scripts import load_script


@pytest.fixture(scope="module")
def probe():
    return load_script("synth_probe")


@pytest.mark.parametrize("grid", [16, 24, 9, 3])
def test_cells_partition_the_grid(probe, grid):
    index = probe.cell_patch_index(grid)
    flat = sorted(i for cell in index for i in cell)
    assert flat == list(range(grid * grid))
    sizes = [len(cell) for cell in index]
    assert max(sizes) - min(sizes) <= 2 * grid // 3 + 1


def test_cell_of_a_patch_is_the_cell_of_its_centre(probe):
    # 224 px, 14 px patches: cell borders at 74.7 and 149.3 px
    index = probe.cell_patch_index(16)
    centre_px = [14 * p + 7 for p in range(16)]
    for cell, patches in enumerate(index):
        row, col = divmod(cell, 3)
        for patch in patches:
            pr, pc = divmod(patch, 16)
            assert int(centre_px[pr] // (224 / 3)) == row
            assert int(centre_px[pc] // (224 / 3)) == col


def test_probe_separates_separable_classes_and_not_noise(probe):
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (400,), generator=gen)
    centres = torch.randn(4, 8, generator=gen) * 3
    x = centres[labels] + torch.randn(400, 8, generator=gen)
    assert probe.probe_accuracy(x[:300], labels[:300], x[300:], labels[300:], 4) > 95
    noise = torch.randn(400, 8, generator=gen)
    assert probe.probe_accuracy(noise[:300], labels[:300], noise[300:], labels[300:], 4) < 50


def _record(scene, subtask, cell, answer, prediction):
    return {
        "id": f"{scene.id}-{subtask}",
        "subtask": subtask,
        "prediction": prediction,
        "answers": [answer],
        "meta": {"scene": scene.id, "cell": list(cell)},
    }


def test_answer_errors_counts_answers_that_name_another_object(probe):
    from prumerge.data.synth import COLORS, generate_scene

    scene = next(
        s
        for s in (generate_scene(i, split="test") for i in range(50))
        if len({o.color for o in s.objects if o.color}) >= 3
    )
    coloured = [o for o in scene.objects if o.color]
    target, other = coloured[0], next(o for o in coloured if o.color != coloured[0].color)
    absent = next(c for c in COLORS if c not in {o.color for o in scene.objects})
    records = [
        _record(scene, "color", target.cell, target.color, target.color),
        _record(scene, "color", target.cell, target.color, other.color),
        _record(scene, "color", target.cell, target.color, absent),
        _record(scene, "count", target.cell, "2", "3"),  # not a colour or shape question
    ]
    row = probe.answer_errors(records, {scene.id: scene})["color"]
    assert (row["n"], row["right"], row["wrong"], row["wrong_in_scene"]) == (3, 1, 2, 1)
    values = [o.color for o in coloured]
    assert row["random_object"] == pytest.approx(100 * values.count(target.color) / len(values))


def test_answer_errors_refuses_answers_from_other_scenes(probe):
    from prumerge.data.synth import SHAPES, generate_scene

    scene = generate_scene(0, split="test")
    target = next(o for o in scene.objects if o.shape)
    wrong = next(s for s in SHAPES if s != target.shape)
    record = _record(scene, "shape", target.cell, wrong, wrong)
    with pytest.raises(ValueError, match="not the object in cell"):
        probe.answer_errors([record], {scene.id: scene})
