"""Registry of visual-token reduction methods, by name.

A method turns the vision encoder's selected-layer patch features (plus, if it asks for
them, the [CLS] attention and the keys of the layer that consumes those features) into a
``Reduction``. Adapters know models; methods know only tensors.

Add a method with::

    @register_method("name")
    class MyMethod(VisionMethod):
        '''One-line summary. Cite the paper.'''
        needs_attention = True

        def __init__(self, keep: int | float = 0.25): ...
        def reduce(self, inputs: VisionInputs) -> Reduction: ...

Every registered method is picked up by the registry-parametrised tests.
"""

from prumerge.methods import builtin as _builtin  # noqa: F401  (registers the built-ins)
from prumerge.methods import zoo as _zoo  # noqa: F401  (registers the peer methods)
from prumerge.methods.base import (
    METHODS,
    VisionInputs,
    VisionMethod,
    build_method,
    method_names,
    option_defaults,
    register_method,
)

__all__ = [
    "METHODS",
    "VisionInputs",
    "VisionMethod",
    "build_method",
    "method_names",
    "option_defaults",
    "register_method",
]
