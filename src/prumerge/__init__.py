"""prumerge: adaptive visual-token pruning and merging for large multimodal models.

import prumerge
handle = prumerge.apply(model, method="prumerge+")   # one LLaVA model instance
out = model.generate(**inputs, max_new_tokens=32)
handle.stats.tokens_out                              # visual tokens per image
handle.remove()                                      # back to the original model
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prumerge.adapters.llava import Handle
    from prumerge.methods import VisionMethod

__version__ = "0.1.0"


def apply(model: Any, method: str | VisionMethod = "prumerge", **options: Any) -> Handle:
    """Patch one LLaVA model instance to reduce its visual tokens; see ``adapters.llava.apply``."""
    from prumerge.adapters.llava import apply as _apply

    return _apply(model, method, **options)


__all__ = ["apply", "__version__"]
