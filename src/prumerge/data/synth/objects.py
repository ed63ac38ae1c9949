"""What the scenes are made of: the colours, shapes and photos, the question types and
answer vocabulary, the 3×3 grid's cell names, the popularity of colour-shape pairs, and
the types of a scene's drawing options, objects and questions."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np

from prumerge.data.sample import SHORT_ANSWER

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
PLURALS["cross"] = "crosses"

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


def pair_weights() -> np.ndarray:
    ranks = np.arange(len(pair_popularity()))
    weights = 1.0 / (ranks + 2.0)
    return weights / weights.sum()
