"""The runner with a fake deterministic predictor: resume, refusal, data parallel, summaries."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from prumerge.errors import PrumergeError
from prumerge.eval.datasets import Benchmark, Sample
from prumerge.eval.runner import (
    EvalConfig,
    Prediction,
    Predictor,
    evaluate,
    read_predictions,
    run_config,
    summarize,
)

N_SAMPLES = 23  # odd, so two ranks get unequal shards


def make_benchmark(n: int = N_SAMPLES, limit_tag: str = "") -> Benchmark:
    samples = [
        Sample(
            id=f"s{i:03d}",
            image=f"img{i % 5}.png",  # never opened: the fake predictor ignores images
            prompt=f"question {i}?",
            answers=(f"answer{i}",),
            task="fake",
            subtask="even" if i % 2 == 0 else "odd",
            meta={"i": i},
        )
        for i in range(n)
    ]
    return Benchmark("fake", "exact_match", samples, {"limit": n, "tag": limit_tag})


def _right(sample_id: str, keep: int) -> bool:
    """Deterministic across processes (unlike hash())."""
    return hashlib.sha256(sample_id.encode()).digest()[0] % 4 < keep


class FakePredictor:
    """Right on a fixed subset of ids (more of them the more tokens it keeps)."""

    def __init__(self, tokens_out: int = 576, keep: int = 3, fail_after: int | None = None):
        self.tokens_out = tokens_out
        self.keep = keep
        self.fail_after = fail_after
        self.seen: list[str] = []

    def predict(self, samples: Sequence[Sample]) -> list[Prediction]:
        if self.fail_after is not None and len(self.seen) + len(samples) > self.fail_after:
            raise KeyboardInterrupt  # a kill in the middle of a batch
        self.seen += [s.id for s in samples]
        return [
            Prediction(
                s.answers[0] if _right(s.id, self.keep) else "wrong",
                576,
                self.tokens_out + s.meta["i"] % 3,
            )
            for s in samples
        ]


def _strip_times(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in records]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_fake_predictor_satisfies_protocol() -> None:
    assert isinstance(FakePredictor(), Predictor)


def test_single_run_writes_ordered_records_and_config(tmp_path: Path) -> None:
    bench = make_benchmark()
    directory = run_config(
        bench,
        EvalConfig("none", model_id="m"),
        FakePredictor(),
        tmp_path,
        batch_size=4,
        progress=False,
    )
    records = _lines(directory / "predictions.jsonl")
    assert [r["id"] for r in records] == [s.id for s in bench.samples]
    assert records[0]["answers"] == ["answer0"] and records[0]["tokens_in"] == 576
    config = json.loads((directory / "config.json").read_text())
    assert config["identity"]["benchmark"] == "fake" and len(config["fingerprint"]) == 16


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("garbage", ['{"id": "s0', '{"id": "s007", "pred\n', ""])
def test_kill_and_resume_loses_and_duplicates_nothing(
    tmp_path: Path, batch_size: int, garbage: str
) -> None:
    bench = make_benchmark()
    config = EvalConfig("prumerge", budget=32, model_id="m")

    reference_dir = tmp_path / "reference"
    run_config(bench, config, FakePredictor(), reference_dir, batch_size=batch_size, progress=False)
    expected = _strip_times(_lines(reference_dir / config.name / "predictions.jsonl"))

    out = tmp_path / "resumed"
    killed = FakePredictor(fail_after=10)
    with pytest.raises(KeyboardInterrupt):
        run_config(bench, config, killed, out, batch_size=batch_size, progress=False)
    path = out / config.name / "predictions.jsonl"
    done = len(_lines(path))
    assert done == len(killed.seen) and done <= 10  # every answered sample was flushed
    with path.open("a") as handle:
        handle.write(garbage)  # a torn last line

    second = FakePredictor()
    run_config(bench, config, second, out, batch_size=batch_size, progress=False)
    assert len(second.seen) == N_SAMPLES - done  # nothing predicted twice
    assert _strip_times(_lines(path)) == expected


def test_corrupt_middle_line_is_set_aside_and_its_sample_redone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bench = make_benchmark()
    config = EvalConfig("none")
    reference = tmp_path / "reference"
    run_config(bench, config, FakePredictor(), reference, progress=False)
    expected = _strip_times(_lines(reference / "none" / "predictions.jsonl"))

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_config(bench, config, FakePredictor(fail_after=5), out, progress=False)
    path = out / "none" / "predictions.jsonl"
    lines = path.read_text().splitlines()
    broken = lines[2]
    lines[2] = "not json"
    path.write_text("\n".join(lines[:2]) + "\n\n  \n" + "\n".join(lines[2:]) + "\n")  # blanks too

    second = FakePredictor()
    with caplog.at_level("WARNING", logger="prumerge.eval.results"):
        run_config(bench, config, second, out, progress=False)
    # the four good lines are kept; only the unreadable one's sample runs again
    assert second.seen[0] == json.loads(broken)["id"] and len(second.seen) == N_SAMPLES - 4
    assert sorted(_strip_times(_lines(path)), key=lambda r: r["id"]) == expected
    assert (out / "none" / "predictions.jsonl.rejected").read_text() == "not json\n"
    assert "1 unreadable line(s) (line 5)" in caplog.text  # after the 2 blank lines


def test_records_of_foreign_ids_are_not_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bench = make_benchmark(n=10)
    config = EvalConfig("none")
    directory = run_config(bench, config, FakePredictor(), tmp_path, progress=False)
    record = _lines(directory / "predictions.jsonl")[0] | {"id": "not-in-the-benchmark"}
    with (directory / "predictions.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    with caplog.at_level("WARNING", logger="prumerge.eval.summary"):
        (result,) = summarize(tmp_path, ["none"], write=False, benchmark=bench).results
    assert (result.n, result.n_expected, result.complete) == (10, 10, True)
    assert "1 record(s) with ids that are not in the benchmark" in caplog.text


def test_a_second_run_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    from prumerge.eval.runner import ResultsLock

    bench = make_benchmark(n=4)
    code = (
        "import sys, time\n"
        "from prumerge.eval.runner import ResultsLock\n"
        f"lock = ResultsLock({str(tmp_path)!r}); lock.acquire()\n"
        "print('locked', flush=True); sys.stdin.read()\n"
    )
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(PrumergeError, match="in use by another evaluation run"):
            run_config(bench, EvalConfig("none"), FakePredictor(), tmp_path, progress=False)
        assert not (tmp_path / "none").exists()  # nothing written
    finally:
        holder.communicate("")
    # once the holder is gone, the same run goes through; the lock is re-entrant in-process
    with ResultsLock(tmp_path):
        run_config(bench, EvalConfig("none"), FakePredictor(), tmp_path, progress=False)
    assert len(_lines(tmp_path / "none" / "predictions.jsonl")) == 4


def test_a_lock_taken_on_a_new_directory_leaves_nothing_behind(tmp_path: Path) -> None:
    from prumerge.eval.runner import ResultsLock

    with ResultsLock(tmp_path / "new" / "results"):
        assert (tmp_path / "new" / "results" / ".lock").exists()
    assert not (tmp_path / "new" / "results").exists()


def test_a_ratio_of_one_is_not_a_count_of_one(tmp_path: Path) -> None:
    bench = make_benchmark(n=4)
    configs = [
        (EvalConfig("pool", 1, model_id="m"), FakePredictor(tokens_out=1)),
        (EvalConfig("pool", 1.0, model_id="m"), FakePredictor()),
    ]
    summary = evaluate(bench, configs, tmp_path, progress=False)
    assert [r.name for r in summary.results] == ["pool-1", "pool-1.0"]
    assert [r.budget for r in summary.results] == [1, 1.0]
    rows = summary.table().splitlines()
    assert rows[2].split()[2] == "1" and rows[3].split()[2] == "1.0"


@pytest.mark.parametrize(
    ("benchmark_kwargs", "config_kwargs", "what"),
    [
        ({"n": 20}, {}, "n_samples"),  # a different limit
        ({"limit_tag": "other"}, {}, "benchmark_options"),
        ({}, {"model_id": "other-model"}, "model_id"),
        ({}, {"options": {"variant": "plus"}}, "method_options"),
        ({}, {"budget": 64}, "budget"),
    ],
)
def test_refuses_results_of_another_configuration(
    tmp_path: Path, benchmark_kwargs: dict, config_kwargs: dict, what: str
) -> None:
    base = EvalConfig("prumerge", budget=32, model_id="m", name="run")
    run_config(make_benchmark(), base, FakePredictor(), tmp_path, progress=False)
    other = EvalConfig(**{**base.__dict__, **config_kwargs})
    bench = make_benchmark(**benchmark_kwargs)
    with pytest.raises(PrumergeError, match=f"different configuration.*{what}"):
        run_config(bench, other, FakePredictor(), tmp_path, progress=False)
    # overwrite=True replaces the old results
    predictor = FakePredictor()
    run_config(bench, other, predictor, tmp_path, overwrite=True, progress=False)
    assert len(predictor.seen) == len(bench.samples)
    assert len(_lines(tmp_path / "run" / "predictions.jsonl")) == len(bench.samples)


def test_predictions_without_config_are_refused(tmp_path: Path) -> None:
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "predictions.jsonl").write_text('{"id": "s000"}\n')
    with pytest.raises(PrumergeError, match="different configuration"):
        run_config(make_benchmark(), EvalConfig("none"), FakePredictor(), tmp_path, progress=False)


def test_bad_predictor_output(tmp_path: Path) -> None:
    class Short:
        def predict(self, samples):
            return [("x", 1, 1)] * (len(samples) - 1)

    with pytest.raises(PrumergeError, match="returned 1 predictions for 2 samples"):
        run_config(
            make_benchmark(), EvalConfig("none"), Short(), tmp_path, batch_size=2, progress=False
        )


def test_summary_scores_relative_tokens_and_plot(tmp_path: Path) -> None:
    bench = make_benchmark()
    configs = [
        (EvalConfig("none"), FakePredictor(tokens_out=576, keep=3)),
        (EvalConfig("prumerge", budget=32), lambda: FakePredictor(tokens_out=32, keep=2)),
        (EvalConfig("prumerge", budget=144), FakePredictor(tokens_out=144, keep=3)),
    ]
    summary = evaluate(bench, configs, tmp_path, progress=False)
    results = {r.name: r for r in summary.results}

    def expected_score(keep: int) -> float:
        return 100.0 * sum(_right(s.id, keep) for s in bench.samples) / N_SAMPLES

    assert results["none"].score == pytest.approx(expected_score(3))
    assert results["prumerge-32"].score == pytest.approx(expected_score(2))
    assert results["prumerge-32"].relative == pytest.approx(
        100.0 * expected_score(2) / expected_score(3)
    )
    assert results["none"].relative == pytest.approx(100.0)
    # tokens_out = base + i % 3; over i = 0..22 the extra averages (8*0 + 8*1 + 7*2) / 23
    assert results["prumerge-32"].tokens_out == pytest.approx(32 + 22 / 23)
    assert results["prumerge-32"].tokens_in == 576
    even = [s for s in bench.samples if s.subtask == "even"]
    assert results["none"].scores["even/score"] == pytest.approx(
        100.0 * sum(_right(s.id, 3) for s in even) / len(even)
    )

    table = (tmp_path / "summary.txt").read_text()
    assert "prumerge-32" in table and "vs none" in table and "even/score" in table
    as_json = json.loads((tmp_path / "summary.json").read_text())
    assert set(as_json["configs"]) == {"none", "prumerge-32", "prumerge-144"}
    assert as_json["configs"]["prumerge-144"]["complete"] is True
    png = (tmp_path / "accuracy_vs_tokens.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # Summaries can be rebuilt from disk alone, with the same numbers.
    again = summarize(tmp_path, write=False)
    assert {r.name: r.score for r in again.results} == {r.name: r.score for r in summary.results}


def test_summary_marks_incomplete_runs(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        run_config(
            make_benchmark(),
            EvalConfig("none"),
            FakePredictor(fail_after=7),
            tmp_path,
            progress=False,
        )
    (result,) = summarize(tmp_path, write=False).results
    assert (result.n, result.n_expected, result.complete) == (7, N_SAMPLES, False)
    assert f"7/{N_SAMPLES}" in summarize(tmp_path, write=False).table()


# --- data parallel ----------------------------------------------------------------------------


def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        bench = make_benchmark()
        config = EvalConfig("prumerge", budget=32, model_id="m")
        predictor = FakePredictor(tokens_out=32)
        summary = evaluate(bench, [(config, predictor)], out_dir, batch_size=3, progress=False)
        assert (summary is None) == (rank != 0)
        Path(out_dir, f"seen-{rank}.json").write_text(json.dumps(predictor.seen))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_run_equals_single_process(tmp_path: Path) -> None:
    bench = make_benchmark()
    config = EvalConfig("prumerge", budget=32, model_id="m")
    single = tmp_path / "single"
    run_config(bench, config, FakePredictor(tokens_out=32), single, progress=False)
    expected = _strip_times(_lines(single / config.name / "predictions.jsonl"))

    # Start with a partial single-process run, so the parallel run also has to resume.
    parallel = tmp_path / "parallel"
    with pytest.raises(KeyboardInterrupt):
        run_config(
            bench, config, FakePredictor(tokens_out=32, fail_after=5), parallel, progress=False
        )
    mp.spawn(
        _distributed_worker, args=(2, str(tmp_path / "init"), str(parallel)), nprocs=2, join=True
    )
    seen = [set(json.loads((parallel / f"seen-{rank}.json").read_text())) for rank in (0, 1)]
    remaining = {s.id for s in bench.samples[5:]}
    # each rank predicted only its own shard, and together exactly what was left
    assert seen[0] <= {s.id for s in bench.samples[0::2]}
    assert seen[1] <= {s.id for s in bench.samples[1::2]}
    assert seen[0] | seen[1] == remaining and not seen[0] & seen[1]
    directory = parallel / config.name
    assert _strip_times(_lines(directory / "predictions.jsonl")) == expected
    assert not list(directory.glob("predictions.rank*"))  # shards merged away
    assert json.loads((parallel / "summary.json").read_text())["configs"][config.name]["n"] == (
        N_SAMPLES
    )


def test_leftover_shards_are_merged_by_a_single_process_run(tmp_path: Path) -> None:
    bench = make_benchmark()
    config = EvalConfig("none")
    run_config(bench, config, FakePredictor(), tmp_path / "ref", progress=False)
    expected = _strip_times(_lines(tmp_path / "ref" / "none" / "predictions.jsonl"))

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_config(bench, config, FakePredictor(fail_after=4), out, progress=False)
    # Pretend rank 1 of a killed 2-process run had written samples 1, 3, 5, ..., 13 (torn).
    shard = out / "none" / "predictions.rank1-of-2.jsonl"
    shard_lines = [line for line in expected if int(line["id"][1:]) % 2 == 1][:7]
    shard.write_text("".join(json.dumps(r) + "\n" for r in shard_lines) + '{"id": "s01')
    predictor = FakePredictor()
    run_config(bench, config, predictor, out, progress=False)
    assert len(predictor.seen) == N_SAMPLES - len({0, 1, 2, 3} | {1, 3, 5, 7, 9, 11, 13})
    assert _strip_times(_lines(out / "none" / "predictions.jsonl")) == expected
    assert not shard.exists()
    assert len(read_predictions(out / "none")) == N_SAMPLES


def test_config_names_must_be_safe_and_unique(tmp_path: Path) -> None:
    with pytest.raises(PrumergeError):
        EvalConfig("none", name="../escape")
    with pytest.raises(PrumergeError, match="unique"):
        evaluate(make_benchmark(), [(EvalConfig("none"), FakePredictor())] * 2, tmp_path)


def test_moved_data_directory_still_resumes(tmp_path: Path) -> None:
    bench = make_benchmark()
    config = EvalConfig("none")
    with pytest.raises(KeyboardInterrupt):
        run_config(bench, config, FakePredictor(fail_after=6), tmp_path, progress=False)
    moved = Benchmark(bench.name, bench.metric, bench.samples, {**bench.options, "root": "/new"})
    predictor = FakePredictor()
    run_config(moved, config, predictor, tmp_path, progress=False)
    assert len(predictor.seen) == N_SAMPLES - 6
