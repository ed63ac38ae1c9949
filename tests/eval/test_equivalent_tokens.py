"""Equivalent tokens (image tokens averaged over the LLM's layers) in eval records and
summaries, beside ``tokens_out``; result directories written before the field stay readable."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import pytest

from prumerge.eval.datasets import Benchmark, Sample
from prumerge.eval.predictor import ModelPredictor
from prumerge.eval.results import is_prediction_record
from prumerge.eval.runner import EvalConfig, Prediction, run_config
from prumerge.eval.summary import summarize

PATCHES = 36  # the tiny model's 6x6 patch grid


def _bench(n: int = 4) -> Benchmark:
    samples = [
        Sample(id=f"q{i}", task="fake", prompt=f"question {i}", image="x.png", answers=("yes",))
        for i in range(n)
    ]
    return Benchmark("fake", "exact_match", samples, {"limit": n})


class _Staged:
    """Like an LLM-side method: 20 tokens from the last stage on, 30.5 per layer on average."""

    def predict(self, samples: Sequence[Sample]) -> list[Prediction]:
        return [Prediction("yes", 576, 20, equivalent_tokens=30.5) for _ in samples]


def _cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())  # columns are joined by two spaces or more


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_and_summary_carry_equivalent_tokens(tmp_path: Path) -> None:
    bench = _bench()
    run_config(bench, EvalConfig("pdrop", 64, model_id="m"), _Staged(), tmp_path, progress=False)
    rows = _lines(tmp_path / "pdrop-64" / "predictions.jsonl")
    assert [(r["tokens_out"], r["equivalent_tokens"]) for r in rows] == [(20, 30.5)] * 4
    summary = summarize(tmp_path)
    (result,) = summary.results
    assert (result.tokens_out, result.equivalent_tokens) == (20, 30.5)
    saved = json.loads((tmp_path / "summary.json").read_text())["configs"]["pdrop-64"]
    assert (saved["tokens_out"], saved["equivalent_tokens"]) == (20, 30.5)
    header, row = (tmp_path / "summary.txt").read_text().splitlines()[1:3]
    cells = dict(zip(_cells(header), _cells(row), strict=True))
    assert (cells["tok out"], cells["tok eq"]) == ("20.0", "30.5")


def test_records_without_the_field_stay_readable(tmp_path: Path) -> None:
    bench = _bench()
    run_config(bench, EvalConfig("pdrop", 64, model_id="m"), _Staged(), tmp_path, progress=False)
    run_config(bench, EvalConfig("pool", 9, model_id="m"), _Staged(), tmp_path, progress=False)
    for name in ("pdrop-64", "pool-9"):  # as written before the field existed
        path = tmp_path / name / "predictions.jsonl"
        rows = [{k: v for k, v in r.items() if k != "equivalent_tokens"} for r in _lines(path)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {r.name: r for r in summarize(tmp_path).results}
    assert results["pool-9"].n == results["pdrop-64"].n == 4  # no record counted as damaged
    # vision side: the two counts are the same thing; LLM side: not known from tokens_out
    assert results["pool-9"].equivalent_tokens == results["pool-9"].tokens_out == 20
    assert results["pdrop-64"].equivalent_tokens is None
    table = (tmp_path / "summary.txt").read_text()
    header, *rows = table.splitlines()[1:]
    pdrop_row = next(_cells(line) for line in rows if "pdrop-64" in line)
    assert dict(zip(_cells(header), pdrop_row, strict=True))["tok eq"] == "-"


@pytest.mark.parametrize("value", ["30.5", -1.0, float("nan"), True, None])
def test_a_bad_equivalent_count_makes_the_record_damaged(value) -> None:
    record = {
        "id": "q0",
        "prediction": "yes",
        "answers": ["yes"],
        "tokens_in": 576,
        "tokens_out": 20,
        "equivalent_tokens": value,
    }
    assert not is_prediction_record(record)
    del record["equivalent_tokens"]
    assert is_prediction_record(record)


def test_fastv_predictions_count_the_layer_mean(tiny_checkpoint: Path, one_thread: None) -> None:
    from prumerge.eval.datasets import load_benchmark
    from prumerge.loading import load_model

    model, processor, prompt_fn = load_model(str(tiny_checkpoint))
    samples = load_benchmark("synth", n_scenes=1, limit=3).samples
    layers = model.config.text_config.num_hidden_layers  # 2
    with ModelPredictor(model, processor, prompt_fn, "fastv", keep=9, layer=1) as predictor:
        predictions = predictor.predict(samples)
        image = samples[0].load_image()
        (two,) = predictor.generate(["compare them"], [[image, image]])
    # layer 0 sees all 36 tokens, layer 1 the 9 kept: (1 * 36 + 1 * 9) / 2
    expected = (1 * PATCHES + (layers - 1) * 9) / layers
    assert [(p.tokens_out, p.equivalent_tokens) for p in predictions] == [(9, expected)] * 3
    assert (two.tokens_out, two.equivalent_tokens) == (18, 2 * expected)  # summed per prompt
    with ModelPredictor(model, processor, prompt_fn, "pool", keep=9) as predictor:
        assert {p.equivalent_tokens for p in predictor.predict(samples[:2])} == {9.0}
