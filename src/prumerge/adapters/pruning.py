"""The shared mechanism of every LLM-side method: image tokens dropped from the sequence in
stages inside the decoder (FastV, DART, PyramidDrop, SparseVLM).

A method's patch (a ``StagedPruning`` subclass, one small file per method) says only:

- ``schedule(n)``: for an image of ``n`` tokens, the ``(layer, count)`` stages: from each
  stage's layer on it keeps ``count`` tokens (images may have different schedules: a call's
  stages are the union of its images' layers, and an image keeps its count where a stage
  is not its own);
- ``score(view)``: a score per current token at the start of a stage (``StageView``): each
  image keeps its highest-scoring tokens (ties to the earlier token).

Everything else is here (the rows and columns a pass keeps are planned in
:mod:`prumerge.adapters.stage_plan`, attention weights recomputed in
:mod:`prumerge.adapters.llm_attention`): layers 0..first-1 see every token; from each stage
layer on the dropped tokens are removed from the hidden states, the rotary position
embeddings, the attention mask and the KV cache of the later layers, so they really run on
the shorter sequence. Kept tokens keep their original positions, or (``compact_positions``) positions
renumbered without the dropped tokens, as PyramidDrop's release does (not on M-RoPE models,
whose 3-D indices are always kept).

Rows may drop different numbers of tokens (images of different sizes, different image counts
per row): the shorter rows are then padded at the front with copies of their last real token,
whose key columns are masked for every query, so each row's result does not depend on the
others.

Attention weights, where a method needs them, are computed by the method's patch from the
inputs of the attention module it reads (captured by a scoped pre-hook, ``capture_layers``),
for the few queries it needs, so the model can run with eager, sdpa or flash attention, with
a 4-D, 2-D or no attention mask, and with left or right padding. The choices are made once per
call, at its first forward pass, and reused by later steps, with or without the KV cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prumerge.adapters.llm import LanguagePatch
from prumerge.adapters.llm_attention import rotary_function
from prumerge.adapters.stage_plan import StagePlan, pass_dropped, pass_full, plan_stage
from prumerge.errors import PrumergeError
from prumerge.methods import LanguageMethod

_MISSING = object()


@dataclass
class Captured:
    """The inputs of one attention module in the call's first forward pass.

    Attributes:
        hidden: (B, Lc, H) its (normed) input, over the rows current at that layer.
        position_embeddings: (cos, sin) of those rows, as the module received them.
    """

    hidden: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]


@dataclass
class StageView:
    """What a method's patch sees at the start of one stage (the first forward pass).

    Rows are the current rows of the shortened sequence: ``rows[b, j]`` is the prompt
    position row j of batch row b holds (front padding copies a row's last real token).

    Attributes:
        stage: index into the call's stages (the union of its images' stage layers).
        layer: the stage's first layer (its input is ``hidden``).
        hidden: (B, Lc, H) the input of ``layer``: the output of layer ``layer - 1``.
        rows: (B, Lc) int64, the prompt position of every current row.
        real: (B, Lc) bool, True for real tokens (not padding, not front copies).
        image: (B, Lc) int64, the image of every current row (numbered across the batch),
            -1 for text and padding.
        last: (B,) int64, the current row of every batch row's last real token.
        position_embeddings: (cos, sin) of the current rows as ``layer`` would see them
            before this stage's drop.
        positions: (B, Lc) int64, the position index of every current row (its rotary
            position: original or compact; the row's prompt position on M-RoPE models).
        ordinal: (B, Lc) int64, every current row's index among its batch row's real prompt
            tokens (its position in the unpadded prompt).
        captured: the inputs of the attention modules of ``capture_layers``, by layer index.
        embeddings: (B, L, H) the decoder's input embeddings (when ``needs_embeddings``).
        keep: (I,) int64, the tokens every image keeps from this stage on.
    """

    stage: int
    layer: int
    hidden: torch.Tensor
    rows: torch.Tensor
    real: torch.Tensor
    image: torch.Tensor
    last: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    positions: torch.Tensor
    ordinal: torch.Tensor
    captured: dict[int, Captured]
    embeddings: torch.Tensor | None
    keep: torch.Tensor


@dataclass
class _Call:
    """State of one generate (or forward) call."""

    image: torch.Tensor  # (B, L) image of each prompt token, -1 elsewhere
    padding_mask: torch.Tensor  # (B, L) True for real tokens
    counts: torch.Tensor  # (S, I) tokens each image keeps from each stage on
    stages: list[int] = field(default_factory=list)  # (S,) the call's stage layers
    captured: dict[int, Captured] = field(default_factory=dict)
    embeddings: torch.Tensor | None = None
    by_stage: list[torch.Tensor] = field(default_factory=list)  # per stage, (B, L) cumulative
    rewrites: list[Rewrite | None] = field(default_factory=list)  # per stage (``select``)
    plan: StagePlan | None = None  # the current stage's rows and columns of this pass
    rows: torch.Tensor | None = None  # (B, Lc) pass rows the current hidden states hold
    real_rows: torch.Tensor | None = None  # (B, Lc) which of them are not front copies
    position_ids: torch.Tensor | None = None  # the pass's position ids (compact: shifted)

    @property
    def dropped(self) -> torch.Tensor | None:
        """(B, L) the prompt positions the last chosen stage drops (None before any)."""
        return self.by_stage[-1] if self.by_stage else None


class StagedPruning(LanguagePatch):
    """Wraps the decoder layers from the first stage layer on, of one language model.

    Subclasses set ``layer`` (and may set ``capture_layers``, ``needs_embeddings``,
    ``compact_positions``) in ``__init__`` before calling ``super().__init__``, and implement
    ``schedule`` and ``score``.
    """

    #: The earliest layer any stage may start at (layers before it are never wrapped).
    layer: int
    #: Layers whose attention inputs the first forward pass records (``StageView.captured``).
    capture_layers: tuple[int, ...] = ()
    #: Record the decoder's input embeddings (``StageView.embeddings``).
    needs_embeddings: bool = False
    #: Renumber positions without the dropped tokens (1-D RoPE only).
    compact_positions: bool = False

    def __init__(self, language_model: nn.Module, method: LanguageMethod) -> None:
        name = method.name
        layers = getattr(language_model, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise PrumergeError(
                f"{name} needs a LLaMA-style decoder with .layers; got {type(language_model).__name__}"
            )
        if not 1 <= self.layer < len(layers):
            raise PrumergeError(
                f"{name}: its first pruned layer {self.layer} must be in 1..{len(layers) - 1} "
                f"(the decoder has {len(layers)} layers)"
            )
        self.name = name
        self.language_model = language_model
        self.layers = layers
        self.rotary = rotary_function(layers[0].self_attn, name)
        self.call: _Call | None = None
        first = self.layer
        self._saved = [vars(layers[i]).get("forward", _MISSING) for i in range(first, len(layers))]
        for index in range(first, len(layers)):
            module = layers[index]
            module.forward = self._wrap(module.forward, index)
        self._hooks = [
            layers[i].self_attn.register_forward_pre_hook(
                functools_partial(self._capture, i), with_kwargs=True
            )
            for i in self.capture_layers
        ]
        if self.needs_embeddings:
            self._hooks.append(
                layers[0].register_forward_pre_hook(self._capture_embeddings, with_kwargs=True)
            )

    # -- what a method's patch implements ------------------------------------------------
    def schedule(self, count: int) -> list[tuple[int, int]]:
        """``(layer, kept)`` stages of an image of ``count`` tokens: layers increasing (each
        >= ``self.layer``, below the decoder's depth), counts non-increasing."""
        raise NotImplementedError

    def score(self, view: StageView) -> torch.Tensor:
        """(B, Lc) float: each image keeps its highest-scoring current tokens."""
        raise NotImplementedError

    def select(self, view: StageView, score: torch.Tensor) -> tuple[torch.Tensor, Rewrite | None]:
        """(B, Lc) bool, the current rows that go on, and what some of them hold from now
        on (None: their own states). By default each image's ``view.keep`` best-scoring
        tokens, unchanged; SparseVLM v1 overrides it to put recycled tokens in kept rows."""
        return top_per_image(score, view.image, view.keep), None

    # -- lifecycle -----------------------------------------------------------------------
    def remove(self) -> None:
        first = self.layer
        for index, saved in zip(range(first, len(self.layers)), self._saved, strict=True):
            module = self.layers[index]
            if saved is _MISSING:
                vars(module).pop("forward", None)
            else:
                module.forward = saved  # accelerate's hooked forward, for example
        for hook in self._hooks:
            hook.remove()

    def arm(self, image: torch.Tensor, padding_mask: torch.Tensor) -> list[int]:
        images = int(image.max()) + 1 if image.numel() else 0
        counts = torch.bincount(image[image >= 0], minlength=images)  # (I,)
        tokens = [self.layer_tokens(int(n)) for n in counts.tolist()]  # (I, layers)
        stages = sorted(
            {
                i
                for per_layer in tokens
                for i in range(1, len(per_layer))
                if per_layer[i] != per_layer[i - 1]
            }
        )
        table = torch.tensor(
            [[per_layer[i] for i in stages] for per_layer in tokens], dtype=torch.long
        ).view(images, len(stages))
        self.call = _Call(
            image=image,
            padding_mask=padding_mask,
            counts=table.T.contiguous().to(image.device),
            stages=stages,
        )
        return [per_layer[-1] for per_layer in tokens]

    def layer_tokens(self, count: int, num_layers: int | None = None) -> list[int]:
        """The tokens an image of ``count`` tokens has in every decoder layer."""
        num_layers = len(self.layers) if num_layers is None else num_layers
        stages = self.schedule(count)
        layers = [layer for layer, _ in stages]
        kept = [n for _, n in stages]
        if (
            layers != sorted(set(layers))
            or any(not self.layer <= layer < len(self.layers) for layer in layers)
            or any(b > a for a, b in zip([count, *kept], kept, strict=False))
        ):
            raise PrumergeError(f"{self.name}: bad schedule {stages} for {count} tokens")
        tokens, current = [], count
        for index in range(num_layers):
            for layer, n in stages:
                if layer == index:
                    current = n
            tokens.append(current)
        return tokens

    def disarm(self) -> None:
        self.call = None

    def _capture(self, index: int, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = self.call
        if call is None or len(call.by_stage) == len(call.stages):
            return
        if index in call.captured:
            return
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        call.captured[index] = Captured(hidden, kwargs.get("position_embeddings"))

    def _capture_embeddings(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = self.call
        if call is not None and call.embeddings is None and not call.by_stage:
            call.embeddings = kwargs.get("hidden_states", args[0] if args else None)

    # -- the wrapped layers --------------------------------------------------------------
    def _wrap(self, original: Callable[..., Any], index: int) -> Callable[..., Any]:
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            call = self.call
            if call is None or not call.stages or index < call.stages[0]:
                return original(hidden_states, *args, **kwargs)
            if index in call.stages:
                stage = call.stages.index(index)
                hidden_states = self._enter_stage(call, stage, hidden_states, kwargs)
            elif call.plan is None:
                raise PrumergeError(f"{self.name}: a stage layer did not run before this one")
            return original(hidden_states, *args, **self._apply(call, kwargs))

        return forward

    def _apply(self, call: _Call, kwargs: dict[str, Any]) -> dict[str, Any]:
        assert call.plan is not None
        applied = call.plan.apply(kwargs)
        if self.compact_positions and call.position_ids is not None:
            rows = call.plan.keep_rows
            ids = call.position_ids
            if rows is not None:
                ids = ids.expand(rows.shape[0], -1).gather(1, rows.to(ids.device))
            cos, sin = self.language_model.rotary_emb(applied["position_embeddings"][0], ids)
            applied["position_embeddings"] = (cos, sin)
            applied["position_ids"] = ids
        return applied

    def _enter_stage(
        self, call: _Call, stage: int, hidden: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """Drop this stage's tokens from ``hidden`` (this pass's current rows) and plan the
        layers up to the next stage."""
        cos = kwargs["position_embeddings"][0]
        q_len = cos.shape[-2]
        batch = max(hidden.shape[0], call.padding_mask.shape[0])
        device = hidden.device
        if stage == 0:
            call.rows = torch.arange(q_len, device=device).expand(batch, q_len)
            call.real_rows = torch.ones(batch, q_len, dtype=torch.bool, device=device)
            call.position_ids = None
        if len(call.by_stage) == stage:  # the call's first pass: choose
            if q_len != call.image.shape[1]:
                raise PrumergeError(
                    f"{self.name}: the first forward pass must see the whole prompt"
                )
            view = self._view(call, stage, hidden, kwargs)
            call.by_stage.append(self._drop(call, stage, view))
            if len(call.by_stage) == len(call.stages):
                call.captured.clear()
                call.embeddings = None
        dropped = call.by_stage[stage]
        plan = plan_stage(hidden, kwargs, dropped, call.padding_mask, q_len=q_len)
        assert call.rows is not None and call.real_rows is not None
        new_rows = (
            plan.keep_rows.to(device)
            if plan.keep_rows is not None
            else torch.arange(q_len, device=device).expand(batch, q_len)
        )
        # Where each new row is among the current ones (front copies are never sources).
        where = torch.full((batch, q_len + 1), 0, dtype=torch.long, device=device)
        slots = torch.arange(call.rows.shape[1], device=device).expand_as(call.rows)
        target = torch.where(call.real_rows, call.rows, q_len)
        where.scatter_(1, target, slots)
        source = where.gather(1, new_rows)
        hidden = hidden.expand(batch, *hidden.shape[1:])
        rewrite = call.rewrites[stage]
        if rewrite is not None and q_len == call.image.shape[1]:  # a pass over the prompt
            hidden = rewrite.apply(hidden, where)
        hidden = hidden.gather(1, source[..., None].expand(-1, -1, hidden.shape[-1]))
        width = new_rows.shape[1]
        count = (~pass_dropped(dropped, plan)).sum(dim=1)
        call.real_rows = torch.arange(width, device=device)[None, :] >= (width - count)[:, None]
        call.rows = new_rows
        call.plan = plan
        if self.compact_positions:
            call.position_ids = self._compact_ids(kwargs, dropped, plan)
        return hidden

    def _compact_ids(
        self, kwargs: dict[str, Any], dropped: torch.Tensor, plan: StagePlan
    ) -> torch.Tensor | None:
        """(B, q_len) this pass's position ids less the dropped prompt tokens before each."""
        ids = kwargs.get("position_ids")
        if ids is None or ids.ndim != 2:
            return None  # M-RoPE (3-D indices) keeps its original positions
        device = ids.device
        full = pass_full(dropped.to(device), plan.kv_len)
        before = full.long().cumsum(dim=1) - full.long()  # (B, kv) dropped columns before
        start = plan.kv_len - plan.q_len
        batch = full.shape[0]
        return ids.expand(batch, -1) - before[:, start:]

    def _view(
        self, call: _Call, stage: int, hidden: torch.Tensor, kwargs: dict[str, Any]
    ) -> StageView:
        device = hidden.device
        assert call.rows is not None and call.real_rows is not None
        rows, real = call.rows, call.real_rows
        padding = call.padding_mask.to(device)
        batch = rows.shape[0]
        real = real & padding.expand(batch, -1).gather(1, rows)
        image = call.image.to(device).expand(batch, -1).gather(1, rows)
        image = torch.where(real, image, -1)
        slots = torch.arange(rows.shape[1], device=device)
        last = torch.where(real, slots, -1).max(dim=1).values
        if stage == 0:
            embeddings = kwargs["position_embeddings"]
            positions = kwargs.get("position_ids")
        else:
            applied = self._apply(call, kwargs)
            embeddings = applied["position_embeddings"]
            positions = applied.get("position_ids")
        if positions is None or positions.ndim != 2:
            positions = rows
        cos, sin = embeddings
        return StageView(
            stage=stage,
            layer=call.stages[stage],
            hidden=hidden.expand(batch, *hidden.shape[1:]),
            rows=rows,
            real=real,
            image=image,
            last=last,
            position_embeddings=(
                cos.expand(batch, *cos.shape[1:]),
                sin.expand(batch, *sin.shape[1:]),
            ),
            positions=positions.expand(batch, -1).to(device),
            ordinal=(padding.long().cumsum(dim=1) - 1).expand(batch, -1).gather(1, rows),
            captured=call.captured,
            embeddings=call.embeddings,
            keep=call.counts[stage].to(device),
        )

    def _drop(self, call: _Call, stage: int, view: StageView) -> torch.Tensor:
        """(B, L) the prompt positions dropped from this stage on (cumulative)."""
        score = self.score(view).float()
        keep, rewrite = self.select(view, score)  # (B, Lc)
        call.rewrites.append(rewrite)
        batch, length = call.image.shape
        device = score.device
        dropped = (
            call.by_stage[-1].clone()
            if call.by_stage
            else torch.zeros(batch, length, dtype=torch.bool, device=device)
        )
        drop_now = (view.image >= 0) & ~keep
        b, j = drop_now.nonzero(as_tuple=True)
        dropped[b, view.rows[b, j]] = True
        return dropped


@dataclass
class Rewrite:
    """New states for some rows at a stage's start, in every pass over the whole prompt:
    the row holding prompt position ``target[e]`` of batch row ``batch[e]`` becomes the sum
    over its entries of ``weight[e]`` times the row holding prompt position ``source[e]``
    (read before any is rewritten). Rows without an entry keep their states."""

    batch: torch.Tensor  # (E,) int64
    target: torch.Tensor  # (E,) int64 prompt positions
    source: torch.Tensor  # (E,) int64 prompt positions
    weight: torch.Tensor  # (E,) float

    def apply(self, hidden: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """``hidden`` (B, Lc, H) rewritten; ``where`` (B, L + 1): the current row of every
        prompt position."""
        device = hidden.device
        batch = self.batch.to(device)
        target = where[batch, self.target.to(device)]
        source = where[batch, self.source.to(device)]
        values = hidden[batch, source].float() * self.weight.to(device, torch.float32)[:, None]
        out = hidden.float()  # a copy where hidden is not float32; summed in float32
        out = out.clone() if out is hidden else out
        out[batch, target] = 0
        return out.index_put_((batch, target), values, accumulate=True).to(hidden.dtype)


def top_per_image(score: torch.Tensor, image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the ``keep[i]`` highest-``score`` tokens of every image i (ties to the
    earlier token); False for every token with ``image < 0``.

    Args:
        score: (B, L) float.
        image: (B, L) int64, the image of every token, -1 elsewhere.
        keep: (I,) int64.
    """
    where = (image >= 0).nonzero()  # (M, 2), row-major: in sequence order
    owner = image[where[:, 0], where[:, 1]]  # (M,)
    value = score[where[:, 0], where[:, 1]]
    by_score = torch.sort(value, descending=True, stable=True).indices
    order = by_score[torch.sort(owner[by_score], stable=True).indices]  # by image, then score
    counts = torch.bincount(owner, minlength=keep.shape[0])
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.shape[0], device=score.device) - starts[owner[order]]
    kept = torch.zeros_like(image, dtype=torch.bool)
    kept[where[:, 0], where[:, 1]] = rank < keep.to(score.device)[owner]
    return kept


def uses_mrope(language_model: nn.Module) -> bool:
    """True for decoders with multimodal rotary embeddings (Qwen2-VL/2.5-VL), whose 3-D
    position indices are always kept."""
    rotary = getattr(language_model, "rotary_emb", None)
    config = getattr(language_model, "config", None)
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    return getattr(rotary, "mrope_section", None) is not None or (
        isinstance(parameters, dict) and "mrope_section" in parameters
    )


def functools_partial(function: Callable[..., Any], first: Any) -> Callable[..., Any]:
    return lambda *args, **kwargs: function(first, *args, **kwargs)
