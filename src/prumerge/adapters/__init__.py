"""Adapters: the only code that knows model classes and layer indices.

One module per model family, each a ``FamilyAdapter`` registered in ``FAMILIES``:
``llava`` (LLaVA-1.5), ``llava_next`` (LLaVA-NeXT), ``llava_onevision`` (LLaVA-OneVision),
``qwen2_5_vl`` (Qwen2.5-VL and Qwen2-VL), ``qwen3_vl`` (Qwen3-VL), ``internvl`` (InternVL3)
and ``gemma3`` (Gemma 3). ``prumerge.apply`` picks the family from the model's
class. LLM-side methods (FastV) go through ``llm.LanguagePatch`` instead.
"""

# The imports register the families, in the order errors and docs list them.
# isort: off
from prumerge.adapters import llava as _llava  # noqa: F401
from prumerge.adapters import llava_next as _llava_next  # noqa: F401
from prumerge.adapters import llava_onevision as _llava_onevision  # noqa: F401
from prumerge.adapters import qwen2_5_vl as _qwen2_5_vl  # noqa: F401
from prumerge.adapters import qwen3_vl as _qwen3_vl  # noqa: F401
from prumerge.adapters import internvl as _internvl  # noqa: F401
from prumerge.adapters import gemma3 as _gemma3  # noqa: F401

# The LLM-side patches, registered by name in ``llm.LANGUAGE_PATCHES``.
from prumerge.adapters import fastv as _fastv  # noqa: F401
from prumerge.adapters import dart as _dart  # noqa: F401
from prumerge.adapters import pdrop as _pdrop  # noqa: F401

# isort: on
from prumerge.adapters.base import FAMILIES, Encoded, FamilyAdapter, TokenStats, supported_models
from prumerge.adapters.handle import Handle, apply

__all__ = [
    "FAMILIES",
    "Encoded",
    "FamilyAdapter",
    "Handle",
    "TokenStats",
    "apply",
    "supported_models",
]
