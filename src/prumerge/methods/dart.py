"""DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More", EMNLP 2025), an LLM-side method."""

from __future__ import annotations

from prumerge.methods.base import LanguageMethod, check_int, check_keep, register_method


@register_method("dart")
class DART(LanguageMethod):
    """DART: from LLM layer K on, each image keeps its tokens least duplicated by pivots.

    Pivots are the ``image_pivots`` image and ``text_pivots`` text tokens (the text after
    the image) with the largest L1 norm of their keys in layer K-1; each pivot takes its
    share of the image tokens least cosine-similar to it (layer K-1's output through the
    final norm). No attention weights are needed.

    ``keep`` is the exact image token count kept from layer K on, pivots included: the
    release's "T = 64 / 128 / 192" keep 68 / 132 / 196 (T + 4 image pivots); the default
    132 is its LLaVA-1.5 setting ``max_num_trunction 128``.
    """

    def __init__(
        self,
        keep: int | float = 132,
        layer: int = 2,
        image_pivots: int = 4,
        text_pivots: int = 4,
    ) -> None:
        self.keep = check_keep(keep)
        self.layer = check_int("layer", layer, minimum=1)
        self.image_pivots = check_int("image_pivots", image_pivots, minimum=0)
        self.text_pivots = check_int("text_pivots", text_pivots, minimum=0)
        if image_pivots + text_pivots == 0:
            raise ValueError("dart needs at least one pivot (image_pivots + text_pivots >= 1)")

    def describe_budget(self) -> str:
        return (
            f"image tokens kept per image from LLM layer {self.layer} on, the "
            f"{self.image_pivots} image pivots included (earlier layers see all N)"
        )
