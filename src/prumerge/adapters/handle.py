"""The ``Handle`` that patches one model instance through its family's ``FamilyAdapter``.

``apply`` patches one model instance (its ``forward`` and ``generate`` attributes, nothing at
class level) so that the usual processor -> generate code path runs with fewer visual tokens:

1. the family adapter runs the vision tower once, with scoped hooks that record the keys and
   the importance of the patches, and the method reduces each image's tokens;
2. each image's run of placeholder tokens is cut to its reduced length, the batch is
   re-padded (on the left for generation) and ``inputs_embeds`` are built with the reduced
   features scattered into the placeholders; position ids follow the ``positions`` option
   (M-RoPE models always keep their original 3-D indices);
3. the original ``generate``/``forward`` runs on those embeddings; an LLM-side method (FastV)
   prunes further inside the language model through its own patch.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch
from torch import nn

from prumerge.adapters.base import Encoded, TokenStats, family_for
from prumerge.adapters.instructions import (
    instruction_embeddings,
    instruction_ids,
    instruction_texts,
)
from prumerge.adapters.llm import LanguagePatch, patch_language_model
from prumerge.adapters.sequence import Packed, assign_placeholders, shrink_placeholders
from prumerge.adapters.text_tower import text_tower_for
from prumerge.adapters.towers import execution_device
from prumerge.errors import PrumergeError
from prumerge.methods import LanguageMethod, Method
from prumerge.ops import Reduction

POSITION_CHOICES = ("compact", "original")
#: The keys every ``prepare_inputs`` result has; anything else is a family's own input.
PREPARED_KEYS = ("input_ids", "attention_mask", "labels", "position_ids", "inputs_embeds")
BUDGET_PER_CHOICES = ("image", "view")
_MISSING = object()


class Handle:
    """A patched model. ``remove()`` (or leaving the ``with`` block) restores it exactly.

    Attributes:
        model: the patched model.
        method: the reduction method in use.
        adapter: the model family's ``FamilyAdapter``.
        positions: ``"compact"`` or ``"original"`` (see ``apply``).
        stats: ``TokenStats`` of the last forward or generate call with images.
        last_reduction: the ``Reduction`` of the last call when all its images were reduced
            together (LLaVA-1.5, or images of one size), else None; ``last_reductions`` has
            every group's.
        fastv: the LLM-side patch, or None for vision-side methods.
    """

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        *,
        positions: str | None = None,
        budget_per: str = "image",
        processor: Any = None,
    ) -> None:
        family = family_for(model)
        if getattr(model, "_prumerge_handle", None) is not None:
            raise PrumergeError("this model is already patched; call remove() on its handle first")
        if positions is not None and positions not in POSITION_CHOICES:
            raise PrumergeError(
                f"positions must be one of {', '.join(map(repr, POSITION_CHOICES))}; got {positions!r}"
            )
        if budget_per not in BUDGET_PER_CHOICES:
            raise PrumergeError(
                f"budget_per must be one of {', '.join(map(repr, BUDGET_PER_CHOICES))}; got "
                f"{budget_per!r}"
            )
        if family.mrope and positions == "compact":
            raise PrumergeError(
                f"{family.title} uses M-RoPE: kept tokens keep their original 3-D rope indices; "
                f"supported: positions='original' (the default there)"
            )
        self.positions = positions or ("original" if family.mrope else "compact")
        self.model = model
        self.method = method
        self.adapter = family(model, method, budget_per=budget_per)
        # A method that names a text tower (cdpruner's relevance="clip") reads each
        # instruction as text, decoded with the model's own tokenizer.
        self._tokenizer = getattr(processor, "tokenizer", processor)
        self.adapter.text_tower = text_tower_for(
            method, self._tokenizer, execution_device(model.get_input_embeddings())
        )
        self.stats = TokenStats()
        self.last_reduction: Reduction | None = None
        self.last_reductions: list[Reduction] = []
        self.fastv: LanguagePatch | None = None
        if isinstance(method, LanguageMethod):
            self.fastv = patch_language_model(method, self.adapter.language_model)
        # Whatever the instance had (accelerate's hooked forward, say) is put back by remove().
        self._saved = {name: vars(model).get(name, _MISSING) for name in ("forward", "generate")}
        self._original_forward = model.forward
        self._original_generate = model.generate
        # Plain functions that look like the originals to inspect.signature, which
        # generate() uses to validate its keyword arguments.
        model.forward = functools.wraps(self._original_forward)(
            lambda *a, **kw: self._forward(*a, **kw)
        )
        model.generate = functools.wraps(self._original_generate)(
            lambda *a, **kw: self._generate(*a, **kw)
        )
        model._prumerge_handle = self

    # -- lifecycle ---------------------------------------------------------------------
    def remove(self) -> None:
        """Undo the patch; the model's behaviour is then bit-identical to before."""
        model = self.model
        if getattr(model, "_prumerge_handle", None) is not self:
            return
        for name, saved in self._saved.items():
            if saved is _MISSING:
                vars(model).pop(name, None)
            else:
                setattr(model, name, saved)
        del model._prumerge_handle
        self.adapter.disarm()
        if self.fastv is not None:
            self.fastv.remove()

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @property
    def projector(self) -> nn.Module:
        """The module whose output ends the vision stage (for timing)."""
        return self.adapter.projector

    # -- vision ------------------------------------------------------------------------
    def _encode(self, images: dict[str, Any]) -> Encoded:
        start = time.perf_counter()
        encoded = self.adapter.encode(images)
        self.last_reductions = encoded.reductions
        self.last_reduction = encoded.reductions[0] if len(encoded.reductions) == 1 else None
        self.stats = TokenStats(
            tokens_in=list(encoded.tokens_in),
            tokens_out=[f.shape[0] for f in encoded.features],
            vision_seconds=time.perf_counter() - start,
        )
        return encoded

    def encode_images(self, pixel_values: torch.Tensor, **image_inputs: Any) -> list[torch.Tensor]:
        """Reduced, projected features of each image: a list of (L_i, H) tensors.

        Args:
            pixel_values: the images as the family's processor makes them.
            **image_inputs: the family's other image inputs (``image_sizes`` for LLaVA-NeXT
                and OneVision, ``image_grid_thw`` for Qwen2-VL/2.5-VL/3-VL, ``num_patches``,
                the tiles of each image, for InternVL).
        """
        return self._encode({"pixel_values": pixel_values, **image_inputs}).features

    def prepare_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        left_pad: bool | None = None,
        **image_inputs: Any,
    ) -> dict[str, torch.Tensor | None]:
        """The language model's inputs with each image's tokens reduced.

        This is what the patched ``forward`` and ``generate`` run before the original model;
        training code that computes its own loss can call it directly, so that it trains on
        exactly the tokens served.

        Args:
            input_ids: (B, L) ids with each image's placeholders, as the processor makes them.
            pixel_values: the images, in placeholder order (family-specific layout).
            attention_mask: (B, L) padding mask, or a (B, 1, L, L) mask (boolean or additive)
                for packed rows; None for no padding.
            labels: (B, L) or None; moved along with the ids.
            position_ids: (B, L) (or (3, B, L) on M-RoPE models) or None. Given, they are
                carried through the cut: with ``positions="compact"`` the gaps the cut leaves
                are closed (see ``Packed.position_ids``), with ``"original"`` they are kept
                (``Packed.carry``). None: compact lets the model count positions from the
                mask; original counts them over the unreduced sequence.
            left_pad: re-pad on the left; default: when the 2-D mask is padded on the left.
                Rows with a 4-D mask are never re-padded on the left.
            **image_inputs: the family's other image inputs (``image_sizes``,
                ``image_grid_thw``, ``batch_num_images``, ``mm_token_type_ids``, Gemma 3's
                ``token_type_ids``, InternVL's ``num_patches``).

        Returns:
            ``input_ids``, ``attention_mask``, ``labels`` and ``position_ids`` (None where not
            given and not needed) over the shortened sequence, and ``inputs_embeds`` with the
            reduced features in the image positions, all on the input embeddings' device;
            plus the family's own inputs over the shortened sequence, where it has any
            (Gemma 3: ``token_type_ids``, carried from the caller's). Gradients flow from
            ``inputs_embeds`` into the projector and the embeddings.
        """
        images = {"pixel_values": pixel_values, **image_inputs}
        embed = self.model.get_input_embeddings()
        device = execution_device(embed)
        input_ids = input_ids.to(device)
        attention_mask = None if attention_mask is None else attention_mask.to(device)
        labels = None if labels is None else labels.to(device)
        position_ids = None if position_ids is None else position_ids.to(device)
        images = self.adapter.bind_prompt(input_ids, images)
        mask_4d = attention_mask is not None and attention_mask.ndim == 4
        if left_pad is None:
            left_pad = (
                attention_mask is not None
                and not mask_4d
                and bool((attention_mask[:, 0] == 0).any())
            )
        image_token_id = self.adapter.image_token_id
        counts = self.adapter.placeholder_counts(images).to(device)
        # Check the prompts against the images before the vision tower runs.
        uniform = int(counts[0]) if counts.numel() and bool((counts == counts[0]).all()) else None
        probe = torch.zeros_like(counts)
        shrink_placeholders(
            input_ids,
            None,
            None,
            image_token_id=image_token_id,
            tokens_per_image=uniform if uniform is not None else counts,
            lengths=probe,
            pad_token_id=0,
            left_pad=False,
        )
        if self.adapter.method.needs_instruction:
            ids = instruction_ids(
                input_ids, None if mask_4d else attention_mask, image_token_id, counts
            )
            self.adapter.instructions = instruction_embeddings(ids, embed)
            if self.adapter.text_tower is not None:
                self.adapter.instruction_texts = instruction_texts(ids, self._tokenizer)
        try:
            encoded = self._encode(images)
        finally:
            self.adapter.instructions = self.adapter.instruction_texts = None
        lengths = torch.tensor([f.shape[0] for f in encoded.features], device=device)
        packed = shrink_placeholders(
            input_ids,
            None if mask_4d else attention_mask,
            labels,
            image_token_id=image_token_id,
            tokens_per_image=uniform if uniform is not None else counts,
            lengths=lengths,
            pad_token_id=_pad_token_id(self.model),
            left_pad=bool(left_pad) and not mask_4d,
        )
        positions = self._positions(
            input_ids, attention_mask, mask_4d, position_ids, images, packed, encoded
        )
        if self.fastv is not None:
            if mask_4d:
                raise PrumergeError("fastv needs a 2-D attention mask")
            image, _ = assign_placeholders(packed.input_ids, image_token_id, lengths)
            is_image = packed.input_ids == image_token_id
            kept = self.fastv.arm(
                torch.where(is_image, image, torch.full_like(image, -1)),
                packed.attention_mask.bool(),
            )
            self.stats.tokens_out = kept
            self.stats.llm_full_layers = self.fastv.layer
            self.stats.llm_layer_tokens = [
                self.fastv.layer_tokens(int(n)) for n in lengths.tolist()
            ]
        inputs_embeds = embed(packed.input_ids)
        image_positions = packed.input_ids == image_token_id
        if encoded.features:
            values = torch.cat([f.to(inputs_embeds.device) for f in encoded.features])
            inputs_embeds = inputs_embeds.masked_scatter(
                image_positions[..., None], values.to(inputs_embeds.dtype)
            )
        family_inputs = self.adapter.sequence_inputs(packed, images)
        self.adapter.arm(packed, encoded)
        return {
            "input_ids": packed.input_ids,
            "attention_mask": packed.attention_mask_4d(attention_mask)  # type: ignore[arg-type]
            if mask_4d
            else packed.attention_mask,
            "labels": packed.labels,
            "position_ids": positions,
            "inputs_embeds": inputs_embeds,
            **family_inputs,
        }

    def _positions(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        mask_4d: bool,
        position_ids: torch.Tensor | None,
        images: dict[str, Any],
        packed: Packed,
        encoded: Encoded,
    ) -> torch.Tensor | None:
        if not self.adapter.mrope and self.positions == "compact":
            return None if position_ids is None else packed.position_ids(position_ids)
        resized = getattr(self.method, "resizes_input", False)
        if self.adapter.mrope and resized and position_ids is None:
            return self.adapter.resized_rope_positions(packed)
        if position_ids is None:
            if self.adapter.mrope:
                position_ids = self.adapter.rope_positions(
                    input_ids, None if mask_4d else attention_mask, images
                )
            elif attention_mask is None or mask_4d:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
                position_ids = position_ids.expand_as(input_ids)
            else:
                position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        lengths = torch.tensor([f.shape[0] for f in encoded.features], device=input_ids.device)
        anchors = torch.cat(encoded.anchors) if encoded.anchors else lengths[:0]
        source = packed.anchored_source(self.adapter.image_token_id, lengths, anchors)
        return packed.carry(position_ids, source)

    def _disarm(self) -> None:
        self.adapter.disarm()
        if self.fastv is not None:
            self.fastv.disarm()

    # -- patched entry points ----------------------------------------------------------
    def _take_images(self, kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """Pop the family's image inputs; None (and nothing popped) when there are none."""
        for name in self.adapter.refused_inputs:
            if kwargs.get(name) is not None:
                raise PrumergeError(
                    f"{name} is not reduced by prumerge on {self.adapter.title}; supported: "
                    f"images ({', '.join(self.adapter.image_inputs)})"
                )
        if kwargs.get("pixel_values") is None or kwargs.get("input_ids") is None:
            return None
        images = {n: kwargs.pop(n) for n in self.adapter.image_inputs if n in kwargs}
        images.update({n: kwargs.pop(n) for n in self.adapter.consumed_inputs if n in kwargs})
        return images

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            kwargs["input_ids"] = args[0]
            args = args[1:]
        images = self._take_images(kwargs)
        if images is None:
            return self._original_forward(*args, **kwargs)
        if self.fastv is not None and kwargs.get("labels") is not None:
            raise PrumergeError("fastv does not support labels: it drops tokens mid-model")
        prepared = self.prepare_inputs(
            kwargs.pop("input_ids"),
            attention_mask=kwargs.get("attention_mask"),
            labels=kwargs.get("labels"),
            position_ids=kwargs.pop("position_ids", None),
            **images,
        )
        if prepared["position_ids"] is not None:
            kwargs["position_ids"] = prepared["position_ids"]
        kwargs["attention_mask"] = prepared["attention_mask"]
        kwargs["inputs_embeds"] = prepared["inputs_embeds"]
        if kwargs.get("labels") is not None:
            kwargs["labels"] = prepared["labels"]
        kwargs.update({k: v for k, v in prepared.items() if k not in PREPARED_KEYS})
        try:
            return self._original_forward(*args, **kwargs)
        finally:
            self._disarm()

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            kwargs["input_ids"] = args[0]
            args = args[1:]
        input_ids = kwargs.get("input_ids")
        images = None if kwargs.get("inputs_embeds") is not None else self._take_images(kwargs)
        if images is None:
            self.stats = TokenStats()  # no images in this call
            return self._original_generate(*args, **kwargs)
        if kwargs.get("position_ids") is not None:
            raise PrumergeError("generate(position_ids=...) is not supported with reduction")
        prepared = self.prepare_inputs(
            input_ids, attention_mask=kwargs.get("attention_mask"), left_pad=True, **images
        )
        kwargs["input_ids"] = prepared["input_ids"]
        kwargs["attention_mask"] = prepared["attention_mask"]
        kwargs["inputs_embeds"] = prepared["inputs_embeds"]
        if prepared["position_ids"] is not None:
            kwargs["position_ids"] = prepared["position_ids"]
        kwargs.update({k: v for k, v in prepared.items() if k not in PREPARED_KEYS})
        try:
            output = self._original_generate(*args, **kwargs)
        finally:
            self._disarm()
        return _restore_prompt(output, input_ids, prepared["input_ids"].shape[1])  # type: ignore[union-attr]


def _restore_prompt(output: Any, input_ids: torch.Tensor, prompt_length: int) -> Any:
    """Give back the caller's own prompt followed by the new tokens, so that
    ``out[:, inputs.input_ids.shape[1]:]`` is the answer exactly as without reduction.

    Generate returns ``rows * n`` sequences with ``num_return_sequences=n`` (beam search or
    sampling), each prompt repeated n times in a row.
    """
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    repeats = sequences.shape[0] // input_ids.shape[0]
    prompt = input_ids.to(sequences.device).repeat_interleave(repeats, dim=0)
    restored = torch.cat([prompt, sequences[:, prompt_length:]], dim=1)
    if isinstance(output, torch.Tensor):
        return restored
    output.sequences = restored
    return output


def _pad_token_id(model: nn.Module) -> int:
    for source in (model.generation_config, model.config.get_text_config()):
        pad = getattr(source, "pad_token_id", None)
        if isinstance(pad, int):
            return pad
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            return eos
        if isinstance(eos, list) and eos:
            return int(eos[0])
    return 0


def apply(
    model: nn.Module,
    method: str | Method = "prumerge",
    *,
    positions: str | None = None,
    budget_per: str = "image",
    processor: Any = None,
    **options: Any,
) -> Handle:
    """Reduce the visual tokens of this one model instance.

    Args:
        model: a model of a supported family (``prumerge.adapters.FAMILIES``): LLaVA-1.5,
            LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL, Qwen2-VL, Qwen3-VL, InternVL3 or Gemma 3.
        method: a registered method name (see ``prumerge.methods.method_names()``) or a
            ``Method`` instance.
        positions: ``"compact"`` (default on 1-D RoPE models): kept tokens get consecutive
            positions; ``"original"``: each kept token keeps the position it had before
            reduction, and text after the image continues as it would without reduction.
            M-RoPE models (Qwen) always keep their original 3-D indices.
        budget_per: on anyres models (LLaVA-NeXT, OneVision) and InternVL's tiles,
            ``"image"``: a fixed budget covers each image's views together (split over them
            in proportion to their patches); ``"view"``: every view (tile) gets the budget.
            See docs/families.md.
        processor: the model's processor (or its tokenizer), for methods that read the
            instruction as text: ``cdpruner`` with ``relevance="clip"`` hands it to a CLIP
            text tower. Other methods do not need it.
        **options: the method's options, e.g. ``keep=0.25``, ``knn=32``, ``importance="mean"``.

    Returns:
        A ``Handle``: ``handle.stats`` has the tokens in/out per image of the last call, and
        ``handle.remove()`` (or a ``with`` block) undoes the patch.

    After ``apply``, ``model.generate(**processor(images=..., text=..., return_tensors="pt"))``
    works as usual and returns the caller's ``input_ids`` followed by the generated tokens,
    so ``processor.batch_decode(out[:, inputs["input_ids"].shape[1]:])`` decodes the answers.
    ``model(**inputs, labels=labels)`` runs with the reduced tokens; its logits and loss are
    over the shrunk sequence (each image's placeholders cut to its reduced length).
    """
    from prumerge.methods import build_method

    if isinstance(method, str):
        try:
            method = build_method(method, **options)
        except (ValueError, TypeError) as exc:
            raise PrumergeError(str(exc)) from None
    elif options:
        raise PrumergeError("pass options either to the method instance or to apply, not both")
    return Handle(model, method, positions=positions, budget_per=budget_per, processor=processor)


__all__ = ["Handle", "apply"]
