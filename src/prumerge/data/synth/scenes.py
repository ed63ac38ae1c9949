"""Generating scenes: objects placed by a seeded generator, the questions about them, and
the scenes as evaluation samples or as a split written in LLaVA's question-file layout."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path

import numpy as np
from PIL import Image

from prumerge.data.sample import Sample
from prumerge.data.synth.draw import render
from prumerge.data.synth.objects import (
    COLORS,
    PHOTOS,
    PLURALS,
    POPE_SPLITS,
    QUESTION_TYPES,
    SHAPES,
    SPLITS,
    Question,
    SceneObject,
    SynthConfig,
    cell_name,
    pair_popularity,
    pair_weights,
)


@dataclass
class Scene:
    """A generated scene: its objects and questions, and its image, drawn on first access."""

    split: str
    index: int
    objects: tuple[SceneObject, ...]
    questions: list[Question]
    config: SynthConfig

    @property
    def id(self) -> str:
        return f"synth-{self.split}-{self.index:06d}"

    @cached_property
    def image(self) -> Image.Image:
        """The RGB image (drawn once, then kept)."""
        return render(self.objects, self.config)


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {sorted(SPLITS)}")
    return np.random.default_rng([seed, SPLITS[split], index])


def _place_objects(rng: np.random.Generator, config: SynthConfig) -> list[SceneObject]:
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    # A photo patch takes one of the `count` places, so counts stay within the vocabulary; at
    # least one coloured shape remains for the colour and shape questions.
    with_photo = config.photo_patches and count > 1 and rng.random() < config.photo_probability
    n_shapes = count - int(with_photo)
    cells = [divmod(int(c), 3) for c in rng.permutation(9)]
    popularity = pair_popularity()
    pair_index = rng.choice(len(popularity), size=n_shapes, replace=False, p=pair_weights())
    kinds: list[tuple[str | None, str | None, str]] = []
    for i in pair_index:
        pair_color, pair_shape = popularity[int(i)]
        kinds.append((pair_shape, pair_color, f"{pair_color} {pair_shape}"))
    if with_photo:
        photo = sorted(PHOTOS)[int(rng.integers(len(PHOTOS)))]
        kinds.append((None, None, photo))
    cell_size = config.size / 3
    objects = []
    for (shape, color, name), (row, col) in zip(kinds, cells, strict=False):
        side = int(rng.integers(config.object_size[0], config.object_size[1] + 1))
        slack = cell_size - side - 4  # keep a 2 px margin to the cell's edges
        left = int(col * cell_size + 2 + rng.random() * slack)
        top = int(row * cell_size + 2 + rng.random() * slack)
        box = (left, top, left + side, top + side)
        objects.append(SceneObject(name, shape, color, (row, col), box))
    return objects


def _existence_questions(
    rng: np.random.Generator, objects: Sequence[SceneObject], prefix: str
) -> list[Question]:
    shapes = [obj for obj in objects if obj.shape is not None]
    present = {(obj.color, obj.shape) for obj in shapes}
    absent = [pair for pair in pair_popularity() if pair not in present]  # most popular first
    questions = []
    for split in POPE_SPLITS:
        target = objects[int(rng.integers(len(objects)))]
        if split == "random":
            negative = absent[int(rng.integers(len(absent)))]
        elif split == "popular":
            negative = absent[int(rng.integers(min(3, len(absent))))]
        else:
            near = [p for p in absent if any(p[0] == c or p[1] == s for c, s in present)]
            pool = near or absent
            negative = pool[int(rng.integers(len(pool)))]
        subtask = f"exist_{split}"
        for answer, name in (("yes", target.name), ("no", " ".join(negative))):
            article = "an" if name[0] in "aeiou" else "a"
            questions.append(
                Question(
                    id=f"{prefix}-{subtask}-{answer}",
                    subtask=subtask,
                    question=f"Is there {article} {name} in the image?",
                    answer=answer,
                    meta={"pope_split": split, "object": name},
                )
            )
    return questions


def _attribute_questions(
    rng: np.random.Generator, objects: Sequence[SceneObject], prefix: str
) -> list[Question]:
    shapes = [obj for obj in objects if obj.shape is not None]
    questions = []
    for attribute in ("color", "shape"):
        obj = shapes[int(rng.integers(len(shapes)))]
        where = cell_name(*obj.cell)
        answer = obj.color if attribute == "color" else obj.shape
        questions.append(
            Question(
                id=f"{prefix}-{attribute}",
                subtask=attribute,
                question=f"What {attribute} is the object in the {where} of the image?",
                answer=str(answer),
                meta={"cell": list(obj.cell)},
            )
        )
    return questions


def _count_question(
    rng: np.random.Generator, objects: Sequence[SceneObject], prefix: str
) -> Question:
    kind = int(rng.integers(3))
    if kind == 0:
        text, count = "How many objects are there in the image?", len(objects)
    elif kind == 1:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        count = sum(obj.shape == shape for obj in objects)
        text = f"How many {PLURALS[shape]} are there in the image?"
    else:
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        count = sum(obj.color == color for obj in objects)
        text = f"How many {color} objects are there in the image?"
    return Question(id=f"{prefix}-count", subtask="count", question=text, answer=str(count))


def _relation_question(
    rng: np.random.Generator, objects: Sequence[SceneObject], prefix: str
) -> Question | None:
    # Pairs in different columns (for left/right) or rows (for above/below), so the answer is
    # decided by the grid, not by a few pixels of jitter.
    pairs = [(a, b) for a in objects for b in objects if a is not b]
    options = [(a, b, "left") for a, b in pairs if a.cell[1] != b.cell[1]]
    options += [(a, b, "above") for a, b in pairs if a.cell[0] != b.cell[0]]
    if not options:
        return None
    a, b, relation = options[int(rng.integers(len(options)))]
    if relation == "left":
        text = f"Is the {a.name} to the left of the {b.name}?"
        truth = a.cell[1] < b.cell[1]
    else:
        text = f"Is the {a.name} above the {b.name}?"
        truth = a.cell[0] < b.cell[0]
    return Question(
        id=f"{prefix}-relation",
        subtask="relation",
        question=text,
        answer="yes" if truth else "no",
        meta={"relation": relation},
    )


def generate_scene(
    index: int, *, split: str = "test", seed: int = 0, config: SynthConfig | None = None
) -> Scene:
    """Draw scene ``index`` of a split, with its questions.

    Args:
        index: Scene number within the split (any non-negative int; scenes are independent).
        split: "train" or "test".
        seed: Benchmark seed; a different seed gives a different benchmark.
        config: Drawing options; defaults to :class:`SynthConfig()`.

    Returns:
        The scene: its objects, 10 or 11 questions (6 existence, colour, shape, count, and a
        relation question when two objects differ in row or column), and its image, which
        is drawn when first accessed (about a millisecond at 224 px).
    """
    config = config or SynthConfig()
    rng = _rng(seed, split, index)
    objects = _place_objects(rng, config)
    prefix = f"synth-{split}-{index:06d}"
    questions = _existence_questions(rng, objects, prefix)
    questions += _attribute_questions(rng, objects, prefix)
    questions.append(_count_question(rng, objects, prefix))
    relation = _relation_question(rng, objects, prefix)
    if relation is not None:
        questions.append(relation)
    return Scene(split, index, tuple(objects), questions, config)


def generate(
    n_scenes: int,
    *,
    split: str = "train",
    seed: int = 0,
    config: SynthConfig | None = None,
    start: int = 0,
) -> list[Scene]:
    """Draw scenes ``start`` to ``start + n_scenes - 1`` of a split.

    This is the cheap path for training. Each scene draws its image when ``scene.image`` is
    first read and keeps it.

    Args:
        n_scenes: How many scenes.
        split: "train" or "test".
        seed: Benchmark seed.
        config: Drawing options.
        start: Index of the first scene.

    Returns:
        The scenes, in index order.
    """
    return [
        generate_scene(i, split=split, seed=seed, config=config)
        for i in range(start, start + n_scenes)
    ]


def iter_samples(
    n_scenes: int,
    *,
    split: str = "test",
    seed: int = 0,
    config: SynthConfig | None = None,
    question_types: Sequence[str] | None = None,
) -> Iterator[Sample]:
    """The questions of ``n_scenes`` scenes as evaluation samples, scene by scene.

    Args:
        n_scenes: How many scenes.
        split: "train" or "test".
        seed: Benchmark seed.
        config: Drawing options.
        question_types: Keep only these subtasks (see :data:`QUESTION_TYPES`).

    Yields:
        One :class:`~prumerge.eval.datasets.Sample` per question. Its image is a callable that
        draws the scene afresh, so a long list of samples holds no pixels.
    """
    if question_types is not None:
        unknown = set(question_types) - set(QUESTION_TYPES)
        if unknown:
            raise ValueError(f"unknown question types {sorted(unknown)}; see QUESTION_TYPES")
    for index in range(n_scenes):
        scene = generate_scene(index, split=split, seed=seed, config=config)
        draw = partial(render, scene.objects, scene.config)
        for question in scene.questions:
            if question_types is not None and question.subtask not in question_types:
                continue
            yield Sample(
                id=question.id,
                image=draw,
                prompt=question.prompt,
                answers=(question.answer,),
                task="synth",
                subtask=question.subtask,
                meta={"question": question.question, "scene": scene.id, **question.meta},
            )


def write_split(
    out_dir: str | Path,
    n_scenes: int,
    *,
    split: str = "test",
    seed: int = 0,
    config: SynthConfig | None = None,
) -> Path:
    """Write a split to disk in LLaVA's question-file layout.

    Creates ``out_dir/images/<scene id>.png`` and ``out_dir/<split>.jsonl`` with one line per
    question: ``question_id``, ``image`` (relative to ``out_dir/images``), ``text`` (the
    prompt), ``answer``, ``subtask``, ``question`` and the object list of its scene.

    Args:
        out_dir: Target directory (created if missing).
        n_scenes: How many scenes.
        split: "train" or "test".
        seed: Benchmark seed.
        config: Drawing options.

    Returns:
        The path of the question file.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    question_file = out / f"{split}.jsonl"
    with question_file.open("w", encoding="utf-8") as handle:
        for scene in generate(n_scenes, split=split, seed=seed, config=config):
            image_name = f"{scene.id}.png"
            scene.image.save(out / "images" / image_name)
            objects = [
                {"name": o.name, "cell": list(o.cell), "box": list(o.box)} for o in scene.objects
            ]
            for q in scene.questions:
                line = {
                    "question_id": q.id,
                    "image": image_name,
                    "text": q.prompt,
                    "answer": q.answer,
                    "subtask": q.subtask,
                    "question": q.question,
                    "objects": objects,
                }
                handle.write(json.dumps(line) + "\n")
    return question_file
