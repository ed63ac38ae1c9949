"""Benchmark metrics, computed the way the community's evaluation scripts compute them.

Each metric exists twice: as a per-answer function (``vqa_accuracy``, ``pope_parse``,
``mme_parse``, ``sqa_parse_choice``, ``exact_match``), and as an aggregator over prediction
records registered in :data:`METRICS` under the name a benchmark declares.

A prediction record is a mapping with at least these keys (the runner writes them):

- ``prediction``: the generated text.
- ``answers``: the reference answers, a list of strings (may be empty when a split has no
  public answers; such records are left out of the score).
- ``subtask``: the task's subdivision (POPE split, MME subtask, synth question type), or None.
- ``meta``: a dict of benchmark-specific fields (``image`` for MME's image pairing,
  ``num_choices`` for ScienceQA).

Sources of the rules, so that numbers here match published ones:

- VQAv2 / TextVQA: the EvalAI answer processor (as used by LLaVA's TextVQA evaluator and by
  lmms-eval; in :mod:`prumerge.eval.normalize`), then the VQA leave-one-out accuracy.
- POPE: LLaVA's ``eval_pope.py`` answer parsing and confusion-matrix metrics.
- MME: the yes/no parsing lmms-eval took from Otter, and MME's own ``acc + acc+`` score.
- ScienceQA-IMG: LLaVA's ``eval_science_qa.py`` letter parsing.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from prumerge.errors import PrumergeError
from prumerge.eval.normalize import normalize_answer

__all__ = [
    "METRICS",
    "MME_COGNITION",
    "MME_PERCEPTION",
    "MetricFn",
    "exact_match",
    "get_metric",
    "mme_parse",
    "mme_scores",
    "normalize_answer",
    "pope_parse",
    "pope_scores",
    "register_metric",
    "score_records",
    "sqa_parse_choice",
    "vqa_accuracy",
]

# ---------------------------------------------------------------------------------------------
# Per-answer metrics
# ---------------------------------------------------------------------------------------------


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against its human answers (VQAv2, TextVQA).

    Both sides are normalised with :func:`normalize_answer`, as LLaVA's TextVQA evaluator and
    lmms-eval do. (The official VQA script normalises the human answers only when they
    disagree; they are stored normalised already, so the two agree in practice.) For each of
    the n answers, take
    the other n-1 as a subset and score ``min(1, matches / 3)``; the accuracy is the mean
    over the n subsets. With the usual 10 answers, 1 match scores 0.3, 2 score 0.6 and 3 or
    more score 1.0 (4 matches: 0.6 * 4/10 + 1.0 * 6/10 = 1.0, because each subset still holds
    at least 3).

    Args:
        prediction: The generated answer.
        answers: The human answers (10 in VQAv2 and TextVQA). With a single answer the
            leave-one-out subsets are empty; that case falls back to exact match.

    Returns:
        The accuracy in [0, 1].

    Raises:
        ValueError: If ``answers`` is empty.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    predicted = normalize_answer(prediction)
    refs = [normalize_answer(answer) for answer in answers]
    if len(refs) == 1:
        return float(predicted == refs[0])
    total_matches = sum(ref == predicted for ref in refs)
    per_subset = [
        min(1.0, (total_matches - (ref == predicted)) / 3.0)  # leave answer i out
        for ref in refs
    ]
    return sum(per_subset) / len(per_subset)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference answer, else 0.0.

    Used for easy-vqa and the generated benchmark, whose answers are single words.

    Args:
        prediction: The generated answer.
        answers: The accepted answers.

    Returns:
        1.0 or 0.0.
    """
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(answer) for answer in answers))


def pope_parse(prediction: str) -> str:
    """Read a POPE answer as "yes" or "no", as LLaVA's ``eval_pope.py`` does.

    Keep the text before the first period, delete commas, split on single spaces; the answer
    is "no" if one of the words is exactly "no", "No" or "not", else "yes". Everything that is
    not a recognisable no (including empty or off-topic text) counts as yes.

    Args:
        prediction: The generated text.

    Returns:
        "yes" or "no".
    """
    first_sentence = prediction.split(".")[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if {"no", "No", "not"} & set(words) else "yes"


def pope_scores(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE metrics for one split, "yes" being the positive class.

    Args:
        predictions: Generated texts, parsed with :func:`pope_parse`.
        labels: Reference labels; "no" is negative, anything else positive (as in LLaVA).

    Returns:
        ``accuracy``, ``precision``, ``recall``, ``f1`` and ``yes_ratio`` in [0, 1], and the
        counts ``tp``, ``fp``, ``tn``, ``fn`` and ``n``. Where a ratio's denominator is zero
        (LLaVA's script raises), it is reported as 0.0.

    Raises:
        ValueError: If the two sequences differ in length or are empty.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError("pope_scores needs at least one prediction")
    said_yes = [pope_parse(text) == "yes" for text in predictions]
    is_yes = [label.strip().lower() != "no" for label in labels]
    tp = sum(p and t for p, t in zip(said_yes, is_yes, strict=True))
    fp = sum(p and not t for p, t in zip(said_yes, is_yes, strict=True))
    tn = sum(not p and not t for p, t in zip(said_yes, is_yes, strict=True))
    fn = sum(not p and t for p, t in zip(said_yes, is_yes, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(labels)
    return {
        "accuracy": (tp + tn) / n,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(said_yes) / n,
        "tp": float(tp),
        "fp": float(fp),
        "tn": float(tn),
        "fn": float(fn),
        "n": float(n),
    }


MME_PERCEPTION: tuple[str, ...] = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION: tuple[str, ...] = (
    "commonsense_reasoning",
    "numerical_calculation",
    "text_translation",
    "code_reasoning",
)


def mme_parse(prediction: str) -> str:
    """Read an MME answer as "yes", "no" or "other".

    Lowercase, strip, delete periods; then "yes"/"no" exactly, "y"/"n" as a single letter, or
    else look for "yes" (first) or "no" within the first four characters.

    Args:
        prediction: The generated text (or a reference answer such as "Yes").

    Returns:
        "yes", "no" or "other".
    """
    text = prediction.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def mme_scores(items: Iterable[tuple[str, str, str, str]]) -> dict[str, float]:
    """MME scores: per subtask ``100·acc + 100·acc+``, and the perception/cognition sums.

    ``acc`` is the fraction of questions answered right; ``acc+`` the fraction of images whose
    questions (two per image in MME) are all answered right. Each subtask thus scores at most
    200; perception (10 subtasks) at most 2000 and cognition (4) at most 800.

    Args:
        items: ``(subtask, image, prediction, reference)`` per question. ``image`` identifies
            the image a question belongs to, for ``acc+``.

    Returns:
        ``<subtask>`` score for each subtask present, ``perception`` and ``cognition`` (sums
        over the subtasks present of each kind) and ``total``. Subtasks outside MME's 14 count
        in ``total`` only.
    """
    right_by_image: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for subtask, image, prediction, reference in items:
        right = mme_parse(prediction) == mme_parse(reference)
        right_by_image[subtask][image].append(right)
    out: dict[str, float] = {}
    for subtask, per_image in right_by_image.items():
        answers = [right for rights in per_image.values() for right in rights]
        acc = sum(answers) / len(answers)
        acc_plus = sum(all(rights) for rights in per_image.values()) / len(per_image)
        out[subtask] = 100.0 * acc + 100.0 * acc_plus
    out["perception"] = sum(out.get(name, 0.0) for name in MME_PERCEPTION)
    out["cognition"] = sum(out.get(name, 0.0) for name in MME_COGNITION)
    out["total"] = sum(score for name, score in out.items() if name in right_by_image)
    return out


_OPTION_LETTERS = "ABCDE"
_ANSWER_IS_WITH_PERIOD = re.compile(r"The answer is ([A-E])\.")
_ANSWER_IS = re.compile(r"The answer is ([A-E])")


def sqa_parse_choice(prediction: str, num_choices: int) -> int:
    """Read a ScienceQA answer as an option index, as LLaVA's ``eval_science_qa.py`` does.

    Newlines become ". ". The answer is the option letter if the stripped text is one of
    A-E, or if the text starts with a letter and ". " ("B. Louisiana"), or else the letter in
    "The answer is X." (then "The answer is X"). A letter beyond the question's choices is
    no answer.

    Args:
        prediction: The generated text.
        num_choices: How many options the question has.

    Returns:
        The 0-based option index, or -1 when no option can be read.
    """
    text = prediction.replace("\n", ". ")
    letter: str | None = None
    if text.strip() in _OPTION_LETTERS and len(text.strip()) == 1:
        letter = text.strip()
    elif len(text) >= 3 and text[0] in _OPTION_LETTERS and text[1:3] == ". ":
        letter = text[0]
    elif "The answer is " in text:
        match = _ANSWER_IS_WITH_PERIOD.search(text) or _ANSWER_IS.search(text)
        letter = match.group(1) if match else None
    if letter is None:
        return -1
    index = _OPTION_LETTERS.index(letter)
    return index if index < num_choices else -1


# ---------------------------------------------------------------------------------------------
# Aggregators over prediction records
# ---------------------------------------------------------------------------------------------

MetricFn = Callable[[Sequence[Mapping[str, Any]]], dict[str, float]]
"""Scores a list of prediction records. The result holds a headline ``score`` (a percentage,
or MME points) and named details; it is empty when no record has reference answers."""

METRICS: dict[str, MetricFn] = {}
METRIC_DESCRIPTIONS: dict[str, str] = {}


def register_metric(name: str, description: str) -> Callable[[MetricFn], MetricFn]:
    """Register a record aggregator under ``name``.

    Args:
        name: The name benchmarks use to declare their metric.
        description: What the headline ``score`` is, for tables and plots.

    Returns:
        A decorator that registers the function and returns it unchanged.
    """

    def decorator(fn: MetricFn) -> MetricFn:
        if name in METRICS:
            raise ValueError(f"metric {name!r} is already registered")
        METRICS[name] = fn
        METRIC_DESCRIPTIONS[name] = description
        return fn

    return decorator


def get_metric(name: str) -> MetricFn:
    """Look up a registered metric.

    Raises:
        PrumergeError: If no metric has that name.
    """
    try:
        return METRICS[name]
    except KeyError:
        known = ", ".join(sorted(METRICS))
        raise PrumergeError(f"unknown metric {name!r}; known metrics: {known}") from None


def score_records(metric: str, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Score records with the metric registered as ``metric``."""
    return get_metric(metric)(records)


def _answered(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [record for record in records if record.get("answers")]


def _mean_with_breakdown(
    records: Sequence[Mapping[str, Any]], per_record: Callable[[str, Sequence[str]], float]
) -> dict[str, float]:
    scored = _answered(records)
    if not scored:
        return {}
    by_subtask: dict[str, list[float]] = defaultdict(list)
    values = []
    for record in scored:
        value = per_record(record["prediction"], record["answers"])
        values.append(value)
        if record.get("subtask"):
            by_subtask[str(record["subtask"])].append(value)
    out = {"score": 100.0 * sum(values) / len(values), "n": float(len(values))}
    for subtask in sorted(by_subtask):
        subtask_values = by_subtask[subtask]
        out[f"{subtask}/score"] = 100.0 * sum(subtask_values) / len(subtask_values)
        out[f"{subtask}/n"] = float(len(subtask_values))
    return out


@register_metric("vqa_accuracy", "VQA accuracy (%)")
def _vqa_accuracy_records(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    return _mean_with_breakdown(records, vqa_accuracy)


@register_metric("exact_match", "exact match after EvalAI normalisation (%)")
def _exact_match_records(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    return _mean_with_breakdown(records, exact_match)


@register_metric("pope", "POPE F1 (%), mean over the splits present")
def _pope_records(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    scored = _answered(records)
    if not scored:
        return {}
    by_split: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for record in scored:
        by_split[str(record.get("subtask") or "all")].append(record)
    out: dict[str, float] = {}
    for split in sorted(by_split):
        split_records = by_split[split]
        split_scores = pope_scores(
            [r["prediction"] for r in split_records], [r["answers"][0] for r in split_records]
        )
        for key, value in split_scores.items():
            percent = key in ("accuracy", "precision", "recall", "f1", "yes_ratio")
            out[f"{split}/{key}"] = 100.0 * value if percent else value
    # Papers (LLaVA-1.5 and the token-reduction papers after it) report the F1 averaged over
    # the random, popular and adversarial splits.
    f1s = [out[f"{split}/f1"] for split in by_split]
    out["score"] = sum(f1s) / len(f1s)
    out["n"] = float(len(scored))
    return out


@register_metric("mme", "MME perception score (sum of acc+acc+ over the perception subtasks)")
def _mme_records(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    scored = _answered(records)
    if not scored:
        return {}
    out = mme_scores(
        (
            str(r.get("subtask")),
            str(r.get("meta", {}).get("image", r.get("id"))),
            r["prediction"],
            r["answers"][0],
        )
        for r in scored
    )
    # The headline is perception, as the PruMerge paper reports MME(P); with only cognition
    # subtasks present it falls back to cognition.
    has_perception = any(r.get("subtask") in MME_PERCEPTION for r in scored)
    out["score"] = out["perception"] if has_perception else out["cognition"]
    out["n"] = float(len(scored))
    return out


@register_metric("sqa_letter", "ScienceQA option accuracy (%)")
def _sqa_records(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    def correct(record: Mapping[str, Any]) -> float:
        num_choices = int(record.get("meta", {}).get("num_choices", len(_OPTION_LETTERS)))
        chosen = sqa_parse_choice(record["prediction"], num_choices)
        reference = _OPTION_LETTERS.index(record["answers"][0].strip())
        return float(chosen == reference)

    scored = _answered(records)
    if not scored:
        return {}
    values = [correct(record) for record in scored]
    return {"score": 100.0 * sum(values) / len(values), "n": float(len(values))}
