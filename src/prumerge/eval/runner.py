"""A resumable, data-parallel evaluation runner that knows nothing about models.

The runner takes a loaded :class:`~prumerge.eval.datasets.Benchmark` and, per configuration
(a reduction method at a token budget), a :class:`Predictor`: anything with a
``predict(samples)`` method that returns, per sample, the generated text and the number of
visual tokens before and after reduction.

On disk, ``out_dir/<config name>/`` holds

- ``config.json``: what produced the results (benchmark, its options and sample ids, model
  id, method, budget, method options) and a hash of it. A directory written by a different
  configuration is refused unless ``overwrite=True``.
- ``predictions.jsonl``: one record per sample, written and flushed line by line. A run that
  is killed at any moment and started again skips the samples already recorded (a torn last
  line is cut off), so no prediction is lost or duplicated. Blank lines are skipped; a line
  that does not parse is set aside in ``predictions.jsonl.rejected`` (with a warning) and its
  sample runs again, so the good lines around it are kept.
- ``predictions.rank<r>-of-<w>.jsonl`` while a data-parallel run is under way: with
  ``torch.distributed`` initialised (``torchrun``, ``accelerate launch``), rank r takes samples
  r, r+w, r+2w, ... and writes its own shard; after a barrier rank 0 merges the shards into
  ``predictions.jsonl`` in benchmark order and removes them.

:func:`summarize` (in :mod:`prumerge.eval.summary`) scores the records with the benchmark's metric and writes
``summary.txt`` (a table), ``summary.json`` and ``accuracy_vs_tokens.png`` into ``out_dir``.

One run at a time per ``out_dir``: :class:`ResultsLock` (a file lock, ``out_dir/.lock``) is
held by :func:`run_config` and :func:`evaluate` (and by ``prumerge eval`` from before its
model loads), so a second run on the same directory is refused instead of writing every
prediction a second time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from prumerge.atomic import write_text_atomic
from prumerge.errors import PrumergeError
from prumerge.eval.datasets import Benchmark, Sample
from prumerge.eval.results import (
    CONFIG,
    PREDICTIONS,
    ResultsLock,
    _read_jsonl_records,
    _shard_files,
    check_results_directory,
    format_budget,
    read_predictions,
)
from prumerge.eval.summary import ConfigResult, Summary, plot_summary, summarize

__all__ = [
    "ConfigResult",
    "EvalConfig",
    "Prediction",
    "Predictor",
    "ResultsLock",
    "Summary",
    "check_directory",
    "check_results_directory",
    "evaluate",
    "format_budget",
    "plot_summary",
    "read_predictions",
    "run_config",
    "summarize",
]

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Prediction:
    """What a predictor returns for one sample.

    Attributes:
        text: The generated answer.
        tokens_in: Visual tokens before reduction (e.g. 576 for LLaVA-1.5).
        tokens_out: Visual tokens the language model actually received (LLM-side methods:
            from their last pruning stage on).
        extra: JSON-serialisable extras to keep in the record (e.g. timings).
        equivalent_tokens: ``tokens_out`` averaged over the LLM's layers (the "equivalent
            tokens" of LLM-side methods), or None where the predictor does not know it.
    """

    text: str
    tokens_in: int
    tokens_out: int
    extra: Mapping[str, Any] = field(default_factory=dict)
    equivalent_tokens: float | None = None


@runtime_checkable
class Predictor(Protocol):
    """Generates answers for a batch of samples.

    ``predict`` gets samples in benchmark order and returns one :class:`Prediction` (or a
    ``(text, tokens_in, tokens_out)`` tuple) per sample, in the same order. It should be
    deterministic (greedy decoding) for a resumed or data-parallel run to equal a single
    uninterrupted one.
    """

    def predict(self, samples: Sequence[Sample]) -> Sequence[Prediction | tuple[str, int, int]]:
        """Answer each sample; see the class docstring."""
        ...


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


def _prepare_directory(
    directory: Path,
    identity: dict[str, Any],
    config: EvalConfig,
    overwrite: bool,
    data_root: str | None,
) -> None:
    """Create or check ``directory``; run on one process only."""
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
        "data_root": data_root,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_text_atomic(config_path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# Prediction files
# ---------------------------------------------------------------------------------------------


def _record(sample: Sample, prediction: Prediction, seconds: float) -> dict[str, Any]:
    return {
        "id": sample.id,
        "task": sample.task,
        "subtask": sample.subtask,
        "prompt": sample.prompt,
        "prediction": prediction.text,
        "answers": list(sample.answers),
        "tokens_in": prediction.tokens_in,
        "tokens_out": prediction.tokens_out,
        **(
            {"equivalent_tokens": round(float(prediction.equivalent_tokens), 4)}
            if prediction.equivalent_tokens is not None
            else {}
        ),
        "time_s": round(seconds, 6),
        "meta": dict(sample.meta),
        **({"extra": dict(prediction.extra)} if prediction.extra else {}),
    }


def _as_prediction(value: Any, sample: Sample) -> Prediction:
    if isinstance(value, Prediction):
        prediction = value
    else:
        try:
            text, tokens_in, tokens_out = value
        except (TypeError, ValueError):
            raise PrumergeError(
                f"predictor returned {value!r} for sample {sample.id!r}; expected a Prediction "
                "or a (text, tokens_in, tokens_out) tuple"
            ) from None
        prediction = Prediction(text, tokens_in, tokens_out)
    if not isinstance(prediction.text, str):
        raise PrumergeError(f"predictor returned non-text {prediction.text!r} for {sample.id!r}")
    return Prediction(
        prediction.text,
        int(prediction.tokens_in),
        int(prediction.tokens_out),
        prediction.extra,
        prediction.equivalent_tokens,
    )


def _merge(directory: Path, order: Sequence[str]) -> None:
    """Rewrite ``predictions.jsonl`` from itself and the shards, in benchmark order."""
    position = {sample_id: i for i, sample_id in enumerate(order)}
    records = sorted(
        read_predictions(directory), key=lambda r: position.get(r["id"], len(position))
    )
    tmp = directory / (PREDICTIONS + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, default=str) + "\n")
    os.replace(tmp, directory / PREDICTIONS)
    for shard in _shard_files(directory):
        shard.unlink()


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def _distributed() -> tuple[Any, int, int]:
    """``(torch.distributed or None, rank, world size)``."""
    try:
        import torch.distributed as dist
    except ImportError:
        return None, 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1


def _broadcast_error(dist: Any, error: str | None) -> str | None:
    if dist is None:
        return error
    box = [error]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _batches(items: Sequence[Sample], size: int) -> Iterable[Sequence[Sample]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_config(
    benchmark: Benchmark,
    config: EvalConfig,
    predictor: Predictor,
    out_dir: str | Path,
    *,
    batch_size: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Run one configuration over a benchmark, resuming where an earlier run stopped.

    With ``torch.distributed`` initialised, every rank must call this with the same
    arguments; each predicts its share and rank 0 merges. All ranks return after the merge.
    If the predictor raises on one rank, the others wait at the barrier until the launcher
    tears the group down; what every rank had written is kept for the next run.

    Args:
        benchmark: The loaded benchmark.
        config: The configuration; its ``name`` is the subdirectory.
        predictor: Answers batches of samples.
        out_dir: Results directory (one per benchmark).
        batch_size: Samples per ``predict`` call.
        overwrite: Replace results of a different configuration instead of refusing.
        progress: Show a progress bar (on rank 0).

    Returns:
        The configuration directory.

    Raises:
        PrumergeError: Another run holds ``out_dir``, the directory holds another
            configuration's results, or the predictor's output is malformed.
    """
    if batch_size < 1:
        raise PrumergeError(f"batch_size must be at least 1, got {batch_size}")
    dist, rank, world = _distributed()
    directory = Path(out_dir) / config.name
    identity = _identity(benchmark, config)

    lock = ResultsLock(out_dir) if rank == 0 else None
    error = None
    if lock is not None:
        try:
            lock.acquire()
        except PrumergeError as exc:
            lock, error = None, str(exc)
    try:
        if rank == 0 and error is None:
            try:
                _prepare_directory(
                    directory, identity, config, overwrite, benchmark.options.get("root")
                )
            except PrumergeError as exc:
                error = str(exc)
        error = _broadcast_error(dist, error)
        if error is not None:
            raise PrumergeError(error)
        _run_locked(benchmark, predictor, directory, dist, rank, world, batch_size, progress)
    finally:
        if lock is not None:
            lock.release()
    return directory


def share_error(error: str | None) -> str | None:
    """Rank 0's error (or None) on every rank of an initialised process group; else ``error``."""
    dist, _, _ = _distributed()
    return _broadcast_error(dist, error)


def _run_locked(
    benchmark: Benchmark,
    predictor: Predictor,
    directory: Path,
    dist: Any,
    rank: int,
    world: int,
    batch_size: int,
    progress: bool,
) -> None:
    config_name = directory.name

    # Which samples are done: every rank reads every file (without repairing others' files),
    # so a run resumed with another world size, or after an unmerged parallel run, neither
    # repeats nor loses anything.
    own_file = (
        directory / PREDICTIONS
        if dist is None
        else directory / f"predictions.rank{rank}-of-{world}.jsonl"
    )
    _read_jsonl_records(own_file, repair=True)  # cut a torn last line off our own file
    if dist is not None:
        dist.barrier()  # no one reads a file while its owner repairs it
    done = {record["id"] for record in read_predictions(directory)}
    mine = benchmark.samples[rank::world]
    todo = [sample for sample in mine if sample.id not in done]

    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(
            total=len(mine),
            initial=len(mine) - len(todo),
            desc=f"{benchmark.name}/{config_name}",
            unit="sample",
            dynamic_ncols=True,
        )
    try:
        with own_file.open("a", encoding="utf-8") as handle:
            for batch in _batches(todo, batch_size):
                start = time.perf_counter()
                outputs = list(predictor.predict(batch))
                seconds = (time.perf_counter() - start) / len(batch)
                if len(outputs) != len(batch):
                    raise PrumergeError(
                        f"predictor returned {len(outputs)} predictions for {len(batch)} samples"
                    )
                for sample, output in zip(batch, outputs, strict=True):
                    record = _record(sample, _as_prediction(output, sample), seconds)
                    handle.write(json.dumps(record, default=str) + "\n")
                    handle.flush()
                if bar is not None:
                    bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()

    if dist is not None:
        dist.barrier()
        if rank == 0:
            _merge(directory, [sample.id for sample in benchmark.samples])
        dist.barrier()
    elif _shard_files(directory):
        # Shards left by an interrupted parallel run: fold them in now.
        _merge(directory, [sample.id for sample in benchmark.samples])


def evaluate(
    benchmark: Benchmark,
    configs: Sequence[tuple[EvalConfig, Predictor | Callable[[], Predictor]]],
    out_dir: str | Path,
    *,
    batch_size: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> Summary | None:
    """Run several configurations over one benchmark, then summarise them.

    Args:
        benchmark: The loaded benchmark.
        configs: ``(config, predictor)`` pairs. A predictor may be given as a zero-argument
            factory, called only when its configuration runs (so one model is loaded at a
            time); it is released (and its ``close()`` called, if it has one) before the next
            one is built.
        out_dir: Results directory for this benchmark.
        batch_size: Samples per ``predict`` call.
        overwrite: Replace results of different configurations instead of refusing.
        progress: Show progress bars.

    Returns:
        The summary on rank 0 (or without ``torch.distributed``); None on other ranks.
    """
    names = [config.name for config, _ in configs]
    if len(set(names)) != len(names):
        raise PrumergeError(f"configuration names must be unique, got {names}")
    dist, rank, _ = _distributed()
    lock = ResultsLock(out_dir) if rank == 0 else None
    error = None
    if lock is not None:
        try:
            lock.acquire()
        except PrumergeError as exc:
            lock, error = None, str(exc)
    error = _broadcast_error(dist, error)
    if error is not None:
        raise PrumergeError(error)
    try:
        return _evaluate_locked(
            benchmark, configs, names, out_dir, batch_size, overwrite, progress, rank
        )
    finally:
        if lock is not None:
            lock.release()


def _evaluate_locked(
    benchmark: Benchmark,
    configs: Sequence[tuple[EvalConfig, Predictor | Callable[[], Predictor]]],
    names: list[str],
    out_dir: str | Path,
    batch_size: int,
    overwrite: bool,
    progress: bool,
    rank: int,
) -> Summary | None:
    for config, predictor in configs:
        owned = not isinstance(predictor, Predictor)
        built = predictor() if owned else predictor  # type: ignore[operator]
        try:
            run_config(
                benchmark,
                config,
                built,
                out_dir,
                batch_size=batch_size,
                overwrite=overwrite,
                progress=progress,
            )
        finally:
            # A predictor built here is ours to release: one that patched a model (such as
            # ModelPredictor) must undo it before the next configuration patches it again.
            close = getattr(built, "close", None)
            if owned and callable(close):
                close()
        del built
    if rank != 0:
        return None
    return summarize(out_dir, names, benchmark=benchmark)
