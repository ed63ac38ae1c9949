"""Reading benchmark files: every error names the file, and the line where there is one."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from prumerge.errors import PrumergeError
from prumerge.eval.benchmarks.base import missing_data


def resolve_file(root: Path, path: str | Path, what: str, benchmark: str) -> Path:
    resolved = Path(path).expanduser()
    if not resolved.is_absolute():
        resolved = root / resolved
    if not resolved.exists():
        raise missing_data(benchmark, f"{what} {resolved} not found")
    return resolved


def read_jsonl(path: Path, benchmark: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, object)`` for each non-blank line of a JSON-lines file.

    Raises:
        PrumergeError: If a line is not a JSON object; the message names file and line.
    """
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PrumergeError(
                    f"{benchmark}: {path} line {number}: not valid JSON ({exc.msg})"
                ) from None
            if not isinstance(item, dict):
                raise PrumergeError(f"{benchmark}: {path} line {number}: expected a JSON object")
            yield number, item


def read_json(path: Path, benchmark: str) -> Any:
    """Read a JSON file.

    Raises:
        PrumergeError: If it is not valid JSON; the message names file, line and column.
    """
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise PrumergeError(
            f"{benchmark}: {path} line {exc.lineno} column {exc.colno}: not valid JSON ({exc.msg})"
        ) from None


def get_field(item: Mapping[str, Any], key: str, where: str, benchmark: str) -> Any:
    if key not in item:
        raise PrumergeError(f"{benchmark}: {where}: missing field {key!r}")
    return item[key]


def find_image_dir(root: Path, image_dir: str, benchmark: str, check: bool) -> Path:
    images = Path(image_dir).expanduser()
    images = images if images.is_absolute() else root / images
    if check and not images.is_dir():
        raise missing_data(benchmark, f"image directory {images} not found")
    return images


class ImageChecker:
    """Checks that referenced images exist, stat-ing each distinct file once."""

    def __init__(self, benchmark: str, enabled: bool) -> None:
        self.benchmark = benchmark
        self.enabled = enabled
        self.seen: set[Path] = set()

    def __call__(self, path: Path, where: str) -> Path:
        if self.enabled and path not in self.seen:
            if not path.is_file():
                raise missing_data(self.benchmark, f"{where}: image {path} not found")
            self.seen.add(path)
        return path


def with_instruction(text: str, instruction: str) -> str:
    """Append LLaVA's answer instruction unless the text already ends with it."""
    return text if text.rstrip().endswith(instruction.strip()) else text + instruction


def str_field(item: Mapping[str, Any], key: str, where: str, benchmark: str) -> str:
    value = get_field(item, key, where, benchmark)
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise PrumergeError(f"{benchmark}: {where}: field {key!r} should be a string")
    return str(value)


def answer_strings(item: Mapping[str, Any], where: str, benchmark: str) -> tuple[str, ...]:
    answers = get_field(item, "answers", where, benchmark)
    if not isinstance(answers, list):
        raise PrumergeError(f"{benchmark}: {where}: 'answers' should be a list")
    out = []
    for answer in answers:
        # VQAv2 stores {"answer": ..., "answer_id": ...}; TextVQA stores plain strings.
        text = answer.get("answer") if isinstance(answer, dict) else answer
        if not isinstance(text, str):
            raise PrumergeError(f"{benchmark}: {where}: malformed answer {answer!r}")
        out.append(text)
    return tuple(out)
