"""The method interfaces, their registry, and the one place where method options are checked."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch

from prumerge.ops import Reduction, full_reduction
from prumerge.ops.select import validate_keep
from prumerge.registry import Registry

#: Where a method's importance signal comes from: "cls", the [CLS] query's attention over
#: the patches; "mean", the mean attention each patch receives from all queries (towers
#: without [CLS]); "auto", "cls" when the tower has a [CLS] token, else "mean".
IMPORTANCE_CHOICES = ("auto", "cls", "mean")

#: Where a vision-side method's tokens live (``VisionMethod.feature_space``): "tower", the
#: vision tower's features before the projector (the adapter projects the tokens the method
#: returns); "projected", the projector's outputs (the adapter projects every patch first,
#: and the tokens the method returns go to the LLM as they are).
FEATURE_SPACES = ("tower", "projected")


@dataclass
class VisionInputs:
    """What an adapter hands a vision-side method for one batch of views.

    Attributes:
        features: (B, N, C) patch tokens of one view per row, in the space ``space`` names:
            the selected vision layer's features (before the projector) on LLaVA-family
            models, or, for methods whose ``feature_space`` is "projected", the projector's
            outputs of those features (C is then the LLM's width); the PatchMerger's output
            on Qwen2-VL/2.5-VL, whose merger is the projector (``space`` is "projected"
            there for every method).
        keys: (B, N, Ck) keys of the attention layer the importance comes from (pooled over
            each PatchMerger group on Qwen), or None when the method does not need them.
        cls_attn: (B, N) the importance of every patch: the [CLS] attention (multi-head mean,
            or the reference variant if the method asked for it) or, with
            ``importance="mean"``, the mean attention each patch receives; None when the
            method does not need it.
        grid: (rows, cols) of the patch grid.
        budget: an exact output count for every row, set by adapters that split one
            per-image budget over several views (LLaVA-NeXT, LLaVA-OneVision); it overrides
            the method's own ``keep``. None: the method's ``keep`` applies.
        key_heads: attention heads the width of ``keys`` splits into (heads side by side),
            for methods whose metric is the keys averaged over heads (ToMe, VisionZip); None
            when unknown (the keys are then used as they are).
        cls_token: (B, C) the [CLS] token's features in the same layer and space as
            ``features``, for methods that send it to the LLM (VisionZip); None for towers
            without one and for grids that are no single tower view (anyres).
        space: "tower" or "projected" (``FEATURE_SPACES``): what ``features`` holds.
        tower_features: (B, N, Ct) with ``space="projected"``: the tower features the
            projector turned into ``features``, patch for patch (methods that need both, such
            as CDPruner, read them here); None where the family has no per-token tower
            features (Qwen's merger pools 2x2 ViT patches) or ``space`` is "tower".
        object_importance: (B, N) the mean attention each patch receives in the encoder
            layer the method's ``object_layer`` names (1-based), for methods that read a
            second layer (HiPrune's anchors); None otherwise.
        instruction: (B, M, H) for methods with ``needs_instruction``: the LLM's input
            embeddings of the instruction each row's image came with (the prompt's text
            after the row's last image), padded; None where the call has no prompt
            (``Handle.encode_images``) or the method does not ask.
        instruction_mask: (B, M) bool, False at the padding of ``instruction``.
        image_embeds: (B, N, D) for methods that name a text tower (``text_tower``): the
            patches in its joint image-text space (CLIP's ``visual_projection`` of the
            post-normed ``tower_features``); None otherwise.
        text_embeds: (B, S, D) the same tower's embeddings of each row's instruction, one
            per 77-token segment, padded; None where the call has no prompt.
        text_embeds_mask: (B, S) bool, False at the padding of ``text_embeds``.
    """

    features: torch.Tensor
    keys: torch.Tensor | None = None
    cls_attn: torch.Tensor | None = None
    grid: tuple[int, int] | None = None
    budget: int | None = None
    key_heads: int | None = None
    cls_token: torch.Tensor | None = None
    space: str = "tower"
    tower_features: torch.Tensor | None = None
    object_importance: torch.Tensor | None = None
    instruction: torch.Tensor | None = None
    instruction_mask: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    text_embeds_mask: torch.Tensor | None = None

    @property
    def importance(self) -> torch.Tensor | None:
        """The importance signal (an alias of ``cls_attn``, which it is on [CLS] towers)."""
        return self.cls_attn


#: Where a method that can merge inside the vision tower does (``VisionMethod.where``):
#: "auto", inside where the family's tower can be patched and after it elsewhere; "tower",
#: inside or a one-line error; "after", after the tower (``reduce``).
WHERE_CHOICES = ("auto", "tower", "after")


@dataclass
class TowerMerge:
    """How a method merges tokens inside the vision tower, layer by layer (ToMe).

    Attributes:
        schedule: tokens to merge in each encoder layer that produces the selected features
            (layer 0 first), between its attention and its MLP.
        protected: leading tokens that never merge ([CLS]).
        metric: "key_mean" (each layer's keys averaged over heads) or "keys" (full width).
        order: "raster" or "tome": the order of the merged tokens sent on (see
            ``prumerge.ops.tome.TOME_ORDERS``).
        proportional_attention: add log(size) to the attention logits of every key, so a
            merged token counts as many times as it holds tokens (ToMe's ``prop_attn``).
    """

    schedule: list[int]
    protected: int
    metric: str = "key_mean"
    order: str = "raster"
    proportional_attention: bool = True


class Method:
    """Base class of every registered method; see ``VisionMethod`` and ``LanguageMethod``."""

    name: ClassVar[str] = ""
    #: "vision": reduces the vision tower's tokens before the LLM; "llm": prunes inside it.
    side: ClassVar[str] = "vision"
    #: The adapter captures q/k of the attention layer only for methods that need them.
    needs_attention: ClassVar[bool] = False
    #: The Handle embeds each prompt's instruction only for methods that read it
    #: (``VisionInputs.instruction``).
    needs_instruction: ClassVar[bool] = False

    def describe_budget(self) -> str:
        """What this method's token count means, for statistics and docs."""
        return "output tokens the LLM sees per image"

    def options(self) -> dict[str, Any]:
        """The options this instance was built with (for result files)."""
        return {name: getattr(self, name) for name in option_defaults(type(self))}

    def reduce(self, inputs: VisionInputs) -> Reduction:
        raise NotImplementedError


class VisionMethod(Method):
    """A method that reduces each image's patch tokens before they reach the LLM."""

    #: "multihead" or "reference": how the adapter computes [CLS] attention.
    attention_mode: str = "multihead"
    #: Which encoder layer's attention and keys: "consumer", the layer whose input is the
    #: selected feature layer (PruMerge), or "producer", the layer that outputs it (VisionZip).
    attention_source: ClassVar[str] = "consumer"
    #: "auto", "cls" or "mean" (see ``IMPORTANCE_CHOICES``).
    importance: str = "auto"
    #: The adapter runs the vision tower on resized images (``target_grid``) instead of
    #: reducing its output (the ``downsample`` baseline).
    resizes_input: ClassVar[bool] = False
    #: "tower" or "projected" (``FEATURE_SPACES``): the space of the tokens the method
    #: selects from and returns. A method may set it per instance (an option).
    feature_space: str = "tower"
    #: "after" for methods that reduce the tower's output; see ``WHERE_CHOICES``.
    where: str = "after"
    #: A second encoder layer (1-based, counted from the first) whose mean attention received
    #: the adapter hands over as ``VisionInputs.object_importance`` (HiPrune); None: none.
    object_layer: int | None = None

    def budget_for(self, inputs: VisionInputs) -> Any:
        """The budget for these inputs: the adapter's exact count if it set one, else ``keep``."""
        return inputs.budget if inputs.budget is not None else getattr(self, "keep", None)

    def target_grid(self, rows: int, cols: int) -> tuple[int, int]:
        """For ``resizes_input`` methods: the patch grid to run the tower at."""
        raise NotImplementedError

    def tower_merge(
        self, *, num_patches: int, num_prefix_tokens: int, num_layers: int
    ) -> TowerMerge | None:
        """How to merge inside a tower of ``num_layers`` layers that produce the features of
        ``num_patches`` patches after ``num_prefix_tokens`` prefix tokens, or None to reduce
        after the tower with ``reduce``. Raises ValueError when the budget cannot be met."""
        return None


class LanguageMethod(Method):
    """A method that prunes image tokens inside the language model (FastV).

    Its vision side is the identity (``reduce`` returns every token unchanged); an adapter
    wraps the family's decoder layers with the patch registered for the method's name in
    ``prumerge.adapters.llm``, so it works on every family whose decoder it can wrap.

    Attributes:
        keep: image tokens each image keeps from LLM layer ``layer`` on.
        layer: K, the first decoder layer that sees the pruned sequence.
    """

    side = "llm"
    #: Kept for code that asks ``getattr(method, "inside_llm", False)``.
    inside_llm: ClassVar[bool] = True
    keep: int | float
    layer: int

    def reduce(self, inputs: VisionInputs) -> Reduction:
        return full_reduction(inputs.features)


def projects_first(method: Method) -> bool:
    """True when ``method`` selects on the projector's outputs (``feature_space="projected"``):
    the adapter then projects every patch before the method runs, and not after."""
    space = getattr(method, "feature_space", "tower")
    if space not in FEATURE_SPACES:
        raise ValueError(
            f"method {method.name!r} has feature_space={space!r}; expected one of "
            f"{', '.join(map(repr, FEATURE_SPACES))}"
        )
    return space == "projected"


def option_defaults(cls: type[Method]) -> dict[str, Any]:
    """The options a method's constructor takes, with their defaults (None if required)."""
    if cls.__init__ is object.__init__:
        return {}
    params = inspect.signature(cls.__init__).parameters
    return {
        p.name: None if p.default is inspect.Parameter.empty else p.default
        for p in params.values()
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def _name_method(name: str, cls: type[Method]) -> None:
    cls.name = name


#: The registered methods: the built-ins (``prumerge.methods`` imports them) and those of
#: outside packages (entry-point group ``prumerge.methods``; see ``prumerge.registry``).
METHODS: Registry[type[Method]] = Registry(
    "method", group="prumerge.methods", builtins=("prumerge.methods",), on_add=_name_method
)
T = TypeVar("T", bound=type[Method])


def register_method(name: str) -> Callable[[T], T]:
    """Class decorator adding a method to the registry under ``name`` (a second method of
    the same name raises ``prumerge.registry.DuplicateNameError``)."""
    return METHODS.register(name)  # type: ignore[return-value]


def method_names() -> list[str]:
    return sorted(METHODS)


def build_method(name: str, **options: Any) -> Method:
    """Instantiate a registered method; unknown names, unknown options and bad values raise
    ValueError with a one-line message (the constructors check their own values)."""
    cls = METHODS[name]  # an unknown name: UnknownNameError (a ValueError), names listed
    accepted = list(option_defaults(cls))
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"method {name!r} does not take option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(accepted) or 'no options'}"
        )
    return cls(**options)


# -- option checks, shared by every constructor --------------------------------------------


def check_keep(keep: Any, *, adaptive: bool = False) -> Any:
    """``keep`` unchanged if it is an int >= 1, a float ratio in (0, 1], or None when the
    method has an adaptive mode; else ValueError."""
    if keep is None and not adaptive:
        raise ValueError(
            "keep must be an int count or a float ratio; this method has no adaptive mode"
        )
    validate_keep(keep)
    return keep


def check_int(name: str, value: Any, *, minimum: int, maximum: int | None = None) -> int:
    """``value`` if it is an int in [minimum, maximum]; else ValueError (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int; got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise ValueError(f"{name} must be >= {minimum}{upper}; got {value}")
    return value


def check_float(name: str, value: Any, *, minimum: float, maximum: float | None = None) -> float:
    """``value`` if it is a finite number in [minimum, maximum]; else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number; got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise ValueError(f"{name} must be >= {minimum}{upper}; got {value}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false; got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value
