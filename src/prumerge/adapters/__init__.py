"""Adapters: the only code that knows model classes and layer indices.

One module per model family, each a ``FamilyAdapter`` registered in ``FAMILIES``:
``llava`` (LLaVA-1.5), ``llava_next`` (LLaVA-NeXT), ``llava_onevision`` (LLaVA-OneVision),
``qwen2_5_vl`` (Qwen2.5-VL and Qwen2-VL), ``qwen3_vl`` (Qwen3-VL), ``internvl`` (InternVL3)
and ``gemma3`` (Gemma 3). ``prumerge.apply`` picks the family from the model's
class. LLM-side methods (FastV, DART, PDrop, SparseVLM) go through ``llm.LanguagePatch`` instead. A new family
is a new module here, named in ``base.FAMILIES``'s built-ins (or, from an outside package, an
entry point of group ``prumerge.families``).
"""

from prumerge.adapters.base import FAMILIES, Encoded, FamilyAdapter, TokenStats, supported_models
from prumerge.adapters.handle import Handle, apply
from prumerge.adapters.llm import LANGUAGE_PATCHES

# The built-in families (in the order errors and docs list them) and LLM-side patches are
# named in their registries (``base.FAMILIES``, ``llm.LANGUAGE_PATCHES``) and imported from
# there; loading them here also loads the outside packages' entry points.
FAMILIES.load()
LANGUAGE_PATCHES.load()

__all__ = [
    "FAMILIES",
    "Encoded",
    "FamilyAdapter",
    "Handle",
    "TokenStats",
    "apply",
    "supported_models",
]
