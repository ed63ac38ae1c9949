"""CDPruner: a conditional DPP over the projector's outputs (``prumerge.ops.cdpruner``)."""

from __future__ import annotations

import os

from prumerge.methods.base import (
    VisionInputs,
    VisionMethod,
    check_choice,
    check_keep,
    register_method,
)
from prumerge.ops import Reduction
from prumerge.ops.cdpruner import cdpruner, instruction_relevance

#: Where the relevance to the instruction comes from: "llm", the LLM's own input embeddings
#: of the instruction against the projected patches (offline, every family); "clip", a CLIP
#: text tower's embedding of the instruction against CLIP's projection of the patches (the
#: release; needs ``text_tower``); "none", no relevance (a plain diversity DPP).
RELEVANCE_CHOICES = ("llm", "clip", "none")


@register_method("cdpruner")
class CDPruner(VisionMethod):
    """CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional
    Diversity for Token Pruning in MLLMs", NeurIPS 2025, arXiv 2506.10967).

    Greedy MAP inference of a determinantal point process over the projector's outputs,
    with kernel L = diag(r) S diag(r): S their cosine similarity, r each patch's relevance
    to the instruction, the release's mean negative cosine to the instruction's vectors,
    min-max normalised per image. The release takes both sides from CLIP (the
    ``visual_projection`` of the patches, the text tower's embedding of the question):
    ``relevance="clip"`` with ``text_tower`` a CLIP checkpoint directory (the one the
    model's tower comes from; the Handle then needs the model's processor to read the
    instruction as text). ``relevance="llm"`` (the default) takes the projected patches and
    the LLM's input embeddings of the instruction (the prompt's text after the image), which
    needs no second model and works on every family. Without a prompt
    (``Handle.encode_images``) the relevance is 1 everywhere (``relevance="none"``). See
    docs/methods.md.
    """

    feature_space = "projected"
    needs_instruction = True

    def __init__(
        self, keep: int | float = 64, relevance: str = "llm", text_tower: str | None = None
    ) -> None:
        self.keep = check_keep(keep)
        self.relevance = check_choice("relevance", relevance, RELEVANCE_CHOICES)
        if relevance == "clip" and not text_tower:
            raise ValueError(
                "relevance='clip' needs text_tower: a CLIP checkpoint directory (its text "
                "tower, tokenizer and visual_projection)"
            )
        if text_tower and relevance != "clip":
            raise ValueError(f"text_tower is read only with relevance='clip'; got {relevance!r}")
        if text_tower and not os.path.isfile(os.path.join(text_tower, "config.json")):
            raise ValueError(
                f"text_tower {text_tower!r} is no checkpoint directory (no config.json)"
            )
        self.text_tower = text_tower

    def reduce(self, inputs: VisionInputs) -> Reduction:
        weight = None
        if self.relevance == "llm" and inputs.instruction is not None:
            weight = instruction_relevance(
                inputs.features, inputs.instruction, inputs.instruction_mask
            )
        elif self.relevance == "clip" and inputs.text_embeds is not None:
            assert inputs.image_embeds is not None  # the adapter sets both
            weight = instruction_relevance(
                inputs.image_embeds, inputs.text_embeds, inputs.text_embeds_mask
            )
        return cdpruner(inputs.features, weight, keep=self.budget_for(inputs))

    def describe_budget(self) -> str:
        return "output tokens: a diverse, instruction-weighted DPP subset of the patches, unchanged"
