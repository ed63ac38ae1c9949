"""Quiet by default: third-party progress bars, log lines and FutureWarnings stay hidden.

`prumerge ask` should print its answer and figures, not transformers' "Loading weights" bar,
its advice lines or a library's FutureWarning. The CLI runs each command inside
``quiet_libraries(verbose=args.verbose)``; ``--verbose`` shows them all again. prumerge's own
progress (the eval and training bars, its log lines) is not touched.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

__all__ = ["first_build", "hide_gguf_bar", "is_verbose", "quiet_libraries"]

_verbose: ContextVar[bool] = ContextVar("prumerge_verbose", default=True)
_first_build: ContextVar[bool] = ContextVar("prumerge_first_build", default=False)


def is_verbose() -> bool:
    """Whether third-party output is shown (outside the CLI, in a user's own script, it is)."""
    return _verbose.get()


@contextlib.contextmanager
def quiet_libraries(verbose: bool = False) -> Iterator[None]:
    """Hide transformers' progress bars and its messages below errors, and FutureWarnings
    raised outside prumerge, for the duration; everything is restored afterwards."""
    token = _verbose.set(verbose)
    if verbose:
        try:
            yield
        finally:
            _verbose.reset(token)
        return
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"(?!prumerge)")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        _verbose.reset(token)


@contextlib.contextmanager
def first_build() -> Iterator[None]:
    """Mark the default model's first build into its cache: long work that keeps its bar."""
    token = _first_build.set(True)
    try:
        yield
    finally:
        _first_build.reset(token)


@contextlib.contextmanager
def hide_gguf_bar() -> Iterator[None]:
    """Hide transformers' "Converting and de-quantizing GGUF tensors" bar unless verbose or
    inside the default model's first build (a minute of work, once, that should show itself).

    That loader draws its bar with tqdm directly, past transformers' own switch, so the
    bar function of that one module is replaced for the duration.
    """
    if is_verbose() or _first_build.get():
        yield
        return
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # no gguf support installed: nothing to hide
        yield
        return
    original = gguf_utils.tqdm

    def silent(*args: Any, **kwargs: Any) -> Any:
        return original(*args, **{**kwargs, "disable": True})

    gguf_utils.tqdm = silent
    try:
        yield
    finally:
        gguf_utils.tqdm = original
