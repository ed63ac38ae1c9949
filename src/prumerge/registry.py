"""One registry helper, for methods, model families and LLM-side patches.

Every registry of names in prumerge is a ``Registry``. It gives each of them the same rules:

- an unknown name raises ``UnknownNameError`` (a ``PrumergeError``, so the CLI reports it as
  one line), with the registered names listed;
- registering a name twice raises ``DuplicateNameError``; nothing is ever overwritten;
- the built-ins are imported on first use (``builtins``: module names, imported by name, so
  that no module above imports the registry's owner back);
- outside packages add entries through an entry-point group (``group``): an entry point that
  names a module is imported (its decorators register what it holds); one that names an
  object is registered under the entry point's name.

The groups: ``prumerge.methods`` (reduction methods), ``prumerge.families`` (model families,
an adapter class whose ``family`` is the entry point's name) and ``prumerge.llm_patches``
(language-model patches of LLM-side methods). For example, in an outside package's
``pyproject.toml``::

    [project.entry-points."prumerge.methods"]
    mymethod = "mypackage.mymethod"          # a module that uses @register_method

This module imports nothing from prumerge but ``prumerge.errors``.
"""

from __future__ import annotations

import importlib
import types
import warnings
from collections.abc import Callable, Iterator, MutableMapping
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from prumerge.errors import PrumergeError

__all__ = ["DuplicateNameError", "Registry", "UnknownNameError"]

T = TypeVar("T")


class UnknownNameError(PrumergeError, KeyError, ValueError):
    """A name no registry entry has; the message lists the registered names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DuplicateNameError(ValueError):
    """A name registered twice."""


class Registry(MutableMapping[str, T], Generic[T]):
    """Named entries of one kind, in registration order.

    Args:
        kind: what an entry is, for messages (``"method"``, ``"family"``).
        group: the entry-point group outside packages register through; None: none.
        builtins: modules that register the built-in entries, imported on first use.
        on_add: called with ``(name, entry)`` when an entry is added (e.g. to name it).
    """

    def __init__(
        self,
        kind: str,
        *,
        group: str | None = None,
        builtins: tuple[str, ...] = (),
        on_add: Callable[[str, T], None] | None = None,
    ) -> None:
        self.kind = kind
        self.group = group
        self.builtins = builtins
        self._on_add = on_add
        self._entries: dict[str, T] = {}
        self._loaded = not builtins and group is None
        self._loading = False

    # -- registering -------------------------------------------------------------------------

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` as ``name``.

        Raises:
            DuplicateNameError: ``name`` is registered already.
        """
        if name in self._entries:
            raise DuplicateNameError(f"{self.kind} {name!r} is registered twice")
        if self._on_add is not None:
            self._on_add(name, entry)
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")`` adds what it decorates as ``name``."""

        def decorator(entry: T) -> T:
            return self.add(name, entry)

        return decorator

    def load(self) -> None:
        """Import the built-ins, then every entry point of ``group`` (once)."""
        if self._loaded or self._loading:
            return
        self._loading = True
        try:
            for module in self.builtins:
                importlib.import_module(module)
            if self.group is not None:
                for point in entry_points(group=self.group):
                    self._load_entry_point(point)
            self._loaded = True
        finally:
            self._loading = False

    def _load_entry_point(self, point: object) -> None:
        name = getattr(point, "name", "?")
        try:
            entry = point.load()  # type: ignore[attr-defined]
            if not isinstance(entry, types.ModuleType):
                self.add(name, entry)
        except DuplicateNameError as exc:
            warnings.warn(f"{self.group} entry point {name!r} ignored: {exc}", stacklevel=3)
        except Exception as exc:  # noqa: BLE001 - one broken package must not break the rest
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            warnings.warn(
                f"{self.group} entry point {name!r} could not be loaded: {first}", stacklevel=3
            )

    # -- looking up --------------------------------------------------------------------------

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        self.load()
        return list(self._entries)

    def unknown(self, name: str) -> UnknownNameError:
        """The error for ``name``, listing the registered names."""
        return UnknownNameError(
            f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self.names()))}"
        )

    def get_or_raise(self, name: str) -> T:
        """The entry ``name``.

        Raises:
            UnknownNameError: no entry has that name.
        """
        self.load()
        if name not in self._entries:
            raise self.unknown(name)
        return self._entries[name]

    def __getitem__(self, name: str) -> T:
        return self.get_or_raise(name)

    def __setitem__(self, name: str, entry: T) -> None:
        # A plain set, for tests that swap an entry and restore it (monkeypatch.setitem);
        # registering goes through ``add``, which refuses a duplicate.
        self._entries[name] = entry

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        self.load()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self.load()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)!r})"
