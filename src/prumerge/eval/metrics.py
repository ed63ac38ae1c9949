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
  lmms-eval), then the VQA leave-one-out accuracy.
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
# EvalAI answer normalisation
# ---------------------------------------------------------------------------------------------

# Canonical contracted form, then the spellings that map to it. This is the EvalAI table with
# three kinds of entries left out because they can never fire: keys with capitals ("Im",
# "Ive", "Id've", "I'dve") never match since the text is lowercased first, and identity
# entries ("let's", "she's") change nothing. One entry maps *away* from the apostrophe
# ("somebody'd" -> "somebodyd"); that is what the reference does, so it is kept.
_CONTRACTIONS_TABLE = """
ain't aint
aren't arent
can't cant
could've couldve
couldn't couldnt
couldn't've couldn'tve couldnt've
didn't didnt
doesn't doesnt
don't dont
hadn't hadnt
hadn't've hadnt've hadn'tve
hasn't hasnt
haven't havent
he'd hed
he'd've hed've he'dve
he's hes
how'd howd
how'll howll
how's hows
isn't isnt
it'd itd
it'd've itd've it'dve
it'll itll
ma'am maam
mightn't mightnt
mightn't've mightnt've mightn'tve
might've mightve
mustn't mustnt
must've mustve
needn't neednt
not've notve
o'clock oclock
oughtn't oughtnt
'ow's'at ow's'at 'ows'at 'ow'sat
shan't shant
she'd've shed've she'dve
should've shouldve
shouldn't shouldnt
shouldn't've shouldnt've shouldn'tve
somebodyd somebody'd
somebody'd've somebodyd've somebody'dve
somebody'll somebodyll
somebody's somebodys
someone'd someoned
someone'd've someoned've someone'dve
someone'll someonell
someone's someones
something'd somethingd
something'd've somethingd've something'dve
something'll somethingll
that's thats
there'd thered
there'd've thered've there'dve
there're therere
there's theres
they'd theyd
they'd've theyd've they'dve
they'll theyll
they're theyre
they've theyve
'twas twas
wasn't wasnt
we'd've wed've we'dve
we've weve
weren't werent
what'll whatll
what're whatre
what's whats
what've whatve
when's whens
where'd whered
where's wheres
where've whereve
who'd whod
who'd've whod've who'dve
who'll wholl
who's whos
who've whove
why'll whyll
why're whyre
why's whys
won't wont
would've wouldve
wouldn't wouldnt
wouldn't've wouldnt've wouldn'tve
y'all yall
y'all'll yall'll y'allll
y'all'd've yall'd've y'alld've y'all'dve
you'd youd
you'd've youd've you'dve
you'll youll
you're youre
you've youve
"""

CONTRACTIONS: dict[str, str] = {
    spelling: line.split()[0]
    for line in _CONTRACTIONS_TABLE.strip().splitlines()
    for spelling in line.split()[1:]
}

# "none" counts as zero in the reference too.
NUMBER_WORDS: dict[str, str] = {
    word: str(value)
    for value, word in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    )
} | {"none": "0"}

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# Characters that are deleted when they touch a space (or when the text holds a digit-comma-digit
# group), and otherwise replaced by a space. A period is not in the list; it has its own rule.
PUNCTUATION: tuple[str, ...] = tuple(';/[]"{}()=+\\_-><@`,?!')

# The reference writes this as "(?!<=\d)(\.)(?!\d)". The first group is a malformed lookbehind
# (a lookahead for the literal "<=" and a digit) that never blocks a match, so in effect a
# period is removed unless a digit follows it: "3." -> "3" but "2.5" stays. We reproduce the
# effect, not the intent.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d),+(?=\d)")


def _strip_punctuation(text: str) -> str:
    # The decision to delete or to space out a mark is made on the text as it was before any
    # mark was handled (the reference tests its input, not its running output).
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if delete_all or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    # The reference passes re.UNICODE (= 32) where `count` goes, so it removes at most 32
    # periods; no real answer has more, and we remove them all.
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _map_words(text: str) -> str:
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(text: str) -> str:
    """Normalise an answer the way EvalAI's VQA evaluation does.

    Steps, in the reference's order: lowercase; delete commas and question marks; split off
    a possessive ``'s`` as its own word; turn newlines and tabs into spaces; punctuation
    rules (see :data:`PUNCTUATION`); delete periods not followed by a digit; number words
    zero to ten (and "none") to digits; drop the articles a/an/the; expand contractions
    written without their apostrophe ("dont" -> "don't").

    Args:
        text: A predicted or reference answer.

    Returns:
        The normalised answer; words are separated by single spaces.

    Examples:
        >>> normalize_answer("Two dogs.")
        '2 dogs'
        >>> normalize_answer("The T-shirt!")
        't shirt'
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _map_words(_strip_punctuation(text))


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
