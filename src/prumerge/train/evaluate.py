"""Quick accuracy checks of a trained default model: easy-vqa and generated scenes.

Both read their questions from the eval harness's own loaders (``benchmark_groups``), so
they ask what ``prumerge eval`` asks, LLaVA's short-answer instruction included
(``prumerge.data.sample.SHORT_ANSWER``, the one training appends at ``instruction_rate``).
They answer every question of an image through one shared prefix
(``prumerge.shared_prefix``), with the reduction given, greedy, and score it with the
benchmark harness's own metric (``exact_match`` of ``prumerge.eval.metrics``, after EvalAI's
normalisation), so a training report and ``prumerge eval`` give the same score on the same
answers (``score_answers``). The harness is the reference for reported tables; these run
inside training and the recipe, in a few minutes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from prumerge.data.easy_vqa import is_negated

__all__ = [
    "benchmark_groups",
    "easy_vqa_groups",
    "evaluate_easy_vqa",
    "evaluate_groups",
    "evaluate_synth",
    "score_answers",
    "synth_groups",
]

Group = tuple[Callable[[], Any], list[tuple[str, str, str]]]  # image, (question, answer, kind)


def evaluate_groups(
    model: Any,
    processor: Any,
    groups: Sequence[Group],
    *,
    method: str = "none",
    options: dict[str, Any] | None = None,
    batch_images: int = 8,
    progress: str | None = None,
) -> dict[str, Any]:
    """Exact-match accuracy per question kind, under one reduction.

    Args:
        model: the default model (``LlavaForConditionalGeneration``).
        processor: its processor.
        groups: per image, a zero-argument loader and its (question, answer, kind) triples.
        method, options: the reduction (``prumerge.apply`` arguments).
        batch_images: images per shared-prefix batch.
        progress: a tqdm description, or None for no bar.

    Returns:
        ``{"accuracy": {kind..., "all"}, "counts": {kind: n}, "mean_tokens": float,
        "questions": n, "images": n, "yes_no_cells": {...}}``; the cells split easy-vqa's
        yes/no questions by form (plain/negated) and answer.
    """
    import prumerge
    from prumerge.models.default import format_prompt
    from prumerge.shared_prefix import answer_shared_prefix

    triples: list[tuple[str, str, str]] = []
    guesses: list[str] = []
    tokens: list[int] = []
    bar = None
    if progress is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(groups), desc=progress, unit="img", leave=False)
    with prumerge.apply(model, method, **(options or {})) as handle:
        for start in range(0, len(groups), batch_images):
            chunk = groups[start : start + batch_images]
            images = [load() for load, _ in chunk]
            answers = answer_shared_prefix(
                model,
                processor,
                handle,
                images,
                [[q for q, _, _ in items] for _, items in chunk],
                lambda q: format_prompt(processor, q),
                max_new_tokens=4,
            )
            tokens += handle.stats.tokens_out
            for (_, items), answered in zip(chunk, answers, strict=True):
                triples += items
                guesses += list(answered)
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    result = score_answers(triples, guesses)
    result["mean_tokens"] = round(sum(tokens) / max(1, len(tokens)), 2)
    result["images"] = len(groups)
    return result


def score_answers(items: Sequence[tuple[str, str, str]], guesses: Sequence[str]) -> dict[str, Any]:
    """Accuracy per question kind of ``guesses`` against ``items``' answers, scored by the
    eval harness's ``exact_match`` metric (EvalAI normalisation), record for record.

    Args:
        items: (question, answer, kind) per question.
        guesses: the model's answer per question.

    Returns:
        ``{"accuracy": {kind..., "all"}, "counts": {kind: n}, "questions": n,
        "score": the harness's headline score (%)}``, plus ``"yes_no_cells"`` that split
        easy-vqa's yes/no questions by form (plain/negated) and answer.
    """
    from prumerge.eval.metrics import exact_match, score_records

    correct: dict[str, int] = {}
    total: dict[str, int] = {}
    cells = {f"{f}/{a}": [0, 0] for f in ("plain", "negated") for a in ("no", "yes")}
    records = []
    for (question, truth, kind), guess in zip(items, guesses, strict=True):
        right = int(exact_match(guess, [truth]))
        records.append({"prediction": guess, "answers": [truth], "subtask": kind})
        total[kind] = total.get(kind, 0) + 1
        correct[kind] = correct.get(kind, 0) + right
        if kind == "yes/no":
            form = "negated" if is_negated(question) else "plain"
            cells[f"{form}/{truth}"][0] += right
            cells[f"{form}/{truth}"][1] += 1
    accuracy = {k: round(correct[k] / total[k], 5) for k in sorted(total)}
    accuracy["all"] = round(sum(correct.values()) / max(1, sum(total.values())), 5)
    result: dict[str, Any] = {
        "accuracy": accuracy,
        "counts": dict(sorted(total.items())),
        "questions": sum(total.values()),
        "score": round(score_records("exact_match", records).get("score", 0.0), 5),
    }
    if any(c[1] for c in cells.values()):
        result["yes_no_cells"] = cells
    return result


def evaluate_easy_vqa(
    model: Any,
    processor: Any,
    max_images: int | None = None,
    *,
    method: str = "none",
    options: dict[str, Any] | None = None,
    batch_images: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """easy-vqa's test split (the first ``max_images`` images by id; None: all 1,000 images,
    9,673 questions), each question with LLaVA's short-answer instruction, as
    ``prumerge eval --benchmark easy-vqa`` asks it (``easy_vqa_groups``)."""
    groups = easy_vqa_groups(max_images)
    start = time.time()
    result = evaluate_groups(
        model,
        processor,
        groups,
        method=method,
        options=options,
        batch_images=batch_images,
        progress=f"easy-vqa {method}" if progress else None,
    )
    result["subset"] = (
        "all test images" if max_images is None else f"first {len(groups)} test images"
    )
    result["seconds"] = round(time.time() - start, 1)
    return result


def benchmark_groups(name: str, image_key: str, **options: Any) -> dict[Any, Group]:
    """The eval harness's own ``name`` loader, its questions grouped by image: the same
    images, prompts (answer instruction included), answers and subtasks as
    ``prumerge eval --benchmark NAME``.

    Args:
        name: the benchmark (``prumerge.eval.datasets``).
        image_key: the ``Sample.meta`` key that names a sample's image.
        options: the loader's options.

    Returns:
        ``{image: (loader, [(prompt, answer, subtask), ...])}``, images in first-seen order.
    """
    from prumerge.eval.datasets import get_benchmark

    groups: dict[Any, Group] = {}
    for sample in get_benchmark(name).loader(None, **options):
        _, items = groups.setdefault(sample.meta[image_key], (sample.load_image, []))
        items.append((sample.prompt, sample.answers[0], sample.subtask))
    return groups


def easy_vqa_groups(max_images: int | None = None) -> list[Group]:
    """easy-vqa's test questions by image, the first ``max_images`` images by id (None: all),
    from the eval harness's own loader (``benchmark_groups``)."""
    groups = benchmark_groups("easy-vqa", "image_id", split="test")
    return [groups[image_id] for image_id in sorted(groups)[:max_images]]


def synth_groups(scenes: int) -> list[Group]:
    """The first ``scenes`` test scenes (seed 0), from the eval harness's own ``synth`` loader
    (``benchmark_groups``)."""
    return list(benchmark_groups("synth", "scene", n_scenes=scenes).values())


def evaluate_synth(
    model: Any,
    processor: Any,
    scenes: int = 100,
    *,
    method: str = "none",
    options: dict[str, Any] | None = None,
    batch_images: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """The generated benchmark's test split (its first ``scenes`` scenes, seed 0), each
    question with LLaVA's short-answer instruction as the benchmark asks it."""
    groups = synth_groups(scenes)
    start = time.time()
    result = evaluate_groups(
        model,
        processor,
        groups,
        method=method,
        options=options,
        batch_images=batch_images,
        progress=f"synth {method}" if progress else None,
    )
    result["subset"] = f"first {scenes} test scenes"
    result["seconds"] = round(time.time() - start, 1)
    return result
