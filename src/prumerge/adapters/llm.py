"""The LLM-side interface: methods that prune image tokens inside the language model.

A family adapter hands over its decoder (``FamilyAdapter.language_model``, a module with a
``layers`` list); the patch registered for the method's name wraps those layers on this one
instance, and the ``Handle`` arms it before every call with where each image's tokens are in
the (already shrunk) sequence. Nothing here knows a model family. The patches that drop
tokens in stages share one mechanism, ``prumerge.adapters.pruning.StagedPruning``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from prumerge.errors import PrumergeError
from prumerge.methods import LanguageMethod
from prumerge.registry import Registry


class LanguagePatch:
    """What the ``Handle`` needs from an LLM-side patch.

    Attributes:
        layer: the first decoder layer that runs on the pruned sequence (FastV's K).
    """

    layer: int

    def layer_tokens(self, count: int, num_layers: int | None = None) -> list[int]:
        """The tokens an image of ``count`` tokens has in every decoder layer (the exact
        accounting behind the "equivalent tokens" of multi-stage methods)."""
        raise NotImplementedError

    def __init__(self, language_model: nn.Module, method: LanguageMethod) -> None:
        raise NotImplementedError

    def arm(self, image: torch.Tensor, padding_mask: torch.Tensor) -> list[int]:
        """Prepare for one forward or generate call.

        Args:
            image: (B, L) int64, the image each token belongs to (numbered across the batch),
                -1 for text and padding.
            padding_mask: (B, L) bool, True for real tokens.

        Returns:
            The image tokens each image keeps from ``layer`` on.
        """
        raise NotImplementedError

    def disarm(self) -> None:
        """Forget the call's state (the layers then run as if unpatched)."""
        raise NotImplementedError

    def remove(self) -> None:
        """Undo the patch exactly."""
        raise NotImplementedError


#: The language-model patches, by the name of the LLM-side method they implement: the
#: built-ins (imported by name on first use) and those of outside packages (entry-point
#: group ``prumerge.llm_patches``; see ``prumerge.registry``).
LANGUAGE_PATCHES: Registry[type[LanguagePatch]] = Registry(
    "LLM-side patch",
    group="prumerge.llm_patches",
    builtins=(
        "prumerge.adapters.fastv",
        "prumerge.adapters.dart",
        "prumerge.adapters.pdrop",
        "prumerge.adapters.sparsevlm",
    ),
)
P = TypeVar("P", bound=type[LanguagePatch])


def register_language_patch(name: str) -> Callable[[P], P]:
    """Class decorator: the patch that implements the LLM-side method ``name`` (a second
    patch of the same name raises ``prumerge.registry.DuplicateNameError``)."""
    return LANGUAGE_PATCHES.register(name)  # type: ignore[return-value]


def patch_language_model(method: LanguageMethod, language_model: nn.Module) -> LanguagePatch:
    """The registered patch of ``method`` on this decoder (``prumerge.adapters`` imports
    the built-in patches, as it does the families)."""
    patch = LANGUAGE_PATCHES.get(method.name)
    if patch is None:
        raise PrumergeError(
            f"LLM-side method {method.name!r} has no language-model patch; available: "
            f"{', '.join(sorted(LANGUAGE_PATCHES))}"
        )
    return patch(language_model, method)
