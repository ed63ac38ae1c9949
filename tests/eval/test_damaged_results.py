"""Damaged result files (issue 29): each damaged record kind is set aside and answered again,
a damaged config.json is named as damaged (file and line), and summaries are written whole."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from prumerge.errors import PrumergeError
from prumerge.eval.runner import EvalConfig, check_directory, run_config, summarize
from tests.eval.test_eval_runner import FakePredictor, _lines, make_benchmark


@pytest.mark.parametrize(
    ("kind", "damage"),
    [
        ("only an id", lambda r: {"id": r["id"]}),
        ("prediction null", lambda r: r | {"prediction": None}),
        ("tokens_in as text", lambda r: r | {"tokens_in": "12"}),
        ("tokens_out negative", lambda r: r | {"tokens_out": -1}),
        ("answers not a list", lambda r: r | {"answers": "yes"}),
        ("time_s as text", lambda r: r | {"time_s": "fast"}),
        ("meta not an object", lambda r: r | {"meta": [1]}),
    ],
)
def test_a_damaged_record_is_set_aside_and_answered_again(
    kind: str, damage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bench = make_benchmark(n=6)
    config = EvalConfig("none")
    directory = run_config(bench, config, FakePredictor(), tmp_path, progress=False)
    path = directory / "predictions.jsonl"
    records = _lines(path)
    expected = {r["id"]: r["prediction"] for r in records}
    records[2] = damage(records[2])
    path.write_text("".join(json.dumps(r) + "\n" for r in records))

    again = FakePredictor()
    with caplog.at_level("WARNING", logger="prumerge.eval.results"):
        run_config(bench, config, again, tmp_path, progress=False)
    assert again.seen == [records[2]["id"]], kind  # only the damaged one runs again
    assert f"{path}: 1 unreadable line(s) (line 3)" in caplog.text
    assert {r["id"]: r["prediction"] for r in _lines(path)} == expected
    (result,) = summarize(tmp_path, ["none"], write=False, benchmark=bench).results
    assert result.n == 6 and result.tokens_in == 576


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('{"name": "none",\n "identity": {"benc', "is damaged (line 2: "),
        ("", "is damaged (line 1: "),
        ("[1, 2]\n", "is damaged (it has no identity)"),
        ('{"name": "none"}\n', "is damaged (it has no identity)"),
    ],
)
def test_a_damaged_config_is_named_damaged_not_different(
    text: str, needle: str, tmp_path: Path
) -> None:
    bench = make_benchmark(n=4)
    config = EvalConfig("none")
    directory = run_config(bench, config, FakePredictor(), tmp_path, progress=False)
    (directory / "config.json").write_text(text)
    for attempt in (
        lambda: check_directory(bench, config, tmp_path),
        lambda: run_config(bench, config, FakePredictor(), tmp_path, progress=False),
    ):
        with pytest.raises(PrumergeError) as caught:
            attempt()
        message = str(caught.value)
        assert message.startswith(f"{directory / 'config.json'} {needle}"), message
        assert "different configuration" not in message and "--overwrite" in message
        assert "\n" not in message
    # the recovery it names works
    run_config(bench, config, FakePredictor(), tmp_path, overwrite=True, progress=False)
    assert check_directory(bench, config, tmp_path) is True


def test_a_full_disk_keeps_the_old_summary_and_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import prumerge.atomic

    bench = make_benchmark(n=4)
    run_config(bench, EvalConfig("none"), FakePredictor(), tmp_path, progress=False)
    summarize(tmp_path, ["none"], plot=False)
    before = (tmp_path / "summary.json").read_bytes()
    assert json.loads(before)["benchmark"] == "fake"

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prumerge.atomic.os, "fsync", full)
    with pytest.raises(PrumergeError) as caught:
        summarize(tmp_path, ["none"], plot=False)
    assert str(caught.value) == f"cannot write {tmp_path / 'summary.txt'}: No space left on device"
    assert (tmp_path / "summary.json").read_bytes() == before
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    from prumerge.atomic import write_text_atomic

    target = tmp_path / "config.json"
    write_text_atomic(target, "old\n")
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n" and os.listdir(tmp_path) == ["config.json"]
    with pytest.raises(PrumergeError, match=r"^cannot write .*/no/such/x\.json: "):
        write_text_atomic(tmp_path / "no" / "such" / "x.json", "x")


@pytest.mark.parametrize(
    ("text", "needle"),
    [('{"lr": 0.1,\n "ste', "is damaged (line 2: "), ("[1]", "is damaged (not a JSON object)")],
)
def test_a_training_runs_damaged_config_is_named(text: str, needle: str, tmp_path: Path) -> None:
    from prumerge.train.config import TrainConfig
    from prumerge.train.rundir import prepare_output

    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    (tmp_path / "config.json").write_text(text)
    message = prepare_output(TrainConfig(output_dir=str(tmp_path)), tmp_path)
    assert message is not None and message.startswith(f"{tmp_path / 'config.json'} {needle}")
    assert "different configuration" not in message and "\n" not in message
    assert (tmp_path / "config.json").read_text() == text  # not overwritten
