"""CDPruner: a conditional DPP over the projector's outputs (``prumerge.ops.cdpruner``)."""

from __future__ import annotations

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
#: of the instruction against the projected patches (offline, every family); "none", no
#: relevance (a plain diversity DPP).
RELEVANCE_CHOICES = ("llm", "none")


@register_method("cdpruner")
class CDPruner(VisionMethod):
    """CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional
    Diversity for Token Pruning in MLLMs", NeurIPS 2025, arXiv 2506.10967).

    Greedy MAP inference of a determinantal point process over the projector's outputs,
    with kernel L = diag(r) S diag(r): S their cosine similarity, r each patch's relevance
    to the instruction, the release's mean negative cosine to the instruction's vectors,
    min-max normalised per image. The release takes both sides from CLIP (the
    ``visual_projection`` of the patches, the text tower's embedding of the question);
    ``relevance="llm"`` (the default here) takes the projected patches and the LLM's input
    embeddings of the instruction (the prompt's text after the image), which needs no
    second model and works on every family. Without a prompt (``Handle.encode_images``) the
    relevance is 1 everywhere (``relevance="none"``). See docs/methods.md.
    """

    feature_space = "projected"
    needs_instruction = True

    def __init__(self, keep: int | float = 64, relevance: str = "llm") -> None:
        self.keep = check_keep(keep)
        self.relevance = check_choice("relevance", relevance, RELEVANCE_CHOICES)

    def reduce(self, inputs: VisionInputs) -> Reduction:
        weight = None
        if self.relevance == "llm" and inputs.instruction is not None:
            weight = instruction_relevance(
                inputs.features, inputs.instruction, inputs.instruction_mask
            )
        return cdpruner(inputs.features, weight, keep=self.budget_for(inputs))

    def describe_budget(self) -> str:
        return "output tokens: a diverse, instruction-weighted DPP subset of the patches, unchanged"
