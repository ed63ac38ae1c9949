"""A resumable, data-parallel evaluation runner that knows nothing about models.

The runner takes a loaded :class:`~prumerge.eval.datasets.Benchmark` and, per configuration
(an :class:`~prumerge.eval.identity.EvalConfig`: a reduction method at a token budget), a
:class:`Predictor`: anything with a ``predict(samples)`` method that returns, per sample, the
generated text and the number of visual tokens before and after reduction.

On disk, ``out_dir/<config name>/`` holds

- ``config.json``: what produced the results (benchmark, its options and sample ids, model
  id, method, budget, method options) and a hash of it (:mod:`prumerge.eval.identity`). A
  directory written by a different configuration is refused unless ``overwrite=True``.
- ``predictions.jsonl``: one record per sample, written and flushed line by line. A run that
  is killed at any moment and started again skips the samples already recorded (a torn last
  line is cut off), so no prediction is lost or duplicated. Blank lines are skipped; a line
  that does not parse is set aside in ``predictions.jsonl.rejected`` (with a warning) and its
  sample runs again, so the good lines around it are kept.
- ``predictions.rank<r>-of-<w>.jsonl`` while a data-parallel run is under way: with
  ``torch.distributed`` initialised (``torchrun``, ``accelerate launch``), rank r takes samples
  r, r+w, r+2w, ... and writes its own shard; after a barrier rank 0 merges the shards into
  ``predictions.jsonl`` in benchmark order and removes them.

:func:`summarize` (in :mod:`prumerge.eval.summary`) scores the records with the benchmark's
metric and writes ``summary.txt`` (a table), ``summary.json`` and ``accuracy_vs_tokens.png``
into ``out_dir``.

One run at a time per ``out_dir``: :class:`ResultsLock` (a file lock, ``out_dir/.lock``) is
held through :func:`hold_results` by :func:`run_config` and :func:`evaluate` (and by
``prumerge eval`` from before its model loads), so a second run on the same directory is
refused instead of writing every prediction a second time.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from prumerge.errors import PrumergeError
from prumerge.eval.datasets import Benchmark, Sample
from prumerge.eval.identity import EvalConfig, check_directory, prepare_directory
from prumerge.eval.results import (
    PREDICTIONS,
    ResultsLock,
    _read_jsonl_records,
    _shard_files,
    check_results_directory,
    format_budget,
    merge_shards,
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
    "hold_results",
    "plot_summary",
    "read_predictions",
    "run_config",
    "summarize",
]


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


def _raise_on_every_rank(dist: Any, error: str | None) -> None:
    """Raise rank 0's error (if it has one) on every rank."""
    error = _broadcast_error(dist, error)
    if error is not None:
        raise PrumergeError(error)


@contextlib.contextmanager
def hold_results(out_dir: str | Path) -> Iterator[None]:
    """Hold ``out_dir``'s :class:`ResultsLock` for the block, on rank 0 of a process group.

    Re-entrant in one process, so a caller may hold it across several :func:`run_config`
    calls (and a model load) while each call takes it again.

    Raises:
        PrumergeError: On every rank, when another process holds the directory.
    """
    dist, rank, _ = _distributed()
    lock = ResultsLock(out_dir) if rank == 0 else None
    error = None
    if lock is not None:
        try:
            lock.acquire()
        except PrumergeError as exc:
            lock, error = None, str(exc)
    _raise_on_every_rank(dist, error)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


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
    with hold_results(out_dir):
        error = None
        if rank == 0:
            try:
                prepare_directory(benchmark, config, out_dir, overwrite=overwrite)
            except PrumergeError as exc:
                error = str(exc)
        _raise_on_every_rank(dist, error)
        directory = Path(out_dir) / config.name
        _run_locked(benchmark, predictor, directory, dist, rank, world, batch_size, progress)
    return directory


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
            merge_shards(directory, [sample.id for sample in benchmark.samples])
        dist.barrier()
    elif _shard_files(directory):
        # Shards left by an interrupted parallel run: fold them in now.
        merge_shards(directory, [sample.id for sample in benchmark.samples])


def evaluate(
    benchmark: Benchmark,
    configs: Sequence[tuple[EvalConfig, Predictor | Callable[[], Predictor]]],
    out_dir: str | Path,
    *,
    batch_size: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    plot: bool = True,
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
        plot: Draw ``accuracy_vs_tokens.png`` beside the summary files.

    Returns:
        The summary on rank 0 (or without ``torch.distributed``), with the seconds this call
        spent on each configuration (building its predictor and predicting) in
        ``wall_seconds``; None on other ranks.
    """
    names = [config.name for config, _ in configs]
    if len(set(names)) != len(names):
        raise PrumergeError(f"configuration names must be unique, got {names}")
    _, rank, _ = _distributed()
    wall: dict[str, float] = {}
    with hold_results(out_dir):
        for config, predictor in configs:
            start = time.perf_counter()
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
                # A predictor built here is ours to release: one that patched a model (such
                # as ModelPredictor) must undo it before the next configuration patches it.
                close = getattr(built, "close", None)
                if owned and callable(close):
                    close()
            del built
            wall[config.name] = time.perf_counter() - start
        if rank != 0:
            return None
        summary = summarize(out_dir, names, plot=plot, benchmark=benchmark)
    summary.wall_seconds = wall
    return summary
