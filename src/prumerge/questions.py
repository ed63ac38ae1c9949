"""Checking a question typed by a user, for every command and the demo."""

from __future__ import annotations

from prumerge.errors import PrumergeError

__all__ = ["check_question"]


def check_question(value: str, what: str = "the question") -> str:
    """The question, stripped: refused if empty, not UTF-8, or holding control characters.

    Python hands command-line bytes that are not UTF-8 to the program as lone surrogates,
    which no tokenizer takes; control characters (other than tab and newline) are never meant.
    """
    question = value.strip()
    if not question:
        raise PrumergeError(f"{what} is empty")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError:
        raise PrumergeError(
            f"{what} is not valid UTF-8 text; give it in UTF-8 (check the terminal's encoding)"
        ) from None
    control = next(
        (c for c in question if (ord(c) < 32 and c not in "\t\n\r") or 127 <= ord(c) < 160),
        None,
    )
    if control is not None:
        raise PrumergeError(f"{what} holds the control character U+{ord(control):04X}")
    return question
