"""One method spec: a method, its budget and its options, as every entry point gives them.

The commands (``--method``/``--methods METHOD@BUDGET``, ``--keep``, ``--option KEY=VALUE``),
the trainer's ``--reduce`` mixture, the server's ``prumerge`` config entry, the demo and the
lmms-eval plugin all turn what the user wrote into a ``MethodSpec`` here, with the same
parsing, typing and checks, and show budgets with the one ``format_budget``.

``make_method`` is the one dry-run check: it builds the method and runs it once on
``trial_inputs``, so that a value only a run can reject fails before any model loads.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from prumerge.errors import PrumergeError
from prumerge.methods.base import (
    METHODS,
    Method,
    VisionInputs,
    build_method,
    method_names,
    option_defaults,
)
from prumerge.ops.select import validate_keep

__all__ = [
    "ADAPTIVE_WORDS",
    "MethodSpec",
    "budget_key",
    "coerce_options",
    "coerce_value",
    "format_budget",
    "make_method",
    "make_spec",
    "parse_budget",
    "parse_options",
    "parse_spec",
    "split_spec",
    "trial_inputs",
    "value_kinds",
]

_INTEGER = re.compile(r"^[+-]?\d+$")

#: Words that mean "no budget: the method's own choice" (adaptive for prumerge/prumerge+).
ADAPTIVE_WORDS = ("adaptive", "auto")


# ---------------------------------------------------------------------------------------------
# Budgets
# ---------------------------------------------------------------------------------------------


def parse_budget(
    value: str | int | float | None, *, what: str = "keep", adaptive: bool = False
) -> int | float | None:
    """A token budget: ``64`` (a count), ``0.25`` (a ratio of the patch tokens), or, with
    ``adaptive=True``, ``adaptive``/``auto``/``none``/None (no budget: the method's own
    choice).

    Text is a count only when it is written as an integer, so ``1`` is one token and ``1.0``
    all of them. Numbers (from Python or lmms-eval's argument parser) keep their type. The
    value is checked by ``prumerge.ops.validate_keep``, the check ``build_method`` applies.

    Raises:
        PrumergeError: naming ``what``, for anything else.
    """
    if value is None or (
        isinstance(value, str) and value.strip().lower() in (*ADAPTIVE_WORDS, "none")
    ):
        if adaptive:
            return None
        raise PrumergeError(f"{what}: give a count (64) or a ratio (0.25), got {value!r}")
    number: int | float
    if isinstance(value, str):
        text = value.strip()
        try:
            number = int(text) if _INTEGER.match(text) else float(text)
        except ValueError:
            raise PrumergeError(f"{what}: not a number: {value!r}") from None
    else:
        number = value
    try:
        validate_keep(number)
    except ValueError as exc:
        raise PrumergeError(f"{what}: {exc}") from None
    return number


def format_budget(budget: int | float | None, *, takes_budget: bool = True) -> str:
    """How every report shows a budget: ``64``, ``0.25``, ``1.0`` (a ratio, never shown as
    ``1``); for None, ``adaptive`` (the method's own choice) or, for a method that takes no
    budget (``takes_budget=False``: ``none``, ``downsample``), ``-``."""
    if budget is None:
        return ADAPTIVE_WORDS[0] if takes_budget else "-"
    return str(budget) if isinstance(budget, int) else repr(float(budget))


def budget_key(budget: int | float | None) -> tuple[str, float]:
    """A key that tells a count from an equal ratio (``1`` from ``1.0``), for de-duplication."""
    return ("none", 0.0) if budget is None else (type(budget).__name__, float(budget))


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


def parse_options(pairs: list[str] | None) -> dict[str, str]:
    """``KEY=VALUE`` method options, values still text (``coerce_options`` types them)."""
    options: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise PrumergeError(f"method option {pair!r} is not KEY=VALUE")
        options[key.strip().replace("-", "_")] = raw.strip()
    return options


def value_kinds(annotation: Any, default: Any) -> set[str]:
    """The types a parameter takes, as names (``{"int", "float", "None"}``), read from its
    annotation (a string under postponed annotations) or, without one, from its default."""
    if annotation is not inspect.Parameter.empty and annotation is not None:
        text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
        text = text.replace("Optional[", "None|").replace(" ", "")
        return {part.strip("[]") for part in re.split(r"[|\[\],]", text) if part}
    if default is None:
        return {"None", "int", "float", "str"}
    return {type(default).__name__}


def coerce_value(raw: Any, kinds: set[str], what: str) -> Any:
    """An option value given as text (or a number), typed by the kinds its parameter takes.

    Strings stay strings (``merge=none`` is the mode "none"); ``none`` means Python None only
    where the parameter takes None (``keep``, ToMe's ``r``); where it takes an int or a float
    (a count or a ratio), text written as an integer is an int. Ranges and allowed words are
    the method constructor's to check.
    """
    text = str(raw).strip()
    lowered = text.lower()
    if "None" in kinds and lowered in ("none", ""):
        return None
    if "bool" in kinds:
        if isinstance(raw, bool) or lowered in ("true", "false", "1", "0", "yes", "no"):
            return raw if isinstance(raw, bool) else lowered in ("true", "1", "yes")
        if not kinds & {"int", "float", "str"}:
            raise PrumergeError(f"{what} takes true or false, got {text!r}")
    numeric = kinds & {"int", "float"}
    if numeric:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            number: int | float = raw
        elif _INTEGER.match(text):
            number = int(text)
        else:
            try:
                number = float(text)
            except ValueError:
                number = None  # type: ignore[assignment]
        if number is not None:
            if "float" not in numeric:
                if isinstance(number, float) and not number.is_integer():
                    raise PrumergeError(f"{what} takes an integer, got {text!r}")
                return int(number)
            return float(number) if "int" not in numeric else number
        if "str" not in kinds:
            word = "an integer" if numeric == {"int"} else "a number"
            raise PrumergeError(f"{what} takes {word}, got {text!r}")
    return text if isinstance(raw, str) else raw


def coerce_options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` for ``method``, typed by its constructor's signature (``coerce_value``).

    ``keep`` goes through ``parse_budget``. Names the method does not take pass through for
    ``build_method`` to judge.
    """
    parameters = (
        dict(inspect.signature(METHODS[method].__init__).parameters) if method in METHODS else {}
    )
    typed: dict[str, Any] = {}
    for key, value in options.items():
        if key == "keep":
            typed[key] = parse_budget(value, what=f"{method}: keep", adaptive=True)
        elif key in parameters and key != "self":
            parameter = parameters[key]
            default = None if parameter.default is inspect.Parameter.empty else parameter.default
            kinds = value_kinds(parameter.annotation, default)
            typed[key] = coerce_value(value, kinds, f"{method}: option {key}")
        else:
            typed[key] = value
    return typed


# ---------------------------------------------------------------------------------------------
# The dry-run check
# ---------------------------------------------------------------------------------------------


def trial_inputs(
    batch: int = 1, num_patches: int = 16, grid: tuple[int, int] | None = (4, 4), width: int = 8
) -> VisionInputs:
    """Random features, keys and importance for ``batch`` views of ``num_patches`` patches,
    the same for every call: what the dry-run check and the server's token count run on."""
    generator = torch.Generator().manual_seed(0)
    return VisionInputs(
        features=torch.randn(batch, num_patches, width, generator=generator),  # (B, N, C)
        keys=torch.randn(batch, num_patches, width, generator=generator),  # (B, N, Ck)
        cls_attn=torch.softmax(  # (B, N), peaked enough for outliers to exist
            torch.randn(batch, num_patches, generator=generator) * 3.0, dim=-1
        ),
        grid=grid,
        # A second layer's importance, for methods that read two (HiPrune's object layer).
        object_importance=torch.softmax(
            torch.randn(batch, num_patches, generator=generator) * 3.0, dim=-1
        ),
    )


def make_method(name: str, options: Mapping[str, Any] | None = None) -> Any:
    """Build a registered method from user-given options (text or numbers), checked.

    Options are typed by ``coerce_options`` and validated by the method's constructor. The
    method then runs once on ``trial_inputs`` (a separate instance), so that a value only a
    run can reject fails here, before any model loads, and not half-way through one.

    Raises:
        PrumergeError: one line, for an unknown method, option or value.
    """
    if name not in METHODS:
        raise PrumergeError(f"unknown method {name!r}; available: {', '.join(method_names())}")
    typed = coerce_options(name, options or {})
    try:
        method = build_method(name, **typed)
    except (ValueError, TypeError) as exc:
        raise _option_error(name, exc) from None
    if not getattr(method, "inside_llm", False):
        try:
            build_method(name, **typed).reduce(trial_inputs())
        except Exception as exc:  # noqa: BLE001 - any failure here is the options' doing
            raise _option_error(name, exc) from None
    return method


def _option_error(name: str, exc: Exception) -> PrumergeError:
    text = str(exc).strip()
    message = text.splitlines()[0] if text else type(exc).__name__
    return PrumergeError(message if name in message else f"{name}: {message}")


# ---------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    """A method, its budget and its options: one configuration of a reduction.

    Attributes:
        method: a registered method name (``prumerge.methods.method_names()``).
        options: the method's options, typed; ``keep`` is the budget (absent: the method's
            default budget).
    """

    method: str
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def budget(self) -> int | float | None:
        """The budget the method runs at: ``keep`` if given, else its default (None:
        adaptive, or a method without a budget)."""
        if "keep" in self.options:
            return self.options["keep"]
        cls = METHODS.get(self.method)
        return None if cls is None else option_defaults(cls).get("keep")

    @property
    def takes_budget(self) -> bool:
        cls = METHODS.get(self.method)
        return cls is not None and "keep" in option_defaults(cls)

    @property
    def label(self) -> str:
        """How reports name it: ``prumerge``, ``pool@64``, ``prumerge+@0.25``."""
        budget = self.budget
        return self.method if budget is None else f"{self.method}@{format_budget(budget)}"

    @property
    def extra_options(self) -> dict[str, Any]:
        """The options besides the budget."""
        return {k: v for k, v in self.options.items() if k != "keep"}

    def with_budget(self, budget: int | float | None) -> MethodSpec:
        """The same method and options at ``budget`` (None: the method's default)."""
        options = self.extra_options
        if budget is not None:
            options["keep"] = budget
        return MethodSpec(self.method, options)

    def build(self) -> Method:
        """A fresh instance of the method."""
        return build_method(self.method, **self.options)

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.options}


def split_spec(text: str) -> tuple[str, str | None]:
    """``"pool@64"`` -> ``("pool", "64")``; ``"pool"`` -> ``("pool", None)``."""
    name, at, budget = text.partition("@")
    return name.strip(), (budget.strip() if at else None)


def make_spec(
    name: str, options: Mapping[str, Any] | None = None, *, check: bool = True
) -> MethodSpec:
    """A ``MethodSpec`` from a method name and user-given options (text or values), typed
    and, with ``check``, built and dry-run by ``make_method``.

    Raises:
        PrumergeError: one line, for an unknown method, option or value.
    """
    if name not in METHODS:
        raise PrumergeError(f"unknown method {name!r}; available: {', '.join(method_names())}")
    typed = coerce_options(name, options or {})
    if check:
        make_method(name, typed)
    return MethodSpec(name, typed)


def parse_spec(
    text: str,
    options: Mapping[str, Any] | None = None,
    *,
    keep: str | int | float | None = None,
    what: str | None = None,
    check: bool = True,
) -> MethodSpec:
    """``METHOD[@BUDGET]`` with options, as a checked ``MethodSpec``.

    Args:
        text: a method name, optionally with its budget (``pool@64``, ``prumerge@adaptive``).
        options: method options (text or values); ``keep`` among them is the budget.
        keep: the budget, as ``--keep`` gives it (text or a number; None: not given).
        what: how errors name ``text`` (default ``text`` itself).
        check: build the method and dry-run it (``make_method``).

    Raises:
        PrumergeError: one line, for an unknown method, a budget on a method that takes
            none, a budget given twice, or a bad option or value.
    """
    name, budget_text = split_spec(text)
    if name not in METHODS:
        raise PrumergeError(f"unknown method {name!r}; available: {', '.join(method_names())}")
    given = dict(options or {})
    for budget in (budget_text, keep):
        if budget is None:
            continue
        if "keep" in given:
            raise PrumergeError("give the budget with --keep or --option keep=..., not both")
        if "keep" not in option_defaults(METHODS[name]):
            raise PrumergeError(f"method {name!r} takes no budget, got {text!r}")
        label = what or (text if budget is budget_text else "--keep")
        value = parse_budget(budget, what=label, adaptive=True)
        if value is not None:  # "adaptive": the method's own choice, its default
            given["keep"] = value
    return make_spec(name, given, check=check)
