"""Metrics against hand-worked examples (values worked out on paper, not by running the code)."""

from __future__ import annotations

import pytest

from prumerge.errors import PrumergeError
from prumerge.eval.metrics import (
    METRICS,
    exact_match,
    get_metric,
    mme_parse,
    mme_scores,
    normalize_answer,
    pope_parse,
    pope_scores,
    score_records,
    sqa_parse_choice,
    vqa_accuracy,
)

# --- EvalAI normalisation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # number words become digits; "none" counts as zero
        ("Two", "2"),
        ("ten", "10"),
        ("none", "0"),
        ("eleven", "eleven"),
        ("two dogs", "2 dogs"),
        # articles dropped, wherever they stand
        ("A dog", "dog"),
        ("an apple", "apple"),
        ("the man and the dog", "man and dog"),
        ("theater", "theater"),
        # periods: removed unless a digit follows ("3." loses its period, "2.5" keeps it)
        ("Yes.", "yes"),
        ("3.", "3"),
        ("2.5", "2.5"),
        (".5", ".5"),
        ("mr. t", "mr t"),
        # commas are deleted before anything else, so thousands separators vanish
        ("1,000", "1000"),
        ("red, white", "red white"),
        # a mark touching a space is deleted, otherwise it becomes a space
        ("t-shirt", "t shirt"),
        ("yes - it is", "yes it is"),
        ("yes!", "yes"),
        ("(left)", "left"),
        ("a/b", "b"),  # "/" becomes a space, then the article "a" is dropped
        ("50%", "50%"),  # "%" is not in the list
        # question marks deleted; a possessive 's is split off
        ("why?", "why"),
        ("man's hat", "man 's hat"),
        # contractions written without an apostrophe get it back; those with it stay
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("can't", "can't"),
        ("couldnt've", "couldn't've"),
        ("oclock", "o'clock"),
        # capitalised keys of the reference table never fire: the text is lowercased first
        ("Im", "im"),
        # the reference's one backwards entry
        ("somebody'd", "somebodyd"),
        # whitespace
        ("  New\tYork \n", "new york"),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


# --- VQA accuracy -----------------------------------------------------------------------------

TEN = ["two", "2", "2", "3", "3", "3", "3", "4", "4", "4"]


def test_vqa_accuracy_hand_worked() -> None:
    # "Two." normalises to "2", which 3 of the 10 answers are. Leaving out one of those three
    # leaves 2 matches (2/3); leaving out any of the other seven leaves 3 (1.0).
    # (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert vqa_accuracy("Two.", TEN) == pytest.approx(0.9)
    assert vqa_accuracy("3", TEN) == pytest.approx(1.0)  # 4 matches: every subset has >= 3
    assert vqa_accuracy("four", TEN) == pytest.approx(0.9)
    assert vqa_accuracy("5", TEN) == 0.0


def test_vqa_accuracy_one_and_two_matches() -> None:
    one = ["cat"] + ["dog"] * 9
    # leaving out "cat" leaves 0 matches; the other 9 subsets keep it: 9 * (1/3) / 10
    assert vqa_accuracy("cat", one) == pytest.approx(0.3)
    two = ["cat", "cat"] + ["dog"] * 8
    # 2 subsets with 1 match (1/3), 8 with 2 matches (2/3): (2/3 + 16/3) / 10 = 0.6
    assert vqa_accuracy("The cat", two) == pytest.approx(0.6)


def test_vqa_accuracy_normalises_references_too() -> None:
    assert vqa_accuracy("2", ["Two"] * 10) == 1.0
    assert vqa_accuracy("2", ["two"]) == 1.0  # single answer: exact match
    with pytest.raises(ValueError):
        vqa_accuracy("2", [])


def test_exact_match() -> None:
    assert exact_match("The Red.", ["red"]) == 1.0
    assert exact_match("three", ["3"]) == 1.0
    assert exact_match("reddish", ["red"]) == 0.0
    assert exact_match("blue", ["red", "blue"]) == 1.0


# --- POPE -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("no", "no"),
        ("Yes, there is a dog in the image.", "yes"),
        ("No, there is no dog.", "no"),
        ("There is not a dog.", "no"),
        ("There is a dog. It is not a cat.", "yes"),  # only the first sentence counts
        ("Not really", "yes"),  # "Not" capitalised is not in the list
        ("No,", "no"),  # comma dropped before splitting
        ("Nope", "yes"),
        ("", "yes"),
    ],
)
def test_pope_parse(text: str, expected: str) -> None:
    assert pope_parse(text) == expected


def test_pope_scores_hand_worked() -> None:
    predictions = ["Yes", "Yes", "No", "Yes", "No", "No"]
    labels = ["yes", "yes", "yes", "no", "no", "no"]
    scores = pope_scores(predictions, labels)
    # TP=2 FN=1 FP=1 TN=2: acc 4/6, precision 2/3, recall 2/3, F1 2/3, yes ratio 3/6
    assert (scores["tp"], scores["fn"], scores["fp"], scores["tn"]) == (2, 1, 1, 2)
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    assert scores["yes_ratio"] == pytest.approx(0.5)


def test_pope_scores_all_no_does_not_divide_by_zero() -> None:
    scores = pope_scores(["No", "No"], ["yes", "no"])
    assert scores["precision"] == 0.0 and scores["f1"] == 0.0 and scores["accuracy"] == 0.5


def test_pope_record_aggregate_averages_split_f1() -> None:
    def rec(pred: str, label: str, split: str) -> dict:
        return {"prediction": pred, "answers": [label], "subtask": split, "meta": {}}

    records = [
        # random: TP=1 TN=1 -> F1 1.0
        rec("Yes", "yes", "random"),
        rec("No", "no", "random"),
        # adversarial: TP=1 FP=1 -> precision 0.5, recall 1, F1 2/3
        rec("Yes", "yes", "adversarial"),
        rec("Yes", "no", "adversarial"),
    ]
    out = score_records("pope", records)
    assert out["random/f1"] == pytest.approx(100.0)
    assert out["adversarial/f1"] == pytest.approx(200.0 / 3)
    assert out["adversarial/yes_ratio"] == pytest.approx(100.0)
    assert out["score"] == pytest.approx((100.0 + 200.0 / 3) / 2)


# --- MME --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("no.", "no"),
        ("Y", "yes"),
        ("n", "no"),
        ("x", "other"),
        ("Yes, it is.", "yes"),
        ("No, it is not.", "no"),
        ("I think yes", "other"),  # "yes" is not within the first four characters
        ("Not sure", "no"),  # "no" is within "not "
        ("", "other"),
    ],
)
def test_mme_parse(text: str, expected: str) -> None:
    assert mme_parse(text) == expected


def test_mme_scores_hand_worked() -> None:
    items = [
        # existence: image a both right, image b one right -> acc 3/4, acc+ 1/2 -> 125
        ("existence", "a", "Yes", "Yes"),
        ("existence", "a", "No", "No"),
        ("existence", "b", "Yes", "Yes"),
        ("existence", "b", "Yes", "No"),
        # count: both images both right -> 200
        ("count", "c", "yes", "Yes"),
        ("count", "c", "no", "No"),
        ("count", "d", "Yes.", "Yes"),
        ("count", "d", "No", "No"),
        # code_reasoning (cognition): one image, none right -> 0
        ("code_reasoning", "e", "maybe", "Yes"),
        ("code_reasoning", "e", "Yes", "No"),
    ]
    out = mme_scores(items)
    assert out["existence"] == pytest.approx(125.0)
    assert out["count"] == pytest.approx(200.0)
    assert out["code_reasoning"] == 0.0
    assert out["perception"] == pytest.approx(325.0)
    assert out["cognition"] == 0.0
    assert out["total"] == pytest.approx(325.0)

    records = [
        {"prediction": p, "answers": [g], "subtask": s, "meta": {"image": i}}
        for s, i, p, g in items
    ]
    agg = score_records("mme", records)
    assert agg["score"] == pytest.approx(325.0)  # the headline is perception


# --- ScienceQA --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "num_choices", "expected"),
    [
        ("A", 4, 0),
        (" C ", 4, 2),
        ("B. Louisiana", 4, 1),
        ("B.", 4, -1),  # neither a bare letter nor "B. " (too short)
        ("D", 2, -1),  # beyond the choices
        ("The answer is C.", 4, 2),
        ("Because of X. The answer is B", 3, 1),
        ("b", 4, -1),  # letters are case-sensitive, as in LLaVA
        ("Louisiana", 4, -1),
        ("A\nbecause", 4, 0),  # the newline becomes ". ", so it starts with "A. "
    ],
)
def test_sqa_parse_choice(text: str, num_choices: int, expected: int) -> None:
    assert sqa_parse_choice(text, num_choices) == expected


def test_sqa_records() -> None:
    records = [
        {"prediction": "A", "answers": ["A"], "meta": {"num_choices": 2}},
        {"prediction": "B. no", "answers": ["A"], "meta": {"num_choices": 2}},
        {"prediction": "C", "answers": ["C"], "meta": {"num_choices": 3}},
        {"prediction": "C", "answers": ["C"], "meta": {"num_choices": 2}},  # C out of range
    ]
    assert score_records("sqa_letter", records)["score"] == pytest.approx(50.0)


# --- registry ---------------------------------------------------------------------------------


def test_breakdown_by_subtask_and_unanswered_records_skipped() -> None:
    records = [
        {"prediction": "red", "answers": ["red"], "subtask": "color"},
        {"prediction": "two", "answers": ["3"], "subtask": "count"},
        {"prediction": "3", "answers": ["3"], "subtask": "count"},
        {"prediction": "x", "answers": [], "subtask": "count"},  # no reference: not scored
    ]
    out = score_records("exact_match", records)
    assert out["score"] == pytest.approx(200.0 / 3)
    assert out["color/score"] == 100.0 and out["count/score"] == 50.0 and out["n"] == 3
    assert score_records("exact_match", records[3:]) == {}


@pytest.mark.parametrize("name", sorted(METRICS))
def test_every_metric_handles_empty_input(name: str) -> None:
    assert METRICS[name]([]) == {}


def test_unknown_metric() -> None:
    with pytest.raises(PrumergeError, match="unknown metric 'nope'"):
        get_metric("nope")
