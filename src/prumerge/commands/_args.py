"""Argument checks shared by the command modules: one-line errors for bad values."""

from __future__ import annotations

from prumerge.errors import PrumergeError


def int_arg(value: str, flag: str, minimum: int) -> int:
    """An integer option value of at least ``minimum``, or a ``PrumergeError`` naming ``flag``."""
    try:
        number = int(str(value).strip())
    except ValueError:
        raise PrumergeError(f"{flag} must be an integer, got {value!r}") from None
    if number < minimum:
        raise PrumergeError(f"{flag} must be at least {minimum}, got {number}")
    return number
