"""prumerge: adaptive visual-token pruning and merging for large multimodal models.

import prumerge
handle = prumerge.apply(model, method="prumerge+")   # one LLaVA/NeXT/OneVision/Qwen-VL instance
out = model.generate(**inputs, max_new_tokens=32)
handle.stats.tokens_out                              # visual tokens per image
handle.remove()                                      # back to the original model
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prumerge.adapters.handle import Handle
    from prumerge.methods import Method

__version__ = "0.1.0"


def apply(model: Any, method: str | Method = "prumerge", **options: Any) -> Handle:
    """Patch one model instance to reduce its visual tokens; the family (LLaVA-1.5, LLaVA-NeXT,
    LLaVA-OneVision, Qwen2.5-VL, Qwen2-VL) is picked from the model. See
    ``prumerge.adapters.handle.apply`` for the options (``positions``, ``budget_per`` and the
    method's own)."""
    from prumerge.adapters import apply as _apply

    return _apply(model, method, **options)


__all__ = ["apply", "__version__"]
