"""A weighted mixture of reductions, one drawn per training step.

Weights are relative: ``"none:1,prumerge:2,prumerge+:1,visionzip@64:1"`` gives 1/5 of the
steps all tokens, 2/5 adaptive PruMerge, 1/5 adaptive PruMerge+ and 1/5 VisionZip with 64
tokens. Each entry is ``method[@budget][:weight]``; the
budget is a count (``64``) or a ratio of the patches (``0.25``), as ``--keep`` takes it, and
the weight defaults to 1. The draw for a step depends only on the seed and the step, so a
resumed run, and every process of a data-parallel run, draws the same reduction.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from prumerge.errors import PrumergeError
from prumerge.methods import METHODS
from prumerge.methods.spec import MethodSpec, parse_spec

__all__ = ["Reduction", "draw", "parse_mixture"]


@dataclass(frozen=True)
class Reduction:
    """One entry of a mixture: a method spec and its weight.

    Attributes:
        spec: the method, its budget and options (``prumerge.methods.spec.MethodSpec``).
        weight: relative frequency.
    """

    spec: MethodSpec
    weight: float

    @property
    def method(self) -> str:
        return self.spec.method

    @property
    def keep(self) -> int | float | None:
        """The budget given (None: the method's own, adaptive for PruMerge)."""
        return self.spec.options.get("keep")

    @property
    def label(self) -> str:
        return self.spec.label

    def options(self) -> dict[str, Any]:
        return dict(self.spec.options)


def parse_mixture(text: str) -> list[Reduction]:
    """Parse ``method[@budget][:weight],...``; every entry is checked by building its method.

    Raises:
        PrumergeError: for an empty list, an unknown method, a bad budget or weight, a
            method that cannot train (FastV drops tokens inside the LLM), or a repeated entry.
    """
    entries: list[Reduction] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise PrumergeError(f"--reduce {text!r}: empty entry")
        spec_text, _, weight_text = item.partition(":")
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            raise PrumergeError(f"--reduce: weight of {item!r} is not a number") from None
        if not weight > 0 or weight == float("inf"):
            raise PrumergeError(f"--reduce: weight of {item!r} must be positive and finite")
        try:
            spec = parse_spec(spec_text, what=f"--reduce: budget of {item!r}")
        except PrumergeError as exc:
            message = str(exc)
            raise PrumergeError(
                message if message.startswith("--reduce") else f"--reduce: {message}"
            ) from None
        if getattr(METHODS[spec.method], "inside_llm", False):
            raise PrumergeError(
                f"--reduce: {spec.method} prunes inside the language model and cannot train "
                "with labels; use a vision-side method"
            )
        entry = Reduction(spec, weight)
        if any(e.label == entry.label for e in entries):
            raise PrumergeError(f"--reduce: {entry.label} is listed twice")
        entries.append(entry)
    return entries


def draw(mixture: list[Reduction], seed: int, step: int) -> Reduction:
    """The reduction of a step: a weighted draw seeded by ``(seed, step)`` alone."""
    rng = random.Random(seed * 1_000_003 + step)
    return rng.choices(mixture, weights=[e.weight for e in mixture])[0]
