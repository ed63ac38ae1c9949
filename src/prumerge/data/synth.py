"""A generated benchmark of small objects on a plain background, seeded and deterministic.

Each scene is a ``size``×``size`` image (224 by default) divided into a 3×3 grid of cells. Two
to six objects stand in distinct cells, each a coloured shape (optionally also small patches
of scikit-image photos), 28-44 px across, jittered inside its cell. The questions ask what
visual-token reduction can lose: whether a small object is there at all, the attribute of
the object in one place, how many there are, and where objects stand relative to each other.

Question types (the ``subtask`` of each sample):

==================== ================================================== =====================
subtask              example                                            answer
==================== ================================================== =====================
exist_random         Is there a green star in the image?                yes / no
exist_popular        Is there a red circle in the image?                yes / no
exist_adversarial    Is there a blue square in the image?               yes / no
color                What color is the object in the top left of ...?   a colour
shape                What shape is the object in the center of ...?     a shape
count                How many circles are there in the image?           0-6 (digits)
relation             Is the red circle to the left of the blue star?    yes / no
==================== ================================================== =====================

The existence questions follow POPE: per scene and split one question about a present object
(answer yes) and one about an absent object (answer no), with the absent object drawn

- *random*: uniformly among the absent colour-shape pairs;
- *popular*: among the three most frequent absent pairs. Objects are drawn with a Zipf-like
  prior over the colour-shape pairs (:func:`pair_popularity`), so some are common, as in COCO;
- *adversarial*: among absent pairs that share the colour or the shape of a present object,
  the near misses that need attribute binding (POPE uses co-occurring objects).

Answer vocabulary (:data:`ANSWER_VOCAB`, 20 words): yes, no; the colours red, green, blue,
yellow, purple, orange; the shapes circle, square, triangle, star, cross; the digits 0-6.
Objects are unique by colour and shape within a scene, so "the red circle" names one object.

Scenes are drawn from a generator seeded by ``(seed, split, index)``, so any scene can be made
on its own (cheap random access, and data-parallel sharding), the train and test splits never
share a scene, and the same arguments give the same pixels and questions on any machine.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache, cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from prumerge.data.sample import SHORT_ANSWER, Sample

__all__ = [
    "ANSWER_VOCAB",
    "COLORS",
    "PHOTOS",
    "QUESTION_TYPES",
    "SHAPES",
    "Question",
    "Scene",
    "SceneObject",
    "SynthConfig",
    "generate",
    "generate_scene",
    "iter_samples",
    "pair_popularity",
    "render",
    "write_split",
]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
_PLURALS["cross"] = "crosses"

# Photo patches: object name -> (scikit-image loader name, crop box (top, left, bottom, right)).
PHOTOS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "cat": ("chelsea", (30, 100, 270, 340)),
    "cup": ("coffee", (0, 100, 400, 500)),
    "rocket": ("rocket", (60, 160, 427, 480)),
    "astronaut": ("astronaut", (0, 120, 240, 360)),
}

QUESTION_TYPES: tuple[str, ...] = (
    "exist_random",
    "exist_popular",
    "exist_adversarial",
    "color",
    "shape",
    "count",
    "relation",
)
POPE_SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")

SPLITS: dict[str, int] = {"train": 0, "test": 1}

ANSWER_VOCAB: tuple[str, ...] = (
    ("yes", "no") + tuple(COLORS) + SHAPES + tuple(str(n) for n in range(7))
)

PROMPT_SUFFIX = SHORT_ANSWER

# Row and column words of the 3x3 grid, for cell names such as "top left" and "center".
_ROWS = ("top", "middle", "bottom")
_COLS = ("left", "middle", "right")


def cell_name(row: int, col: int) -> str:
    """Name of a cell of the 3×3 grid: "top left", "top middle", ..., "center"."""
    if (row, col) == (1, 1):
        return "center"
    return f"{_ROWS[row]} {_COLS[col]}"


@dataclass(frozen=True)
class SynthConfig:
    """How scenes are drawn.

    Attributes:
        size: Image side in pixels.
        background: Background RGB colour.
        min_objects: Fewest objects in a scene.
        max_objects: Most objects in a scene (at most 9, one per cell; keep it at most 6 so
            that counts stay within the answer vocabulary).
        object_size: Smallest and largest object side in pixels.
        photo_patches: Also place small patches of scikit-image photos (cat, cup, rocket,
            astronaut) as extra objects. They count as objects for "How many objects" and
            appear in existence and relation questions by name, but never in colour or shape
            questions.
        photo_probability: Chance that a scene gets one photo patch, when enabled.
    """

    size: int = 224
    background: tuple[int, int, int] = (245, 245, 245)
    min_objects: int = 2
    max_objects: int = 6
    object_size: tuple[int, int] = (28, 44)
    photo_patches: bool = False
    photo_probability: float = 0.5

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= 6:
            raise ValueError("need 1 <= min_objects <= max_objects <= 6")
        cell = self.size / 3
        if self.object_size[0] > self.object_size[1] or self.object_size[1] > cell - 4:
            raise ValueError(f"object_size {self.object_size} does not fit a {cell:.0f}px cell")


@dataclass(frozen=True)
class SceneObject:
    """One object in a scene.

    Attributes:
        name: How questions refer to it: "red circle", or a photo's name ("cat").
        shape: The shape, or None for a photo patch.
        color: The colour, or None for a photo patch.
        cell: ``(row, col)`` in the 3×3 grid, row 0 at the top.
        box: Pixel bounding box ``(left, top, right, bottom)``, right and bottom exclusive.
    """

    name: str
    shape: str | None
    color: str | None
    cell: tuple[int, int]
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Question:
    """A question about a scene, with its single-word answer."""

    id: str
    subtask: str
    question: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The question with LLaVA's short-answer instruction, as the model sees it."""
        return self.question + PROMPT_SUFFIX


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


@cache
def pair_popularity() -> tuple[tuple[str, str], ...]:
    """All colour-shape pairs, most frequent first.

    Objects are drawn with probability proportional to ``1 / (rank + 2)`` in this order. The
    order is a fixed interleaving (not seed-dependent), so it can be documented and tested.
    """
    colors = list(COLORS)
    # Walk the colour-by-shape table along diagonals so that neither one colour nor one shape
    # takes all the top ranks.
    pairs = [
        (colors[(step + k) % len(colors)], SHAPES[k % len(SHAPES)])
        for step in range(len(colors))
        for k in range(len(SHAPES))
    ]
    return tuple(dict.fromkeys(pairs))


def _pair_weights() -> np.ndarray:
    ranks = np.arange(len(pair_popularity()))
    weights = 1.0 / (ranks + 2.0)
    return weights / weights.sum()


@cache
def _photo_patch(name: str) -> Image.Image:
    import skimage.data

    loader, (top, left, bottom, right) = PHOTOS[name]
    pixels = getattr(skimage.data, loader)()
    return Image.fromarray(pixels[top:bottom, left:right]).convert("RGB")


def _shape_polygon(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]]:
    half = side / 2
    if shape == "triangle":
        return [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = half if k % 2 == 0 else half * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape == "cross":
        arm = side * 0.17  # half the bar width
        return [
            (cx - arm, cy - half),
            (cx + arm, cy - half),
            (cx + arm, cy - arm),
            (cx + half, cy - arm),
            (cx + half, cy + arm),
            (cx + arm, cy + arm),
            (cx + arm, cy + half),
            (cx - arm, cy + half),
            (cx - arm, cy + arm),
            (cx - half, cy + arm),
            (cx - half, cy - arm),
            (cx - arm, cy - arm),
        ]
    raise ValueError(f"no polygon for shape {shape!r}")


def _draw_object(image: Image.Image, obj: SceneObject) -> None:
    left, top, right, bottom = obj.box
    if obj.shape is None:
        patch = _photo_patch(obj.name).resize(
            (right - left, bottom - top), Image.Resampling.BILINEAR
        )
        image.paste(patch, (left, top))
        return
    draw = ImageDraw.Draw(image)
    fill = COLORS[obj.color or ""]
    if obj.shape == "circle":
        draw.ellipse((left, top, right - 1, bottom - 1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((left, top, right - 1, bottom - 1), fill=fill)
    else:
        side = right - left
        draw.polygon(
            _shape_polygon(obj.shape, left + side / 2, top + side / 2, side - 1), fill=fill
        )


def render(objects: Sequence[SceneObject], config: SynthConfig | None = None) -> Image.Image:
    """Draw objects on a plain background.

    Args:
        objects: The objects, drawn in order.
        config: Image size and background colour.

    Returns:
        A new RGB image.
    """
    config = config or SynthConfig()
    image = Image.new("RGB", (config.size, config.size), config.background)
    for obj in objects:
        _draw_object(image, obj)
    return image


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
    pair_index = rng.choice(len(popularity), size=n_shapes, replace=False, p=_pair_weights())
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
        text = f"How many {_PLURALS[shape]} are there in the image?"
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
