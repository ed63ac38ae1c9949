"""The demo's logic without a browser: `compare` on a tiny random LLaVA (36 patches)."""

import numpy as np
import pytest
from PIL import Image

from prumerge.demo import captions, choose_configs, compare, table
from prumerge.demo.compare import MAX_CONFIGS, ROWS, MethodResult, patch_grid
from prumerge.errors import PrumergeError
from tests.adapters.conftest import PATCHES


def test_choose_configs_puts_none_first_and_applies_budgets():
    labels = [c.label for c in choose_configs(["cls_topk", "prumerge"], "8, 0.5")]
    assert labels == ["none", "cls_topk@8", "cls_topk@0.5", "prumerge@8", "prumerge@0.5"]
    assert [c.label for c in choose_configs(["prumerge"], "auto")] == ["none", "prumerge"]
    assert [c.label for c in choose_configs(["prumerge"], "  ")] == ["none", "prumerge"]
    assert [c.label for c in choose_configs([], None)] == ["none"]
    assert [c.label for c in choose_configs(["none"], "8")] == ["none"]


@pytest.mark.parametrize(
    ("methods", "budgets", "message"),
    [
        (["fastest"], "auto", "unknown method 'fastest'"),
        (["pool"], "lots", "budget: not a number: 'lots'"),
        (["pool"], "-3", "keep must be >= 1"),
        (["pool"], ",".join(str(k) for k in range(1, MAX_CONFIGS + 1)), "is too many"),
    ],
)
def test_choose_configs_rejects_bad_selections(methods, budgets, message):
    with pytest.raises(PrumergeError, match=message):
        choose_configs(methods, budgets)


def test_patch_grid():
    assert patch_grid(576) == (24, 24)
    assert patch_grid(36) == (6, 6)
    assert patch_grid(35) is None


def test_compare_runs_none_and_every_config_with_consistent_tokens(tiny_demo, photo):
    configs = choose_configs(["cls_topk", "prumerge", "random"], "8,16")
    seen = []
    result = compare(
        tiny_demo,
        photo,
        "what color is the shape?",
        configs,
        hardware="a100",
        max_new_tokens=4,
        progress=lambda done, total, message: seen.append((done, total, message)),
    )
    labels = [r.label for r in result.results]
    assert labels == [c.label for c in configs] and labels[0] == "none"
    assert seen[0] == (0, 7, "running none") and seen[-1] == (7, 7, "done")
    assert result.hardware == "A100-40G" and result.precision_bits == 32
    by_label = {r.label: r for r in result.results}
    for r in result.results:
        assert r.tokens_in == PATCHES
        assert isinstance(r.answer, str) and 0 <= r.new_tokens <= 4
        assert r.vision > 0 and r.prefill > 0 and r.generate >= 0
        assert r.picture is not None and r.picture.size == (448, 448)
    assert by_label["none"].tokens_out == PATCHES
    for budget in (8, 16):
        # top-k and random keep exactly k patches; prumerge's k includes the supplement token
        assert by_label[f"cls_topk@{budget}"].tokens_out == budget
        assert by_label[f"random@{budget}"].tokens_out == budget
        assert by_label[f"prumerge@{budget}"].tokens_out == budget


def test_predicted_speedup_grows_as_tokens_shrink(tiny_demo, photo):
    configs = choose_configs(["cls_topk"], "4,12,24")
    result = compare(tiny_demo, photo, "what is it?", configs, max_new_tokens=2)
    speedups = [r.predicted_prefill_speedup for r in result.results]
    assert speedups[0] == 1.0  # none against itself
    assert speedups[1] > speedups[2] > speedups[3] > 1.0
    assert result.results[0].measured_prefill_speedup == 1.0
    assert all(r.measured_prefill_speedup > 0 for r in result.results)


def test_pictures_show_what_was_kept(tiny_demo, photo):
    """none outlines every patch, cls_topk@1 one patch: their pictures differ a lot."""
    result = compare(
        tiny_demo, photo, "what is it?", choose_configs(["cls_topk"], "1"), max_new_tokens=1
    )
    none, top1 = (np.asarray(r.picture, dtype=np.int16) for r in result.results)
    # With one kept patch every other patch is tinted with its colour.
    assert np.abs(none - top1).mean() > 10
    pictures = captions(result)
    assert [c for _, c in pictures] == ["none: 36 -> 36 tokens", "cls_topk@1: 36 -> 1 tokens"]
    assert (
        compare(tiny_demo, photo, "what?", [], max_new_tokens=1, pictures=False).results[0].picture
        is None
    )


def test_table_has_one_column_per_config(tiny_demo, photo):
    result = compare(tiny_demo, photo, "what?", choose_configs(["cls_topk"], "8"), hardware="h100")
    headers, rows = table(result)
    assert headers == ["", "none", "cls_topk@8"]
    assert [row[0] for row in rows] == [label.format(hardware="H100-SXM") for label in ROWS]
    assert all(len(row) == 3 for row in rows)
    tokens = dict((row[0], row[1:]) for row in rows)["visual tokens in -> out"]
    assert tokens == [f"{PATCHES} -> {PATCHES}", f"{PATCHES} -> 8"]
    answers = rows[0][1:]
    assert answers == [r.answer for r in result.results]


def test_fastv_is_labelled_as_pruning_inside_the_llm():
    from prumerge.demo.compare import Comparison

    picture = Image.new("RGB", (8, 8))
    fastv = MethodResult("fastv", "fastv", "red", 256, 128, 2, 0.1, 0.2, 0.3, 3, picture=picture)
    comparison = Comparison("q", "V100", 32, 1, [fastv])
    _, rows = table(comparison)
    assert rows[1][1] == "256 -> 128 (from LLM layer 2)"
    assert "inside the LLM" in captions(comparison)[0][1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(question="   "), "the question is empty"),
        (dict(hardware="tpu"), "unknown hardware 'tpu'"),
        (dict(max_new_tokens=0), "max new tokens must be at least 1"),
        (dict(repeats=0), "timed runs must be at least 1"),
    ],
)
def test_compare_rejects_bad_input(tiny_demo, photo, kwargs, message):
    args = dict(question="what?", hardware="v100", max_new_tokens=2, repeats=1) | kwargs
    question = args.pop("question")
    with pytest.raises(PrumergeError, match=message):
        compare(tiny_demo, photo, question, [], **args)
