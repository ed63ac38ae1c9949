"""The interface every model family implements (``FamilyAdapter``), the family registry,
and the per-call records (``TokenStats``, ``Encoded``). ``handle.py`` patches a model through
this interface."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from prumerge.adapters.sequence import Packed
from prumerge.adapters.text_tower import ClipTextTower
from prumerge.errors import PrumergeError
from prumerge.methods import Method, VisionInputs
from prumerge.ops import Reduction
from prumerge.registry import Registry


@dataclass
class TokenStats:
    """Visual tokens per image of the last call, in the order of the images.

    Attributes:
        tokens_in: tokens each image would have sent to the LLM without reduction (its
            placeholders: patches, plus registers and anyres newline tokens where the model
            has them).
        tokens_out: tokens each image sent to the LLM.
        vision_seconds: vision tower + reduction + projector time of the last call.
        llm_full_layers: LLM layers that saw all ``tokens_in`` before pruning (FastV's K; 0
            for vision-side methods).
        llm_layer_tokens: LLM-side methods only: per image, the image tokens every decoder
            layer sees (methods that prune in stages see fewer layer by layer); empty for
            vision-side methods.
    """

    tokens_in: list[int] = field(default_factory=list)
    tokens_out: list[int] = field(default_factory=list)
    vision_seconds: float = 0.0
    llm_full_layers: int = 0
    llm_layer_tokens: list[list[int]] = field(default_factory=list)

    @property
    def mean_in(self) -> float:
        return sum(self.tokens_in) / max(len(self.tokens_in), 1)

    @property
    def mean_out(self) -> float:
        return sum(self.tokens_out) / max(len(self.tokens_out), 1)

    @property
    def equivalent_tokens(self) -> list[float]:
        """Per image, the image tokens averaged over the LLM's layers (the "equivalent
        tokens" LLM-side papers report); ``tokens_out`` for vision-side methods."""
        if not self.llm_layer_tokens:
            return [float(n) for n in self.tokens_out]
        return [sum(layers) / len(layers) for layers in self.llm_layer_tokens]


@dataclass
class Encoded:
    """Every image of one call, reduced and projected.

    Attributes:
        features: per image, its (L_i, H) tokens for the LLM, in placeholder order.
        tokens_in: per image, its placeholder count before reduction.
        reductions: the ``Reduction`` of every group of views reduced together.
        anchors: per image, (L_i,) int64: the placeholder (index within the image's
            unreduced run) whose position each token takes with ``positions="original"``:
            a kept patch its own, a merged token its anchor patch (``Reduction.anchors``).
        placements: per image, ``(group, row)``: its row of ``reductions[group]``, for
            adapters that reduce every image as one row (empty where images have several
            views).
    """

    features: list[torch.Tensor]
    tokens_in: list[int]
    reductions: list[Reduction]
    anchors: list[torch.Tensor]
    placements: list[tuple[int, int]] = field(default_factory=list)


class FamilyAdapter:
    """One model family: where its patch tokens, grid, keys and importance come from, and
    where the reduced tokens go. A new family is a new module with one subclass.

    Subclasses set the class attributes and implement ``placeholder_counts`` and ``encode``;
    M-RoPE families also implement ``rope_positions`` (and ``resized_rope_positions`` if
    they support resizing methods). Families whose LLM needs more than the shortened
    sequence override the hooks ``bind_prompt`` (image inputs read off the prompt),
    ``sequence_inputs`` (inputs that follow the tokens through the cut) and ``arm`` /
    ``disarm`` (side inputs the decoder reads at the kept image positions).
    """

    #: Name of the family in ``FAMILIES`` and the README's table.
    family: ClassVar[str] = ""
    #: Human name, e.g. "LLaVA-NeXT".
    title: ClassVar[str] = ""
    #: Names of the Hugging Face classes this adapter serves.
    model_classes: ClassVar[tuple[str, ...]] = ()
    #: Forward keyword arguments that carry the images (taken by the adapter).
    image_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)
    #: Forward keyword arguments the adapter consumes and does not pass on.
    consumed_inputs: ClassVar[tuple[str, ...]] = ()
    #: Forward keyword arguments that are refused (inputs the adapter does not reduce).
    refused_inputs: ClassVar[tuple[str, ...]] = ("pixel_values_videos",)
    #: True for M-RoPE language models: kept tokens always keep their 3-D rope indices.
    mrope: ClassVar[bool] = False
    #: True where the adapter records a second tower layer's attention for methods that
    #: set ``object_layer`` (HiPrune); elsewhere such methods get a one-line error.
    object_layer_attention: ClassVar[bool] = False

    #: Per image of the call being encoded, the (M_i, H) LLM input embeddings of its
    #: instruction, set by the Handle for methods with ``needs_instruction``; else None.
    instructions: list[torch.Tensor] | None = None
    #: The CLIP text tower of a method that names one (``text_tower``), set by the Handle;
    #: with it, per image of the call, its instruction as text (else None).
    text_tower: ClipTextTower | None = None
    instruction_texts: list[str] | None = None

    def __init__(self, model: nn.Module, method: Method, *, budget_per: str = "image") -> None:
        if getattr(method, "object_layer", None) is not None and not self.object_layer_attention:
            raise PrumergeError(
                f"{method.name} reads the attention of two vision-tower layers, and the "
                f"{self.title} adapter records one; supported: "
                + ", ".join(f.title for f in FAMILIES.values() if f.object_layer_attention)
            )
        self.model = model
        self.method = method
        self.budget_per = budget_per

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def language_model(self) -> nn.Module:
        """The decoder whose ``layers`` an LLM-side method wraps."""
        return self.model.model.language_model

    @property
    def projector(self) -> nn.Module:
        """The module whose output ends the vision stage (for timing)."""
        return self.model.model.multi_modal_projector

    def placeholder_counts(self, images: dict[str, Any]) -> torch.Tensor:
        """(I,) placeholder tokens the processor inserted for every image."""
        raise NotImplementedError

    def add_instruction(self, inputs: VisionInputs, images: Sequence[int]) -> None:
        """Give ``inputs`` the instruction of the image of each of its rows (``images``),
        from what the Handle embedded for this call (``instructions``); nothing outside a
        prompt or for methods that do not read it."""
        if self.instructions is None or not self.method.needs_instruction:
            return
        device = inputs.features.device
        rows = [self.instructions[i].to(device) for i in images]
        longest = max((r.shape[0] for r in rows), default=0)
        width = rows[0].shape[-1] if rows else 0
        padded = torch.zeros(len(rows), longest, width, dtype=rows[0].dtype, device=device)
        mask = torch.zeros(len(rows), longest, dtype=torch.bool, device=device)
        for index, row in enumerate(rows):
            padded[index, : row.shape[0]] = row
            mask[index, : row.shape[0]] = True
        inputs.instruction, inputs.instruction_mask = padded, mask
        if self.text_tower is not None and self.instruction_texts is not None:
            if inputs.tower_features is None:
                raise PrumergeError(
                    f"{self.method.name}: a text tower places the tower's patch features in "
                    f"its joint space, and the {self.title} adapter has no per-patch tower "
                    f"features; supported here: relevance='llm'"
                )
            texts = [self.instruction_texts[i] for i in images]
            text_embeds, text_mask = self.text_tower.embed_text(texts)
            inputs.text_embeds, inputs.text_embeds_mask = (
                text_embeds.to(device),
                text_mask.to(device),
            )
            inputs.image_embeds = self.text_tower.embed_patches(inputs.tower_features).to(device)

    def encode(self, images: dict[str, Any]) -> Encoded:
        """Run the vision tower, reduce every image and project it."""
        raise NotImplementedError

    def rope_positions(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        images: dict[str, Any],
    ) -> torch.Tensor:
        """(3, B, L) M-RoPE indices of the unreduced prompt (M-RoPE families only)."""
        raise NotImplementedError

    def resized_rope_positions(self, packed: Packed) -> torch.Tensor:
        """(3, B, L') M-RoPE indices of the shrunk prompt when the images were resized
        (``downsample``): the indices of the smaller images."""
        raise NotImplementedError

    # -- hooks for families whose LLM needs more than the shortened sequence --------------
    def bind_prompt(self, input_ids: torch.Tensor, images: dict[str, Any]) -> dict[str, Any]:
        """The image inputs, completed from the prompt where only the prompt says (InternVL:
        how many tiles each image has). Called before ``placeholder_counts``; default: as
        given."""
        return images

    def sequence_inputs(self, packed: Packed, images: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Extra forward inputs over the shortened sequence, carried through the cut from the
        caller's own (Gemma 3's ``token_type_ids``, which make its image blocks
        bidirectional). They are returned by ``Handle.prepare_inputs`` and passed to the
        model's own ``forward``/``generate``. Default: none."""
        return {}

    def arm(self, packed: Packed, encoded: Encoded) -> None:
        """Get ready for the forward or generate call that follows ``prepare_inputs``
        (Qwen3-VL: the DeepStack features of the kept tokens). Default: nothing."""

    def disarm(self) -> None:
        """End what ``arm`` started; called after every call and by ``Handle.remove``."""


#: The registered families, in the order they are listed in errors and docs: the built-ins
#: (imported by name on first use, so that nothing here imports them back) and those of
#: outside packages (entry-point group ``prumerge.families``; see ``prumerge.registry``).
FAMILIES: Registry[type[FamilyAdapter]] = Registry(
    "family",
    group="prumerge.families",
    builtins=tuple(
        f"prumerge.adapters.{module}"
        for module in (
            "llava",
            "llava_next",
            "llava_onevision",
            "qwen2_5_vl",
            "qwen3_vl",
            "internvl",
            "gemma3",
        )
    ),
)


def register_family(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
    """Class decorator adding a family under its ``family`` name (a second family of the
    same name raises ``prumerge.registry.DuplicateNameError``)."""
    return FAMILIES.add(cls.family, cls)


def supported_models() -> str:
    return ", ".join(
        f"{name} ({cls.title})" for cls in FAMILIES.values() for name in cls.model_classes
    )


def family_for(model: nn.Module) -> type[FamilyAdapter]:
    name = type(model).__name__
    for cls in FAMILIES.values():
        if name in cls.model_classes:
            return cls
    raise PrumergeError(f"{name} is not supported; supported models: {supported_models()}")


__all__ = ["FAMILIES", "Encoded", "FamilyAdapter", "TokenStats", "family_for", "register_family"]
