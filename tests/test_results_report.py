"""scripts/results_report.py: the tables of docs/results.md, from `prumerge eval` summaries."""

from __future__ import annotations

import json
import sys

import pytest

from tests.scripts import load_script


@pytest.fixture(scope="module")
def report():
    return load_script("results_report")


def config(method: str, budget, score: float, none: float, tokens: float) -> dict:
    return {
        "method": method,
        "budget": budget,
        "score": score,
        "relative": 100 * score / none,
        "scores": {"score": score, "color/score": score},
        "tokens_out": tokens,
        "n": 10,
    }


def summary(none: float, pool: float) -> dict:
    configs = [
        config("none", None, none, none, 256.0),
        config("prumerge", None, none / 2, none, 28.5),
        config("prumerge", 0.25, none * 0.9, none, 64.0),
        config("pool", 0.25, pool, none, 64.0),
        config("pool", 0.08, pool / 2, none, 16.0),
    ]
    return {"configs": {f"{c['method']}-{c['budget']}": c for c in configs}}


def test_budget_grid_puts_models_side_by_side_in_budget_order(report):
    text = report.budget_grid({"default": summary(80.0, 60.0), "base": summary(50.0, 10.0)})
    lines = text.splitlines()
    assert lines[0] == (
        "| method | default 0.08 | default 0.25 | default adaptive "
        "| base 0.08 | base 0.25 | base adaptive |"
    )
    rows = {line.split(" | ")[0]: line for line in lines[2:] if line.startswith("| `")}
    assert rows["| `prumerge`"] == (
        "| `prumerge` |  | 72.0 (90%) | 40.0 (50%) |  | 45.0 (90%) | 25.0 (50%) |"
    )
    assert rows["| `pool`"] == "| `pool` | 30.0 (38%) | 60.0 (75%) |  | 5.0 (10%) | 10.0 (20%) |  |"
    assert "`none` (all tokens): default 80.00, base 50.00." in text


def test_main_prints_the_grid_only_for_runs_with_budgets(report, tmp_path, monkeypatch, capsys):
    for name, data in (("a", summary(80.0, 60.0)), ("b", summary(50.0, 10.0))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(data))
    plot = tmp_path / "plot.png"
    argv = ["results_report.py", "--benchmark", "synth", f"a={tmp_path / 'a'}"]
    monkeypatch.setattr(sys, "argv", [*argv, f"b={tmp_path / 'b'}", "--plot", str(plot)])
    report.main()
    out = capsys.readouterr().out
    assert out.startswith("| method | a 0.08 | a 0.25 | a adaptive |")
    assert "**a**" in out and "**b**" in out and plot.stat().st_size > 0


def test_adaptive_runs_get_no_grid(report, tmp_path, monkeypatch, capsys):
    data = summary(80.0, 60.0)
    data["configs"] = {k: c for k, c in data["configs"].items() if c["budget"] is None}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "summary.json").write_text(json.dumps(data))
    plot = tmp_path / "plot.png"
    argv = ["results_report.py", "--benchmark", "synth", f"a={tmp_path / 'a'}", "--plot", str(plot)]
    monkeypatch.setattr(sys, "argv", argv)
    report.main()
    assert capsys.readouterr().out.startswith("**a**")


def test_joined_runs_replace_configurations_and_recompute_retention(report, tmp_path):
    old = summary(80.0, 60.0)
    old["benchmark"] = "synth"
    new = {"benchmark": "synth", "configs": {"pool-0.25": config("pool", 0.25, 70.0, 1.0, 64.0)}}
    new["configs"]["pool-0.25"]["relative"] = None  # a run without `none` has no retention
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "summary.json").write_text(json.dumps(new))
    joined, where = report.join([tmp_path / "old.json", tmp_path / "new"])
    assert list(joined["configs"]) == list(old["configs"])  # same order, pool-0.25 replaced
    assert joined["configs"]["pool-0.25"]["score"] == 70.0
    assert joined["configs"]["pool-0.25"]["relative"] == pytest.approx(87.5)  # 70 / 80
    assert joined["configs"]["pool-0.08"]["relative"] == pytest.approx(37.5)  # 30 / 80, kept
    assert where["pool-0.25"] == tmp_path / "new" and where["none-None"] == tmp_path / "old.json"


def test_joining_runs_of_two_benchmarks_is_refused(report, tmp_path):
    for name, benchmark in (("a", "synth"), ("b", "easy-vqa")):
        (tmp_path / name).mkdir()
        data = {**summary(80.0, 60.0), "benchmark": benchmark}
        (tmp_path / name / "summary.json").write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="is easy-vqa, not synth"):
        report.join([tmp_path / "a", tmp_path / "b"])


def test_llm_side_methods_are_placed_at_their_equivalent_tokens(report):
    vision = config("pool", 0.25, 50.0, 80.0, 64.0)
    staged = {**config("pdrop", 0.25, 50.0, 80.0, 28.0), "equivalent_tokens": 63.4}
    assert report.tokens(vision) == 64.0
    assert report.tokens(staged) == 63.4
    line = report.table("m", {"configs": {"pdrop": staged}}).splitlines()[-1]
    assert line.startswith("| `pdrop` | 0.25 | 28.0 | 63.4 | 50.00 | 62.5% |")


def test_drop_leaves_methods_out_of_one_model(report, tmp_path, monkeypatch, capsys):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(summary(80.0, 60.0)))
    argv = ["results_report.py", "--benchmark", "synth", f"a={tmp_path / 'a'}"]
    argv += [f"b={tmp_path / 'b'}", "--drop", "b:pool", "--plot", str(tmp_path / "p.png")]
    monkeypatch.setattr(sys, "argv", argv)
    report.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `pool`")]
    assert rows[0] == "| `pool` | 30.0 (38%) | 60.0 (75%) |  |  |  |  |"  # b's cells empty
    assert len(rows) == 3  # the grid, then a's table with both budgets; none in b's table
