"""Which configuration produced a results directory, and refusing another's.

``out_dir/<config name>/config.json`` records the identity of the configuration whose
predictions sit beside it: the benchmark (its options and a hash of its sample ids), the
model id, the method, its budget and options. :func:`check_directory` compares a
configuration with it without writing; :func:`prepare_directory` creates it, or replaces a
different configuration's results when asked to. The runner (:mod:`prumerge.eval.runner`)
does the predicting.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prumerge.atomic import write_text_atomic
from prumerge.errors import PrumergeError
from prumerge.eval.datasets import Benchmark
from prumerge.eval.results import CONFIG, PREDICTIONS, _shard_files

__all__ = ["FORMAT_VERSION", "EvalConfig", "check_directory", "prepare_directory"]

FORMAT_VERSION = 1


@dataclass(frozen=True)
class EvalConfig:
    """One configuration to evaluate: a reduction method at a budget, on a model.

    Attributes:
        method: Reduction method name; "none" marks the unreduced baseline that scores are
            reported relative to.
        budget: The method's token budget or ratio, or None for adaptive methods.
        model_id: Which model (a hub id, a path, or a name for the default model).
        options: Further method options (JSON-serialisable); they are part of the hash.
        name: Directory name under ``out_dir``; defaults to ``<method>`` or
            ``<method>-<budget>``.
    """

    method: str
    budget: int | float | None = None
    model_id: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            name = self.method if self.budget is None else f"{self.method}-{self.budget}"
            object.__setattr__(self, "name", name)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+=-]*", self.name):
            raise PrumergeError(
                f"configuration name {self.name!r} is not a safe directory name "
                "(letters, digits and . _ + = - only)"
            )


# ---------------------------------------------------------------------------------------------
# Configuration identity
# ---------------------------------------------------------------------------------------------


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _identity(benchmark: Benchmark, config: EvalConfig) -> dict[str, Any]:
    ids = hashlib.sha256("\n".join(s.id for s in benchmark.samples).encode()).hexdigest()
    return {
        "format": FORMAT_VERSION,
        "benchmark": benchmark.name,
        # The data directory is left out: the same data moved elsewhere may resume. The hash
        # of the sample ids still ties the results to the data.
        "benchmark_options": json.loads(
            _canonical({k: v for k, v in benchmark.options.items() if k != "root"})
        ),
        "metric": benchmark.metric,
        "n_samples": len(benchmark.samples),
        "sample_ids_sha256": ids,
        "model_id": config.model_id,
        "method": config.method,
        "budget": config.budget,
        "method_options": json.loads(_canonical(dict(config.options))),
    }


def _fingerprint(identity: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical(identity).encode()).hexdigest()[:16]


def _same_configuration(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether a recorded identity is this one. A method option added after the results
    were written (absent from the record) whose value is None, its "off" default, is the
    same configuration: the method computes what it computed before the option existed."""
    if old == new:
        return True
    added = dict(new.get("method_options", {}))
    recorded = old.get("method_options")
    if not isinstance(recorded, dict):
        return False
    for key in set(added) - set(recorded):
        if added[key] is not None:
            return False
        del added[key]
    return {**old, "method_options": recorded} == {**new, "method_options": added}


def _describe_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    parts = [f"{k}: {_canonical(old.get(k))} != {_canonical(new.get(k))}" for k in keys[:4]]
    return "; ".join(parts) or "unreadable config"


def _existing_identity(directory: Path) -> dict[str, Any] | None:
    """The identity recorded in ``directory``: None when it holds no results at all, ``{}``
    when it holds results without a config; ``_DamagedConfig`` when its config is damaged."""
    config_path = directory / CONFIG
    result_files = [directory / PREDICTIONS, *_shard_files(directory)]
    if not config_path.exists() and not any(path.exists() for path in result_files):
        return None
    if config_path.exists():
        return _read_identity(config_path)
    return {}


class _DamagedConfig(Exception):
    """``config.json`` exists but cannot be read as one: the message names the file and line."""


def _read_identity(config_path: Path) -> dict[str, Any]:
    recover = f"delete {config_path.parent} or run with --overwrite to start it again"
    try:
        payload = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise _DamagedConfig(
            f"{config_path} is damaged (line {exc.lineno}: {exc.msg}); {recover}"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _DamagedConfig(f"{config_path} cannot be read ({exc}); {recover}") from None
    identity = payload.get("identity") if isinstance(payload, dict) else None
    if not isinstance(identity, dict):
        raise _DamagedConfig(f"{config_path} is damaged (it has no identity); {recover}")
    return identity


def _mismatch_message(directory: Path, old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    return (
        f"{directory} holds results of a different configuration "
        f"({_describe_difference(old, new)}); use another output directory, or replace "
        "them with --overwrite (overwrite=True in Python)"
    )


def check_directory(benchmark: Benchmark, config: EvalConfig, out_dir: str | Path) -> bool:
    """Check, without writing anything, that ``run_config`` may use ``out_dir/<config.name>``.

    Lets a caller refuse a whole set of configurations before loading a model.

    Returns:
        True if the directory holds results of this very configuration (the run resumes),
        False if it holds none.

    Raises:
        PrumergeError: It holds results of a different configuration (``overwrite=True``
            would replace them).
    """
    directory = Path(out_dir) / config.name
    try:
        old = _existing_identity(directory)
    except _DamagedConfig as exc:
        raise PrumergeError(str(exc)) from None
    if old is None:
        return False
    identity = _identity(benchmark, config)
    if not _same_configuration(old, identity):
        raise PrumergeError(_mismatch_message(directory, old, identity))
    return True


def prepare_directory(
    benchmark: Benchmark, config: EvalConfig, out_dir: str | Path, *, overwrite: bool = False
) -> None:
    """Create ``out_dir/<config.name>`` with its ``config.json``, or check the one there.

    Run it on one process only (rank 0 of a process group).

    Raises:
        PrumergeError: It holds results of a different configuration, or a damaged
            ``config.json``, and ``overwrite`` is False (with it, they are replaced).
    """
    directory = Path(out_dir) / config.name
    identity = _identity(benchmark, config)
    config_path = directory / CONFIG
    try:
        old = _existing_identity(directory)
    except _DamagedConfig as exc:
        if not overwrite:
            raise PrumergeError(str(exc)) from None
        old = {}  # replaced below, like a different configuration's
    if old is not None:
        if _same_configuration(old, identity):
            return
        if not overwrite:
            raise PrumergeError(_mismatch_message(directory, old, identity))
        for path in [directory / PREDICTIONS, *_shard_files(directory)]:
            path.unlink(missing_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "name": config.name,
        "fingerprint": _fingerprint(identity),
        "identity": identity,
        "data_root": benchmark.options.get("root"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_text_atomic(config_path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
