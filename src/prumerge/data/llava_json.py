"""LLaVA's instruction-tuning JSON: a list of ``{"image": ..., "conversations": [...]}``.

Each record names an image file (relative to an image folder) and holds alternating turns
``{"from": "human" | "gpt", "value": ...}``; the first human turn carries ``<image>``, which
marks where the image goes (LLaVA puts it before or after the text; we keep the text and put
the image first, as the model's chat template does). Records without an image are skipped:
training with reduction in the loop needs one image per conversation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prumerge.errors import PrumergeError

__all__ = ["Conversation", "read_llava_json"]

IMAGE_MARK = "<image>"


@dataclass(frozen=True)
class Conversation:
    """One training conversation about one image.

    Attributes:
        image: the image file.
        turns: (user text without ``<image>``, assistant answer) pairs.
    """

    image: Path
    turns: tuple[tuple[str, str], ...]


def read_llava_json(path: str | Path, image_folder: str | Path | None = None) -> list[Conversation]:
    """Read and check a LLaVA instruction file.

    Args:
        path: the JSON file (a list of records).
        image_folder: where ``image`` paths are resolved; default: the JSON file's folder.

    Raises:
        PrumergeError: naming the file and the record for unreadable JSON, missing fields,
            turns that do not alternate human/gpt, or missing image files.
    """
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except OSError as exc:
        raise PrumergeError(f"--data: cannot read {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PrumergeError(f"--data: {path} is not valid JSON: {exc}") from None
    if not isinstance(records, list):
        raise PrumergeError(f"--data: {path} must hold a JSON list of records")
    folder = Path(image_folder) if image_folder is not None else path.parent
    conversations = []
    for index, record in enumerate(records):
        where = f"{path}: record {index}"
        if not isinstance(record, dict) or "conversations" not in record:
            raise PrumergeError(f"--data: {where} has no 'conversations'")
        if "image" not in record:
            continue
        image = folder / str(record["image"])
        if not image.is_file():
            raise PrumergeError(f"--data: {where}: image file not found: {image}")
        turns = record["conversations"]
        if not isinstance(turns, list) or len(turns) < 2 or len(turns) % 2:
            raise PrumergeError(f"--data: {where}: 'conversations' must hold human/gpt pairs")
        pairs = []
        for k in range(0, len(turns), 2):
            human, gpt = turns[k], turns[k + 1]
            if not (
                isinstance(human, dict)
                and isinstance(gpt, dict)
                and human.get("from") == "human"
                and gpt.get("from") == "gpt"
                and isinstance(human.get("value"), str)
                and isinstance(gpt.get("value"), str)
            ):
                raise PrumergeError(
                    f"--data: {where}: turn {k} and {k + 1} must be human then gpt, with text"
                )
            text = human["value"]
            if (IMAGE_MARK in text) != (k == 0):
                raise PrumergeError(
                    f"--data: {where}: {IMAGE_MARK} must appear in the first human turn only"
                )
            text = text.replace(IMAGE_MARK, "").strip()
            pairs.append((text, gpt["value"].strip()))
        conversations.append(Conversation(image=image, turns=tuple(pairs)))
    if not conversations:
        raise PrumergeError(f"--data: {path} holds no conversation with an image")
    return conversations
