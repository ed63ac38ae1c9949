"""One evaluation path: training's evaluation and `prumerge eval` read the same questions and
give the same score on the same answers (the harness's exact_match, EvalAI normalisation)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from prumerge.eval.datasets import Sample, load_benchmark
from prumerge.eval.runner import EvalConfig, evaluate
from prumerge.train.evaluate import score_answers, synth_groups


def _guess(index: int, answer: str) -> str:
    """Right, right in another spelling, or wrong, by turns."""
    if index % 3 == 0:
        return answer
    if index % 3 == 1:
        return f"The {answer.capitalize()}."  # EvalAI drops the article and the period
    return "nothing"


class _Replay:
    """A predictor that answers from a table (no model)."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers

    def predict(self, samples: Sequence[Sample]):
        return [(self.answers[s.id], 4, 4) for s in samples]


def test_training_and_prumerge_eval_give_the_same_score_on_the_same_answers(tmp_path) -> None:
    benchmark = load_benchmark("synth", n_scenes=3)
    guesses = {s.id: _guess(i, s.answers[0]) for i, s in enumerate(benchmark.samples)}

    # training's evaluation reads the same questions, in the same order
    items = [item for _, group in synth_groups(3) for item in group]
    assert [(q, a, k) for q, a, k in items] == [
        (s.prompt, s.answers[0], s.subtask) for s in benchmark.samples
    ]
    trained = score_answers(items, [guesses[s.id] for s in benchmark.samples])

    summary = evaluate(
        benchmark,
        [(EvalConfig("none", model_id="replay"), _Replay(guesses))],
        tmp_path,
        progress=False,
    )
    (result,) = summary.results
    # "The Red." is right after EvalAI's normalisation (a first-word match would miss it)
    right = sum(i % 3 != 2 for i in range(len(benchmark.samples)))
    assert abs(result.score - 100 * right / len(benchmark.samples)) < 1e-9
    assert trained["score"] == round(result.score, 5)
    assert abs(100 * trained["accuracy"]["all"] - result.score) < 1e-3
    for kind, share in trained["accuracy"].items():
        if kind != "all":
            assert abs(100 * share - result.scores[f"{kind}/score"]) < 1e-3, kind


def test_training_asks_easy_vqa_as_prumerge_eval_does() -> None:
    """The same questions, short-answer instruction included, grouped by image in id order."""
    from prumerge.data.easy_vqa import load_easy_vqa
    from prumerge.data.sample import SHORT_ANSWER
    from prumerge.train.evaluate import easy_vqa_groups

    groups = easy_vqa_groups(max_images=3)
    ids, turns, paths = load_easy_vqa("test")
    asked: dict[int, list[tuple[str, str, str]]] = {}
    for s in load_benchmark("easy-vqa").samples:
        asked.setdefault(s.meta["image_id"], []).append((s.prompt, s.answers[0], s.subtask))
    assert len(groups) == 3
    for image_id, (load, items) in zip(ids[:3], groups, strict=True):
        assert items == asked[image_id]
        assert [(q, a) for q, a, _ in items] == [(q + SHORT_ANSWER, a) for q, a in turns[image_id]]
        with Image.open(paths[image_id]) as image:
            assert load().tobytes() == image.convert("RGB").tobytes()
