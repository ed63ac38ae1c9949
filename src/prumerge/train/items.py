"""Training items: an image loader and its (question, answer) turns, from each source."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from typing import Any

from prumerge.data.easy_vqa import balanced_keep_rates, is_negated, load_easy_vqa
from prumerge.data.sample import SHORT_ANSWER

__all__ = ["Item", "default_model_items", "llava_json_items", "open_image"]

Item = tuple[Callable[[], Any], list[tuple[str, str]]]


def open_image(path: str) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def default_model_items(cfg: Any, log: Callable[[str], None]) -> tuple[list[Item], int]:
    """easy-vqa's training split, then generated scenes (train split, never the test split).

    With ``synth_questions`` (comma-separated question types), a scene keeps only those
    questions, and a scene left with none is skipped.

    Each image's turns are shuffled once with the seed; with ``balance_yes_no`` easy-vqa's
    yes/no turns are subsampled per (plain/negated, answer) cell, and an image left with no
    turn is skipped; with ``minority_repeat`` N, each easy-vqa yes/no turn of a minority cell
    (the cells balancing keeps whole) appears N times instead; each question carries the
    short-answer instruction with probability ``instruction_rate``.

    Returns:
        ``(items, number of easy-vqa items)``; the easy-vqa items come first.
    """
    ids, turns, paths = load_easy_vqa("train")
    if cfg.train_images is not None:
        ids = ids[: cfg.train_images]
    items: list[Item] = [(functools.partial(open_image, paths[i]), list(turns[i])) for i in ids]
    num_easy = len(items)
    if cfg.synth_scenes > 0:
        from prumerge.data import synth

        wanted = set(cfg.synth_questions.split(",")) if cfg.synth_questions else None
        for scene in synth.generate(cfg.synth_scenes, split="train", seed=cfg.seed):
            draw = functools.partial(synth.render, scene.objects, scene.config)
            scene_turns = [
                (q.question, q.answer)
                for q in scene.questions
                if wanted is None or q.subtask in wanted
            ]
            if scene_turns:
                items.append((draw, scene_turns))
    rng = random.Random(cfg.seed)
    rates: dict[tuple[bool, str], float] = {}
    minority: set[tuple[bool, str]] = set()
    repeat = cfg.minority_repeat
    if cfg.balance_yes_no or repeat > 1:
        every = [t for _, item_turns in items[:num_easy] for t in item_turns]
        cell_rates = balanced_keep_rates([q for q, _ in every], [a for _, a in every])
        minority = {cell for cell, rate in cell_rates.items() if rate == 1.0}
        if cfg.balance_yes_no:
            rates = cell_rates
            log("yes/no keep rates: " + ", ".join(f"{k}: {v:.3f}" for k, v in rates.items()))
    shaped: list[Item] = []
    emptied = 0  # easy-vqa images whose every turn the balancing dropped
    for position, (load, item_turns) in enumerate(items):
        kept = list(item_turns)
        if rates and position < num_easy:
            kept = [
                (q, a)
                for q, a in kept
                if a not in ("yes", "no") or rng.random() < rates[(is_negated(q), a)]
            ]
            if not kept:  # an image with no question left has nothing to train on
                emptied += 1
                continue
        if repeat > 1 and position < num_easy:
            kept = [
                turn
                for q, a in kept
                for turn in [(q, a)] * (repeat if (is_negated(q), a) in minority else 1)
            ]
        rng.shuffle(kept)
        kept = [
            (q + SHORT_ANSWER if rng.random() < cfg.instruction_rate else q, a) for q, a in kept
        ]
        shaped.append((load, kept))
    if emptied:
        log(f"{emptied} easy-vqa images left with no question after balancing; skipped")
    return shaped, num_easy - emptied


def llava_json_items(cfg: Any) -> list[Item]:
    """The conversations of a LLaVA instruction file, as items."""
    from prumerge.data.llava_json import read_llava_json

    return [
        (functools.partial(open_image, str(c.image)), list(c.turns))
        for c in read_llava_json(cfg.data, cfg.image_folder)
    ]
