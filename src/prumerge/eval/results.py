"""The results directory on disk: its lock, and reading prediction files.

Shared by :mod:`prumerge.eval.runner` (which writes results) and :mod:`prumerge.eval.summary`
(which scores them); see the runner's docstring for the layout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prumerge.errors import PrumergeError
from prumerge.methods.spec import format_budget

__all__ = [
    "CONFIG",
    "PREDICTIONS",
    "ResultsLock",
    "check_results_directory",
    "format_budget",
    "is_prediction_record",
    "merge_shards",
    "read_predictions",
]

PREDICTIONS = "predictions.jsonl"
CONFIG = "config.json"
LOCK = ".lock"
REJECTED_SUFFIX = ".rejected"
_SHARD_PATTERN = re.compile(r"predictions\.rank(\d+)-of-(\d+)\.jsonl")

logger = logging.getLogger(__name__)


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


# ---------------------------------------------------------------------------------------------
# Prediction files
# ---------------------------------------------------------------------------------------------


def _shard_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _SHARD_PATTERN.fullmatch(p.name))


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_mean_count(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def is_prediction_record(record: Any) -> bool:
    """Whether a parsed line has every field scoring reads, each of the right type.

    A record that parses but lacks one (only an ``id``, ``"prediction": null``, a count
    written as text) counts as damaged, like a line that does not parse.
    """
    if not isinstance(record, dict) or not isinstance(record.get("id"), str):
        return False
    answers = record.get("answers")
    time_s = record.get("time_s", 0.0)
    return (
        isinstance(record.get("prediction"), str)
        and isinstance(answers, list)
        and all(isinstance(answer, str) for answer in answers)
        and _is_count(record.get("tokens_in"))
        and _is_count(record.get("tokens_out"))
        and _is_mean_count(record.get("equivalent_tokens", 0.0))
        and isinstance(time_s, (int, float))
        and not isinstance(time_s, bool)
        and isinstance(record.get("meta", {}), dict)
        and (record.get("subtask") is None or isinstance(record["subtask"], str))
    )


def _read_jsonl_records(path: Path, repair: bool) -> list[dict[str, Any]]:
    """Read a predictions file, keeping every good record.

    A killed writer can leave only a prefix of its last record, without the newline: that
    torn tail is ignored. Blank lines are skipped. A line that does not parse as a record, or
    parses without a field scoring needs (a torn write followed by more writes, a disk error,
    an edit; see ``is_prediction_record``) is ignored with a warning naming its line,
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
            if not is_prediction_record(record):
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


def merge_shards(directory: Path, order: Sequence[str]) -> None:
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
