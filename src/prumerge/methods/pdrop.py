"""PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction", CVPR 2025), an LLM-side method in stages."""

from __future__ import annotations

from typing import Any

from prumerge.methods.base import (
    LanguageMethod,
    check_choice,
    check_float,
    check_keep,
    register_method,
)

PDROP_POSITIONS = ("compact", "original")


def parse_layers(name: str, value: Any, minimum: int = 1) -> tuple[int, ...]:
    """Increasing layer indices >= ``minimum``, from a tuple/list of ints or text such as
    "8,16,24"."""
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", "").split(",") if p]
        if not all(p.isdigit() for p in parts):
            raise ValueError(
                f"{name} must be increasing layer indices such as 8,16,24; got {value!r}"
            )
        value = [int(p) for p in parts]
    if not isinstance(value, (tuple, list)) or not value:
        raise ValueError(f"{name} must be increasing layer indices such as 8,16,24; got {value!r}")
    if any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise ValueError(f"{name} must be increasing layer indices such as 8,16,24; got {value!r}")
    layers = tuple(value)
    if layers[0] < minimum or list(layers) != sorted(set(layers)):
        raise ValueError(f"{name} must increase and start at >= {minimum}; got {list(layers)}")
    return layers


def geometric_schedule(
    count: int, layers: tuple[int, ...], ratio: float, depth: int
) -> list[tuple[int, int]]:
    """PyramidDrop's stages for ``count`` tokens: from ``layers[s]`` on, int(count * ratio^(s+1))
    tokens (the release's ``image_token_ratio_list``); stages at or past ``depth`` dropped."""
    return [
        (layer, int(count * ratio ** (s + 1))) for s, layer in enumerate(layers) if layer < depth
    ]


def layer_mean(count: int, stages: list[tuple[int, int]], depth: int) -> float:
    """Image tokens averaged over ``depth`` layers under ``stages``."""
    total, current, previous = 0, count, 0
    for layer, kept in stages:
        total += (layer - previous) * current
        previous, current = layer, kept
    return (total + (depth - previous) * current) / depth


def budget_schedule(
    count: int, budget: int, layers: tuple[int, ...], depth: int, ratio: float = 0.5
) -> list[tuple[int, int]]:
    """The stages whose layer mean comes closest to ``budget`` from below, in the release's
    shape: stage layers ``layers`` scaled by t / layers[0] (t, 2t, 3t for 8, 16, 24; t at
    most layers[0]) and the geometric ratio solved for on them; of the t that can meet the
    budget, the one whose solved ratio is nearest ``ratio`` (the release's 0.5).

    Raises:
        ValueError: a budget below count / depth (dropping everything at layer 1).
    """
    if budget >= count:
        return []
    first = layers[0]
    best: tuple[float, list[tuple[int, int]]] | None = None
    for t in range(1, first + 1):
        if budget * depth < t * count:
            break  # dropping everything at layer t already leaves more than the budget
        scaled = tuple(sorted({max(1, round(layer * t / first)) for layer in layers}))
        low, high = 0.0, 1.0
        for _ in range(60):
            middle = (low + high) / 2
            stages = geometric_schedule(count, scaled, middle, depth)
            if layer_mean(count, stages, depth) <= budget:
                low = middle
            else:
                high = middle
        if best is None or abs(low - ratio) <= best[0]:
            best = (abs(low - ratio), geometric_schedule(count, scaled, low, depth))
    if best is None:
        raise ValueError(
            f"pdrop: a budget of {budget} tokens per layer is below the {count / depth:.1f} "
            f"that layer 0 alone gives {count} tokens over {depth} layers"
        )
    return best[1]


@register_method("pdrop")
class PyramidDrop(LanguageMethod):
    """PyramidDrop: image tokens dropped in stages inside the LLM, by the attention of the
    last instruction token.

    After layer ``l - 1`` for every ``l`` in ``layers``, the q/k of layer ``l`` (on its input
    norm of the hidden states) rank the image tokens by the last prompt token's attention,
    averaged over heads; the top int(N * ratio^s) go on (the release: 576 / 288 / 144 / 72 in
    layers 0-7 / 8-15 / 16-23 / 24-31, 270 tokens per layer on average).

    ``keep=None`` (the default) is that schedule. A ``keep`` budget is the "equivalent
    tokens" per image: the image tokens averaged over the LLM's layers; the stage spacing
    and the ratio are then solved for (``prumerge.methods.pdrop.budget_schedule``).
    """

    def __init__(
        self,
        keep: int | float | None = None,
        layers: str | tuple[int, ...] = (8, 16, 24),
        ratio: float = 0.5,
        positions: str = "compact",
    ) -> None:
        self.keep = check_keep(keep, adaptive=True)
        self.layers = parse_layers("layers", layers)
        self.ratio = check_float("ratio", ratio, minimum=0.0, maximum=1.0)
        self.positions = check_choice("positions", positions, PDROP_POSITIONS)
        self.layer = self.layers[0] if keep is None else 1

    def schedule(self, count: int, depth: int) -> list[tuple[int, int]]:
        """The ``(layer, kept)`` stages of an image of ``count`` tokens in a ``depth``-layer LLM."""
        if self.keep is None:
            return geometric_schedule(count, self.layers, self.ratio, depth)
        from prumerge.ops.select import budget_count

        return budget_schedule(
            count, budget_count(self.keep, count), self.layers, depth, self.ratio
        )

    def describe_budget(self) -> str:
        if self.keep is None:
            return (
                f"all N image tokens before LLM layer {self.layers[0]}, then N * "
                f"{self.ratio:g}^s from each of layers {', '.join(map(str, self.layers))}"
            )
        return "image tokens per image averaged over the LLM's layers (equivalent tokens)"
