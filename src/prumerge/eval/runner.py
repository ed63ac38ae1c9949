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

:func:`summarize` scores the records with the benchmark's metric and writes
``summary.txt`` (a table), ``summary.json`` and ``accuracy_vs_tokens.png`` into ``out_dir``.

One run at a time per ``out_dir``: :class:`ResultsLock` (a file lock, ``out_dir/.lock``) is
held by :func:`run_config` and :func:`evaluate` (and by ``prumerge eval`` from before its
model loads), so a second run on the same directory is refused instead of writing every
prediction a second time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from prumerge.errors import PrumergeError
from prumerge.eval.datasets import Benchmark, Sample
from prumerge.eval.metrics import METRIC_DESCRIPTIONS, score_records

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
    "read_predictions",
    "run_config",
    "summarize",
]

FORMAT_VERSION = 1
PREDICTIONS = "predictions.jsonl"
CONFIG = "config.json"
LOCK = ".lock"
REJECTED_SUFFIX = ".rejected"
_SHARD_PATTERN = re.compile(r"predictions\.rank(\d+)-of-(\d+)\.jsonl")

logger = logging.getLogger(__name__)


def format_budget(budget: int | float | None) -> str:
    """A budget as reports show it: ``64``, ``0.25``, ``1.0`` (a ratio is never shown as 1)."""
    if budget is None:
        return "-"
    return str(budget) if isinstance(budget, int) else repr(float(budget))


# ---------------------------------------------------------------------------------------------
# One run per results directory
# ---------------------------------------------------------------------------------------------


def check_results_directory(out_dir: str | Path) -> Path:
    """Check, without writing, that ``out_dir`` is or can become a writable folder.

    Raises:
        PrumergeError: It is a file, or it (or the nearest existing parent) is not writable.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise PrumergeError(f"results directory {out} is a file; give a folder")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise PrumergeError(f"cannot create results directory {out}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PrumergeError(f"cannot write results into {out}: {existing} is not writable")
    return out


class ResultsLock:
    """An exclusive, non-blocking lock on a results directory, re-entrant in one process.

    ``acquire`` creates the directory if need be and takes ``out_dir/.lock``; another process
    that holds it makes ``acquire`` raise at once. A directory this lock created is removed
    again on release if nothing but the lock file ended up in it.
    """

    _held: dict[Path, tuple[Any, int, bool]] = {}

    def __init__(self, out_dir: str | Path) -> None:
        self.out = Path(out_dir).expanduser().resolve()

    def acquire(self) -> None:
        from filelock import FileLock, Timeout

        if self.out in self._held:
            lock, count, created = self._held[self.out]
            self._held[self.out] = (lock, count + 1, created)
            return
        check_results_directory(self.out)
        created = not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(self.out / LOCK), timeout=0)
            lock.acquire()
        except Timeout:
            raise PrumergeError(
                f"{self.out} is in use by another evaluation run; wait for it to finish or "
                "give another results directory"
            ) from None
        except OSError as exc:
            raise PrumergeError(f"cannot lock results directory {self.out}: {exc}") from None
        self._held[self.out] = (lock, 1, created)

    def release(self) -> None:
        lock, count, created = self._held[self.out]
        if count > 1:
            self._held[self.out] = (lock, count - 1, created)
            return
        del self._held[self.out]
        lock.release()
        if created and [p.name for p in self.out.iterdir()] == [LOCK]:
            (self.out / LOCK).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # someone else wrote into it meanwhile
                self.out.rmdir()

    def __enter__(self) -> ResultsLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(frozen=True)
class Prediction:
    """What a predictor returns for one sample.

    Attributes:
        text: The generated answer.
        tokens_in: Visual tokens before reduction (e.g. 576 for LLaVA-1.5).
        tokens_out: Visual tokens the language model actually received.
        extra: JSON-serialisable extras to keep in the record (e.g. timings).
    """

    text: str
    tokens_in: int
    tokens_out: int
    extra: Mapping[str, Any] = field(default_factory=dict)


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


def _describe_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    parts = [f"{k}: {_canonical(old.get(k))} != {_canonical(new.get(k))}" for k in keys[:4]]
    return "; ".join(parts) or "unreadable config"


def _existing_identity(directory: Path) -> dict[str, Any] | None:
    """The identity recorded in ``directory``: None when it holds no results at all, ``{}``
    when it holds results without a readable config."""
    config_path = directory / CONFIG
    result_files = [directory / PREDICTIONS, *_shard_files(directory)]
    if not config_path.exists() and not any(path.exists() for path in result_files):
        return None
    if config_path.exists():
        try:
            identity = json.loads(config_path.read_text(encoding="utf-8")).get("identity", {})
        except (json.JSONDecodeError, AttributeError, OSError):
            return {}
        return identity if isinstance(identity, dict) else {}
    return {}


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
    old = _existing_identity(directory)
    if old is None:
        return False
    identity = _identity(benchmark, config)
    if old != identity:
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
    old = _existing_identity(directory)
    if old is not None:
        if old == identity:
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
    tmp = config_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, config_path)


# ---------------------------------------------------------------------------------------------
# Prediction files
# ---------------------------------------------------------------------------------------------


def _shard_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _SHARD_PATTERN.fullmatch(p.name))


def _read_jsonl_records(path: Path, repair: bool) -> list[dict[str, Any]]:
    """Read a predictions file, keeping every good record.

    A killed writer can leave only a prefix of its last record, without the newline: that
    torn tail is ignored. Blank lines are skipped. A line that does not parse as a record
    (a torn write followed by more writes, a disk error, an edit) is ignored with a warning,
    so its sample counts as not done. With ``repair`` (only a file's owner should repair),
    such lines and the torn tail are cut out of the file, and the unreadable lines are
    appended to ``<file>.rejected``.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    records: list[dict[str, Any]] = []
    good: list[bytes] = []
    bad: list[tuple[int, bytes]] = []
    position = 0
    number = 0
    changed = False
    while position < len(data):
        number += 1
        end = data.find(b"\n", position)
        if end == -1:
            changed = True  # torn: the last record never got its newline
            break
        line = data[position:end]
        position = end + 1
        if not line.strip():
            changed = True
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("id"), str):
                raise ValueError("not a prediction record")
        except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            bad.append((number, line))
            continue
        records.append(record)
        good.append(line)
    if bad:
        numbers = ", ".join(str(n) for n, _ in bad[:5]) + (", ..." if len(bad) > 5 else "")
        what = f"{path}: {len(bad)} unreadable line(s) (line {numbers})"
        if repair:
            rejected = path.with_name(path.name + REJECTED_SUFFIX)
            with rejected.open("ab") as handle:
                handle.write(b"".join(line + b"\n" for _, line in bad))
            logger.warning("%s set aside in %s; their samples run again", what, rejected)
        else:
            logger.warning("%s skipped", what)
    if repair and (bad or changed):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(b"".join(line + b"\n" for line in good))
        os.replace(tmp, path)
    return records


def read_predictions(directory: str | Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """All prediction records in a configuration directory, merged and shard files alike.

    Args:
        directory: ``out_dir/<config name>``.
        repair: Cut torn last lines off the files (only the process that owns them should).

    Returns:
        Records, each id once (the first occurrence wins), merged file first, then shards.
    """
    directory = Path(directory)
    seen: set[str] = set()
    out = []
    for path in [directory / PREDICTIONS, *_shard_files(directory)]:
        for record in _read_jsonl_records(path, repair=repair):
            if record["id"] not in seen:
                seen.add(record["id"])
                out.append(record)
    return out


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
        prediction.text, int(prediction.tokens_in), int(prediction.tokens_out), prediction.extra
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


# ---------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------


@dataclass
class ConfigResult:
    """Scores and costs of one configuration.

    Attributes:
        name: Configuration (directory) name.
        method: Reduction method.
        budget: Its budget, or None.
        model_id: Model.
        benchmark: Benchmark name.
        metric: Metric name.
        score: Headline score (see the metric's description), or None without references.
        relative: ``score`` as a percentage of the ``none`` configuration's, or None.
        scores: All metric outputs (per subtask, per split, ...).
        tokens_in: Mean visual tokens before reduction.
        tokens_out: Mean visual tokens the language model received.
        n: Records scored.
        n_expected: Samples in the benchmark.
        predict_seconds: Total time spent in ``predict`` over all runs and ranks.
    """

    name: str
    method: str
    budget: int | float | None
    model_id: str
    benchmark: str
    metric: str
    score: float | None
    relative: float | None
    scores: dict[str, float]
    tokens_in: float
    tokens_out: float
    n: int
    n_expected: int
    predict_seconds: float

    @property
    def complete(self) -> bool:
        return self.n == self.n_expected


@dataclass
class Summary:
    """Results of all configurations in one output directory."""

    benchmark: str
    metric: str
    results: list[ConfigResult]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict, configurations keyed by name."""
        return {
            "benchmark": self.benchmark,
            "metric": self.metric,
            "metric_description": METRIC_DESCRIPTIONS.get(self.metric, self.metric),
            "configs": {r.name: asdict(r) | {"complete": r.complete} for r in self.results},
        }

    def table(self) -> str:
        """A plain-text table, one row per configuration, in the summary's order."""
        details = _detail_keys(self.results)
        header = ["config", "method", "budget", "score", "vs none", "tok in", "tok out", "n"]
        header += details + ["time s", "s/sample"]
        rows = [header]
        for r in self.results:
            per_sample = r.predict_seconds / r.n if r.n else float("nan")
            rows.append(
                [
                    r.name,
                    r.method,
                    format_budget(r.budget),
                    _fmt(r.score),
                    "-" if r.relative is None else f"{r.relative:.1f}%",
                    f"{r.tokens_in:.1f}",
                    f"{r.tokens_out:.1f}",
                    f"{r.n}" if r.complete else f"{r.n}/{r.n_expected}",
                ]
                + [_fmt(r.scores.get(key)) for key in details]
                + [f"{r.predict_seconds:.1f}", f"{per_sample:.3f}"]
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [
            "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
            for row in rows
        ]
        description = METRIC_DESCRIPTIONS.get(self.metric, self.metric)
        lines.insert(0, f"{self.benchmark}: score = {description}")
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{value:.2f}")
    )


def _detail_keys(results: Sequence[ConfigResult]) -> list[str]:
    keys: dict[str, None] = {}
    for r in results:
        for key in r.scores:
            if key.endswith(("/score", "/f1")) or key in ("perception", "cognition"):
                keys[key] = None
    return sorted(keys)


def _result_for(directory: Path, sample_ids: set[str] | None = None) -> ConfigResult | None:
    config_path = directory / CONFIG
    if not config_path.exists():
        return None
    try:
        payload = json.loads(config_path.read_text(encoding="utf-8"))
        identity = payload["identity"]
    except (ValueError, KeyError, TypeError, OSError):
        raise PrumergeError(
            f"{config_path} is unreadable; delete {directory} or run with --overwrite"
        ) from None
    records = read_predictions(directory)
    if sample_ids is not None:
        foreign = [r for r in records if r["id"] not in sample_ids]
        if foreign:
            logger.warning(
                "%s: %d record(s) with ids that are not in the benchmark (e.g. %r) are not counted",
                directory,
                len(foreign),
                foreign[0]["id"],
            )
            records = [r for r in records if r["id"] in sample_ids]
    scores = score_records(identity["metric"], records)
    n = len(records)
    return ConfigResult(
        name=payload["name"],
        method=identity["method"],
        budget=identity["budget"],
        model_id=identity["model_id"],
        benchmark=identity["benchmark"],
        metric=identity["metric"],
        score=scores.get("score"),
        relative=None,
        scores=scores,
        tokens_in=sum(r["tokens_in"] for r in records) / n if n else float("nan"),
        tokens_out=sum(r["tokens_out"] for r in records) / n if n else float("nan"),
        n=n,
        n_expected=identity["n_samples"],
        predict_seconds=sum(float(r.get("time_s", 0.0)) for r in records),
    )


def summarize(
    out_dir: str | Path,
    names: Sequence[str] | None = None,
    *,
    write: bool = True,
    plot: bool = True,
    benchmark: Benchmark | None = None,
) -> Summary:
    """Score every configuration in ``out_dir`` and write the summary files.

    Args:
        out_dir: Results directory of one benchmark.
        names: Configurations to include, in this order; default: all, sorted by method, then
            by decreasing mean tokens.
        write: Write ``summary.txt``, ``summary.json`` and (with ``plot``)
            ``accuracy_vs_tokens.png``.
        plot: Draw the plot when writing.
        benchmark: The benchmark the results are of, if at hand: records of samples it does
            not hold are then left out (with a warning) instead of counted.

    Returns:
        The summary.

    Raises:
        PrumergeError: No configuration found, or configurations of different benchmarks.
    """
    out = Path(out_dir)
    directories = (
        [out / name for name in names]
        if names is not None
        else sorted(p for p in out.iterdir() if (p / CONFIG).exists())
        if out.is_dir()
        else []
    )
    sample_ids = None if benchmark is None else {s.id for s in benchmark.samples}
    results = [r for r in (_result_for(d, sample_ids) for d in directories) if r is not None]
    if not results:
        raise PrumergeError(f"no evaluation results in {out}")
    benchmarks = {(r.benchmark, r.metric) for r in results}
    if len(benchmarks) > 1:
        raise PrumergeError(f"{out} mixes results of several benchmarks: {sorted(benchmarks)}")
    if names is None:
        results.sort(key=lambda r: (r.method != "none", r.method, -_finite(r.tokens_out)))
    baseline = next((r for r in results if r.method == "none" and r.score is not None), None)
    if baseline is not None and baseline.score:
        for r in results:
            if r.score is not None:
                r.relative = 100.0 * r.score / baseline.score
    benchmark, metric = benchmarks.pop()
    summary = Summary(benchmark=benchmark, metric=metric, results=results)
    if write:
        (out / "summary.txt").write_text(summary.table() + "\n", encoding="utf-8")
        (out / "summary.json").write_text(
            json.dumps(summary.to_dict(), indent=2, default=str) + "\n", encoding="utf-8"
        )
        if plot:
            plot_summary(summary, out / "accuracy_vs_tokens.png")
    return summary


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -1.0


def plot_summary(summary: Summary, path: str | Path) -> Path:
    """Plot the headline score against mean visual tokens, one line per method.

    Uses matplotlib's object-oriented API with the Agg canvas, so no global backend is set.

    Args:
        summary: The summary to plot.
        path: PNG file to write.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.4), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    by_method: dict[str, list[ConfigResult]] = {}
    for r in summary.results:
        if r.score is not None and math.isfinite(r.tokens_out):
            by_method.setdefault(r.method, []).append(r)
    for method, results in sorted(by_method.items()):
        results = sorted(results, key=lambda r: r.tokens_out)
        xs = [r.tokens_out for r in results]
        ys = [float(r.score or 0.0) for r in results]  # None was filtered out above
        if method == "none":
            axes.axhline(ys[0], color="0.4", linestyle="--", linewidth=1, label="none (full)")
            axes.plot(xs, ys, "k*", markersize=10)
            continue
        axes.plot(xs, ys, "o-", label=method)
        for r in results:
            axes.annotate(
                r.name,
                (r.tokens_out, r.score),
                fontsize=7,
                alpha=0.7,
                textcoords="offset points",
                xytext=(3, 3),
            )
    axes.set_xlabel("mean visual tokens given to the language model")
    axes.set_ylabel(METRIC_DESCRIPTIONS.get(summary.metric, summary.metric))
    axes.set_title(summary.benchmark)
    axes.grid(True, alpha=0.3)
    if by_method:
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


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
