"""The method interface and its registry."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch

from prumerge.ops import Reduction
from prumerge.ops.select import validate_keep


@dataclass
class VisionInputs:
    """What an adapter hands a method for one batch of images.

    Attributes:
        features: (B, N, C) patch features of the selected vision layer, before the projector.
        keys: (B, N, Ck) patch keys of the encoder layer that consumes the selected layer,
            or None when the method does not need attention.
        cls_attn: (B, N) [CLS] attention over the patches in that layer (multi-head mean, or
            the reference variant if the method asked for it), or None.
        grid: (rows, cols) of the patch grid.
    """

    features: torch.Tensor
    keys: torch.Tensor | None = None
    cls_attn: torch.Tensor | None = None
    grid: tuple[int, int] | None = None


class VisionMethod:
    """Base class of vision-side reduction methods (before the projector)."""

    name: ClassVar[str] = ""
    #: The adapter captures q/k of the attention layer only for methods that need them.
    needs_attention: ClassVar[bool] = False
    #: "multihead" or "reference": how the adapter computes ``cls_attn``.
    attention_mode: str = "multihead"
    #: Which encoder layer's [CLS] attention and keys: "consumer", the layer whose input is
    #: the selected feature layer (PruMerge), or "producer", the layer that outputs it
    #: (VisionZip).
    attention_source: ClassVar[str] = "consumer"

    def reduce(self, inputs: VisionInputs) -> Reduction:
        raise NotImplementedError

    def describe_budget(self) -> str:
        """What this method's token count means, for statistics and docs."""
        return "output tokens the LLM sees per image"

    def options(self) -> dict[str, Any]:
        """The options this instance was built with (for result files)."""
        return {name: getattr(self, name) for name in option_defaults(type(self))}


def option_defaults(cls: type[VisionMethod]) -> dict[str, Any]:
    """The options a method's constructor takes, with their defaults (None if required)."""
    if cls.__init__ is object.__init__:
        return {}
    params = inspect.signature(cls.__init__).parameters
    return {
        p.name: None if p.default is inspect.Parameter.empty else p.default
        for p in params.values()
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


METHODS: dict[str, type[VisionMethod]] = {}
T = TypeVar("T", bound=type[VisionMethod])


def register_method(name: str) -> Callable[[T], T]:
    """Class decorator adding a method to the registry under ``name``."""

    def add(cls: T) -> T:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return add


def method_names() -> list[str]:
    return sorted(METHODS)


def build_method(name: str, **options: Any) -> VisionMethod:
    """Instantiate a registered method, with a clear error for unknown names or options."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(method_names())}")
    cls = METHODS[name]
    accepted = list(option_defaults(cls))
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"method {name!r} does not take option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(accepted) or 'no options'}"
        )
    validate_keep(options.get("keep"))
    return cls(**options)
