"""Results written before a method gained an option (cdpruner's ``text_tower``, sparsevlm's
``recycle``) resume when the new option is at its None default, and only then."""

from __future__ import annotations

from pathlib import Path

import pytest

from prumerge.errors import PrumergeError
from prumerge.eval.datasets import Benchmark, Sample
from prumerge.eval.runner import EvalConfig, Prediction, check_directory, run_config


class _Answers:
    def __init__(self) -> None:
        self.seen = 0

    def predict(self, samples):
        self.seen += len(samples)
        return [Prediction("yes", 576, 64) for _ in samples]


def test_an_option_added_at_none_is_the_same_configuration(tmp_path: Path) -> None:
    samples = [
        Sample(id=f"q{i}", task="t", prompt="p", image="x.png", answers=("yes",)) for i in range(3)
    ]
    bench = Benchmark("fake", "exact_match", samples, {"limit": 3})
    before = EvalConfig("cdpruner", 64, model_id="m", options={"relevance": "llm"})
    run_config(bench, before, _Answers(), tmp_path, progress=False)
    after = EvalConfig(
        "cdpruner", 64, model_id="m", options={"relevance": "llm", "text_tower": None}
    )
    assert check_directory(bench, after, tmp_path)  # resumes
    predictor = _Answers()
    run_config(bench, after, predictor, tmp_path, progress=False)
    assert predictor.seen == 0  # nothing predicted again
    changed = EvalConfig(
        "cdpruner", 64, model_id="m", options={"relevance": "llm", "text_tower": "/clip"}
    )
    with pytest.raises(PrumergeError, match="different configuration"):
        check_directory(bench, changed, tmp_path)
    other = EvalConfig(
        "cdpruner", 64, model_id="m", options={"relevance": "none", "text_tower": None}
    )
    with pytest.raises(PrumergeError, match="different configuration"):
        check_directory(bench, other, tmp_path)
