"""Default-model tests; the real model itself is the suite-wide `default_model` fixture."""

from __future__ import annotations

from tests.default_model import requires_default_weights

__all__ = ["requires_default_weights"]
