"""The one method spec: every entry point parses "method, budget, options" the same way."""

from __future__ import annotations

import pytest

from prumerge.errors import PrumergeError
from prumerge.methods.spec import (
    MethodSpec,
    format_budget,
    make_spec,
    parse_spec,
    split_spec,
    trial_inputs,
)


def test_parse_spec_reads_a_budget_a_count_apart_from_a_ratio() -> None:
    assert split_spec("pool@64") == ("pool", "64") and split_spec(" pool ") == ("pool", None)
    count, ratio = parse_spec("pool@1"), parse_spec("pool@1.0")
    assert count.options == {"keep": 1} and type(count.budget) is int
    assert ratio.options == {"keep": 1.0} and type(ratio.budget) is float
    assert (count.label, ratio.label) == ("pool@1", "pool@1.0")
    # no budget: the method's own (pool's default 64; adaptive for prumerge)
    assert parse_spec("pool").label == "pool@64" and parse_spec("pool").options == {}
    assert parse_spec("prumerge@adaptive") == MethodSpec("prumerge")
    assert parse_spec("prumerge").label == "prumerge" and parse_spec("none").label == "none"
    # --keep and --option go through the same parser, typed by the constructor
    spec = parse_spec("prumerge", {"merge": "mean", "knn": "4"}, keep="0.25")
    assert spec.options == {"merge": "mean", "knn": 4, "keep": 0.25}
    assert spec.extra_options == {"merge": "mean", "knn": 4}
    assert spec.with_budget(8).options == {"merge": "mean", "knn": 4, "keep": 8}
    assert spec.build().options()["keep"] == 0.25
    assert spec.as_dict() == {"method": "prumerge", **spec.options}


@pytest.mark.parametrize(
    ("text", "options", "keep", "message"),
    [
        ("bogus@4", None, None, "unknown method 'bogus'; available: "),
        ("none@4", None, None, "method 'none' takes no budget, got 'none@4'"),
        ("pool@lots", None, None, "pool@lots: not a number: 'lots'"),
        ("pool", None, "0", "--keep: keep must be >= 1"),
        ("pool@4", {"keep": "8"}, None, "not both"),
        ("prumerge", {"merge": "median"}, None, "prumerge: merge must be one of"),
        ("prumerge", {"knn": "abc"}, None, "prumerge: option knn takes an integer, got 'abc'"),
    ],
)
def test_parse_spec_errors_are_one_line(text, options, keep, message) -> None:
    with pytest.raises(PrumergeError) as info:
        parse_spec(text, options, keep=keep)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_one_budget_formatter() -> None:
    assert [format_budget(b) for b in (64, 0.25, 1.0, 1, None)] == [
        "64",
        "0.25",
        "1.0",
        "1",
        "adaptive",
    ]
    assert format_budget(None, takes_budget=MethodSpec("none").takes_budget) == "-"
    assert MethodSpec("prumerge").takes_budget and not MethodSpec("none").takes_budget


def test_every_entry_point_uses_the_spec() -> None:
    """bench, eval, the trainer's mixture and the server give the same spec for one text."""
    from prumerge.bench import parse_configs
    from prumerge.commands.eval import plan_configs
    from prumerge.serve.config import parse_serve_config
    from prumerge.train.mixture import parse_mixture

    want = parse_spec("visionzip@64")
    assert parse_configs("visionzip@64")[1] == want
    assert plan_configs("visionzip", "64", None) == [want]
    assert parse_mixture("visionzip@64:2")[0].spec == want
    assert parse_serve_config({"method": "visionzip", "keep": "64"}) == want


def test_the_dry_run_check_runs_the_method_once(monkeypatch) -> None:
    """A value only a run can reject fails when the spec is made (the one dry-run check)."""
    from prumerge.methods import METHODS, VisionMethod

    inputs = trial_inputs(batch=2, num_patches=16)
    assert inputs.features.shape == (2, 16, 8) and inputs.cls_attn.shape == (2, 16)
    assert trial_inputs().features.equal(trial_inputs().features)  # the same every call

    class Picky(VisionMethod):
        name = "picky"

        def __init__(self, keep: int | float = 4) -> None:
            self.keep = keep

        def reduce(self, inputs):
            raise ValueError(f"keep {self.keep} does not fit this grid")

    monkeypatch.setitem(METHODS, "picky", Picky)
    with pytest.raises(PrumergeError, match=r"^picky: keep 4 does not fit this grid$"):
        parse_spec("picky@4")
    # unchecked, nothing runs
    assert make_spec("picky", {"keep": "4"}, check=False) == MethodSpec("picky", {"keep": 4})
