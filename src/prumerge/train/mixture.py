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

__all__ = ["Reduction", "draw", "parse_mixture"]


@dataclass(frozen=True)
class Reduction:
    """One entry of a mixture.

    Attributes:
        method: a registered vision-side method.
        keep: its budget (None: the method's own, adaptive for PruMerge).
        weight: relative frequency.
    """

    method: str
    keep: int | float | None
    weight: float

    @property
    def label(self) -> str:
        return self.method if self.keep is None else f"{self.method}@{self.keep}"

    def options(self) -> dict[str, Any]:
        return {} if self.keep is None else {"keep": self.keep}


def parse_mixture(text: str) -> list[Reduction]:
    """Parse ``method[@budget][:weight],...``; every entry is checked by building its method.

    Raises:
        PrumergeError: for an empty list, an unknown method, a bad budget or weight, a
            method that cannot train (FastV drops tokens inside the LLM), or a repeated entry.
    """
    from prumerge.methods import build_method
    from prumerge.runtime import parse_budget

    entries: list[Reduction] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise PrumergeError(f"--reduce {text!r}: empty entry")
        spec, _, weight_text = item.partition(":")
        name, _, budget_text = spec.partition("@")
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            raise PrumergeError(f"--reduce: weight of {item!r} is not a number") from None
        if not weight > 0 or weight == float("inf"):
            raise PrumergeError(f"--reduce: weight of {item!r} must be positive and finite")
        keep: int | float | None = None
        if budget_text:
            keep = parse_budget(budget_text, what=f"--reduce: budget of {item!r}")
        try:
            method = build_method(name.strip(), **({} if keep is None else {"keep": keep}))
        except ValueError as exc:
            raise PrumergeError(f"--reduce: {exc}") from None
        if getattr(method, "inside_llm", False):
            raise PrumergeError(
                f"--reduce: {name} prunes inside the language model and cannot train with "
                "labels; use a vision-side method"
            )
        entry = Reduction(name.strip(), keep, weight)
        if any(e.label == entry.label for e in entries):
            raise PrumergeError(f"--reduce: {entry.label} is listed twice")
        entries.append(entry)
    return entries


def draw(mixture: list[Reduction], seed: int, step: int) -> Reduction:
    """The reduction of a step: a weighted draw seeded by ``(seed, step)`` alone."""
    rng = random.Random(seed * 1_000_003 + step)
    return rng.choices(mixture, weights=[e.weight for e in mixture])[0]
