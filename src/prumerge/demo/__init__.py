"""``prumerge demo``: a local web page that compares reduction methods on the user's image.

``prumerge.demo.compare`` holds the logic and needs no browser or Gradio;
``prumerge.demo.app`` is the Gradio page over it.
"""

from prumerge.demo.compare import (
    Comparison,
    DemoModel,
    MethodResult,
    captions,
    choose_configs,
    compare,
    table,
)

__all__ = [
    "Comparison",
    "DemoModel",
    "MethodResult",
    "captions",
    "choose_configs",
    "compare",
    "table",
]
