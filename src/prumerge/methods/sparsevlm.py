"""SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient
Vision-Language Model Inference", ICML 2025) and SparseVLM+ (its "v2.0"), LLM-side methods
in stages, ranked by the attention of text raters."""

from __future__ import annotations

from prumerge.methods.base import (
    LanguageMethod,
    check_bool,
    check_choice,
    check_int,
    check_keep,
    register_method,
)
from prumerge.methods.pdrop import parse_layers
from prumerge.ops.recycle import recycle_counts

SPARSEVLM_VERSIONS = ("v1", "v2")

#: The release's keep counts after its pruning layers 2 / 6 / 15, by ``RETAIN_TOKN`` (of
#: LLaVA-1.5's 576 tokens), per version (``llava/model/language_model/score.py``).
RELEASE_COUNTS = {
    "v1": {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)},
    "v2": {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)},
}
RELEASE_TOKENS = 576


def release_counts(version: str, label: float, count: int) -> list[int]:
    """Keep counts after each pruning layer for ``count`` tokens at the release's budget
    label ``label`` (its ``RETAIN_TOKN``, on the scale of 576 tokens): the release's table
    at 64 / 96 / 128 / 192, linear between them, scaled below 64 and towards ``count``
    above 192; each count at most one less than the one before, as the release's
    ``min(k, v - 1)``."""
    table = RELEASE_COUNTS[version]
    labels = sorted(table)
    if label <= labels[0]:
        base = [c * label / labels[0] for c in table[labels[0]]]
    elif label >= labels[-1]:
        top = table[labels[-1]]
        share = (label - labels[-1]) / (RELEASE_TOKENS - labels[-1])
        base = [c + (RELEASE_TOKENS - c) * min(share, 1.0) for c in top]
    else:
        high = next(x for x in labels if x >= label)
        low = labels[labels.index(high) - 1] if high != label else high
        weight = 0.0 if high == low else (label - low) / (high - low)
        base = [a + (b - a) * weight for a, b in zip(table[low], table[high], strict=True)]
    counts, previous = [], count
    for value in base:
        kept = max(0, min(round(value * count / RELEASE_TOKENS), previous - 1, count))
        counts.append(kept)
        previous = kept
    return counts


@register_method("sparsevlm")
class SparseVLM(LanguageMethod):
    """SparseVLM: image tokens dropped after LLM layers 2, 6 and 15, ranked by the attention
    the text raters (text tokens most relevant to the image, chosen once from the input
    embeddings) pay them in that layer.

    ``version="v1"`` (the default) is SparseVLM as its release runs without ``USE_VERSION``:
    every head, compact positions, and (``recycle``, on by default for v1) the top 30 % of
    each stage's dropped tokens clustered (DPC-kNN) into int(r / 10) + 1 tokens that go on
    after the kept ones. ``version="v2"`` is SparseVLM+ (the release's ``USE_VERSION=2_0``):
    the attention divided by the rotary embeddings' own logits ("gravity correction"), only
    the ``heads`` heads that pay the image the most attention averaged, original positions,
    no recycling (docs/methods.md).

    ``keep`` is the release's ``RETAIN_TOKN`` (192 by default; its tables at 64 / 96 / 128 /
    192 of 576 tokens, interpolated between them and scaled by N / 576); the image tokens
    averaged over the layers, which the release's label only approximates, are reported in
    ``TokenStats.equivalent_tokens``.
    """

    def __init__(
        self,
        keep: int | float = 192,
        layers: str | tuple[int, ...] = (2, 6, 15),
        version: str = "v1",
        heads: int = 14,
        recycle: bool | None = None,
    ) -> None:
        self.keep = check_keep(keep)
        self.layers = parse_layers("layers", layers, minimum=0)
        if len(self.layers) > 3:
            raise ValueError(
                f"layers must be up to three pruning layers such as 2,6,15; got {layers!r}"
            )
        self.version = check_choice("version", version, SPARSEVLM_VERSIONS)
        self.heads = check_int("heads", heads, minimum=1)
        if recycle is not None:
            check_bool("recycle", recycle)
        if recycle and version != "v1":
            raise ValueError("recycle=True needs version='v1' (SparseVLM+ does not recycle)")
        # None: as the release, v1 recycles and SparseVLM+ does not.
        self.recycle = recycle
        self.layer = self.layers[0] + 1

    @property
    def recycles(self) -> bool:
        return self.version == "v1" and self.recycle is not False

    def stages(self, count: int) -> list[tuple[int, int, int]]:
        """``(layer, ranked, recycled)``: from ``layer`` on an image of ``count`` tokens
        keeps its ``ranked`` best tokens and ``recycled`` cluster tokens (0 without
        recycling). With recycling every stage ranks the kept and the recycled tokens of the
        one before (the release's ``v_token_num`` counts both)."""
        label = self.keep * RELEASE_TOKENS if isinstance(self.keep, float) else self.keep
        if isinstance(self.keep, int):
            label = self.keep * RELEASE_TOKENS / count if count else self.keep
        if label >= RELEASE_TOKENS:
            return []
        kept = release_counts(self.version, label, count)
        out, current = [], count
        # Fewer pruning layers than the release's three take the first counts of its table.
        for layer, n in zip(self.layers, kept, strict=False):
            ranked = max(0, min(n, current - 1))
            clusters = recycle_counts(current - ranked)[1] if self.recycles else 0
            out.append((layer + 1, ranked, clusters))
            current = ranked + clusters
        return out

    def schedule(self, count: int) -> list[tuple[int, int]]:
        """``(layer, kept)``: the output of pruning layer l is pruned, so layer l + 1 is the
        first to see the stage's tokens."""
        return [(layer, ranked + recycled) for layer, ranked, recycled in self.stages(count)]

    def describe_budget(self) -> str:
        return (
            "the release's RETAIN_TOKN label (its keep tables after LLM layers "
            f"{', '.join(map(str, self.layers))}); equivalent tokens are reported per layer"
        )
