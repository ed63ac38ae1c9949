"""Benchmarks by name: what samples they yield and which metric scores them.

A benchmark is a loader registered with :func:`register_benchmark`. :func:`load_benchmark`
calls it and returns a :class:`Benchmark`: the samples, the metric name (a key of
:data:`prumerge.eval.metrics.METRICS`) and the options it was loaded with, which the runner
fingerprints so that results of different data are never mixed.

The built-in loaders live in :mod:`prumerge.eval.benchmarks`, one a file. Those for external
data read the files that LLaVA's evaluation uses, from a directory the user points at
(``root``); each loader's docstring gives the layout it expects, and every path can be
overridden by an option. Bad input raises :class:`~prumerge.errors.PrumergeError` naming the
file and, for line-oriented files, the line.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

from prumerge.data.sample import Sample
from prumerge.errors import PrumergeError
from prumerge.eval.benchmarks import (  # noqa: F401 - importing a loader registers it
    generated,
    mme,
    pope,
    scienceqa,
    textvqa,
    vqav2,
)
from prumerge.eval.benchmarks.base import (
    BENCHMARKS,
    DATA_SOURCES,
    Benchmark,
    BenchmarkSpec,
    ImageFile,
    missing_data,
    register_benchmark,
)
from prumerge.eval.benchmarks.scienceqa import scienceqa_prompt
from prumerge.eval.benchmarks.textvqa import textvqa_question

__all__ = [
    "BENCHMARKS",
    "DATA_SOURCES",
    "Benchmark",
    "BenchmarkSpec",
    "ImageFile",
    "Sample",
    "available_benchmarks",
    "get_benchmark",
    "load_benchmark",
    "register_benchmark",
    "scienceqa_prompt",
    "textvqa_question",
]


def available_benchmarks() -> list[str]:
    """Names of the registered benchmarks, sorted."""
    return sorted(BENCHMARKS)


def get_benchmark(name: str) -> BenchmarkSpec:
    """Look up a registered benchmark.

    Raises:
        PrumergeError: If no benchmark has that name.
    """
    try:
        return BENCHMARKS[name]
    except KeyError:
        known = ", ".join(available_benchmarks())
        raise PrumergeError(f"unknown benchmark {name!r}; known benchmarks: {known}") from None


def load_benchmark(
    name: str, root: str | Path | None = None, *, limit: int | None = None, **options: Any
) -> Benchmark:
    """Load a benchmark's samples.

    Args:
        name: Registry name (see :func:`available_benchmarks`).
        root: Data directory, for benchmarks that read files.
        limit: Keep only the first ``limit`` samples (in the loader's order).
        **options: Loader options (see each loader's docstring).

    Returns:
        The loaded benchmark.

    Raises:
        PrumergeError: Unknown name, missing ``root``, or bad data (with file and line).
    """
    spec = get_benchmark(name)
    if spec.needs_root and root is None:
        raise PrumergeError(f"benchmark {name!r} needs a data directory (root)")
    root_path = Path(root).expanduser() if root is not None else None
    if root_path is not None and not root_path.is_dir():
        raise missing_data(name, f"data directory {root_path} does not exist")
    if limit is not None and limit < 0:
        raise PrumergeError(f"limit must be non-negative, got {limit}")
    try:
        samples = list(itertools.islice(spec.loader(root_path, **options), limit))
    except TypeError as exc:
        # An unexpected keyword from the user is an input problem, not a bug.
        if "unexpected keyword" in str(exc):
            raise PrumergeError(f"{name}: {exc}") from None
        raise
    seen: set[str] = set()
    for sample in samples:
        if sample.id in seen:
            raise PrumergeError(f"{name}: duplicate sample id {sample.id!r}")
        seen.add(sample.id)
    samples = [
        dataclasses.replace(s, image=ImageFile(Path(s.image)))
        if isinstance(s.image, (str, Path))
        else s
        for s in samples
    ]
    recorded = {
        key: (str(value) if isinstance(value, Path) else value) for key, value in options.items()
    }
    recorded.update(root=str(root_path) if root_path else None, limit=limit)
    return Benchmark(name=name, metric=spec.metric, samples=samples, options=recorded)
