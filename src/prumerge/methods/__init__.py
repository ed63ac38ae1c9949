"""Registry of visual-token reduction methods, by name.

A vision-side method (``VisionMethod``) turns one view's patch tokens (plus, if it asks for
them, the importance signal and the keys of an encoder layer) into a ``Reduction``. An
LLM-side method (``LanguageMethod``, FastV) leaves the vision side alone and prunes inside the
language model, through a patch the adapters register for it. Adapters know models; methods
know only tensors.

Add a method with::

    @register_method("name")
    class MyMethod(VisionMethod):
        '''One-line summary. Cite the paper.'''
        needs_attention = True

        def __init__(self, keep: int | float = 0.25): ...
        def reduce(self, inputs: VisionInputs) -> Reduction: ...

A method that selects on the projector's outputs (DivPrune, CDPruner) sets
``feature_space = "projected"`` (a class attribute, or per instance from an option): every
adapter then projects all patches first, hands the method the projected tokens (and the
tower features they came from, in ``VisionInputs.tower_features``), and sends the tokens it
returns to the LLM without projecting them again.

Every registered method is picked up by the registry-parametrised tests. An outside package
adds a method through the entry-point group ``prumerge.methods`` (``prumerge.registry``); it
then reaches every command, the trainer, the server and the plugin like a built-in.
"""

from prumerge.methods import builtin as _builtin  # noqa: F401  (registers the built-ins)
from prumerge.methods import cdpruner as _cdpruner  # noqa: F401
from prumerge.methods import dart as _dart  # noqa: F401
from prumerge.methods import hiprune as _hiprune  # noqa: F401
from prumerge.methods import pdrop as _pdrop  # noqa: F401
from prumerge.methods import sparsevlm as _sparsevlm  # noqa: F401
from prumerge.methods import vispruner as _vispruner  # noqa: F401
from prumerge.methods import zoo as _zoo  # noqa: F401  (registers the peer methods)
from prumerge.methods.base import (
    FEATURE_SPACES,
    IMPORTANCE_CHOICES,
    METHODS,
    WHERE_CHOICES,
    LanguageMethod,
    Method,
    TowerMerge,
    VisionInputs,
    VisionMethod,
    build_method,
    method_names,
    option_defaults,
    projects_first,
    register_method,
)
from prumerge.methods.spec import MethodSpec, make_method, parse_spec

__all__ = [
    "FEATURE_SPACES",
    "IMPORTANCE_CHOICES",
    "METHODS",
    "WHERE_CHOICES",
    "LanguageMethod",
    "Method",
    "MethodSpec",
    "TowerMerge",
    "VisionInputs",
    "VisionMethod",
    "build_method",
    "make_method",
    "method_names",
    "option_defaults",
    "parse_spec",
    "projects_first",
    "register_method",
]
