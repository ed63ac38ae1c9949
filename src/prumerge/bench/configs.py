"""The configurations ``prumerge bench`` times: ``none`` first, then each method at each budget."""

from __future__ import annotations

from typing import Any

from prumerge.errors import PrumergeError
from prumerge.methods.spec import (
    MethodSpec,
    budget_key,
    make_method,
    make_spec,
    parse_budget,
    parse_spec,
    split_spec,
)

ADAPTIVE = "adaptive"


def parse_configs(
    methods: str, keeps: str | None = None, options: dict[str, Any] | None = None
) -> list[MethodSpec]:
    """The configurations to time, ``none`` first.

    Args:
        methods: comma-separated method names, each optionally with its own budget
            (``pool@64``, ``prumerge@adaptive``).
        keeps: comma-separated budgets for the methods given without one: counts (64),
            ratios (0.25) or ``adaptive`` (the method's default: adaptive for prumerge and
            prumerge+, its default budget for the others; ``auto`` is a synonym). Default
            ``adaptive``. ``1`` (one token) and ``1.0`` (all of them) are different budgets.
        options: method options (text or values), given to every listed method that takes
            them.

    Raises:
        PrumergeError: unknown methods or options, bad budgets, nothing to compare.
    """
    from prumerge.methods import METHODS, method_names
    from prumerge.methods.base import option_defaults

    options = dict(options or {})
    if "keep" in options:
        raise PrumergeError("give budgets with --keep or METHOD@BUDGET, not as an option")
    budgets = [
        parse_budget(k, what="--keep", adaptive=True) for k in (keeps or ADAPTIVE).split(",")
    ]
    entries = [e.strip() for e in methods.split(",")]
    if not methods.strip() or any(not e for e in entries):
        raise PrumergeError(f"--methods must be comma-separated method names, got {methods!r}")

    wanted: list[tuple[str, str | None]] = []
    for entry in entries:
        name, budget_text = split_spec(entry)
        if name not in METHODS:
            raise PrumergeError(f"unknown method {name!r}; available: {', '.join(method_names())}")
        takes_keep = "keep" in option_defaults(METHODS[name])
        if budget_text is not None:
            if not takes_keep:
                raise PrumergeError(f"method {name!r} takes no budget, got {entry!r}")
            parse_budget(budget_text, what=f"--methods {entry}", adaptive=True)
            wanted.append((name, entry))
        elif takes_keep:
            wanted += [(name, b) for b in budgets]  # type: ignore[misc]
        else:
            wanted.append((name, None))

    listed = {name for name, _ in wanted if name != "none"}
    for key in options:
        if not any(key in option_defaults(METHODS[n]) for n in listed):
            raise PrumergeError(f"no method in --methods takes option {key!r}")

    configs = [MethodSpec("none")]
    seen: set[tuple[str, tuple[str, float]]] = set()
    for name, budget in wanted:
        if name == "none":
            continue
        defaults = option_defaults(METHODS[name])
        chosen = {k: v for k, v in options.items() if k in defaults}
        if isinstance(budget, str):  # METHOD@BUDGET
            spec = parse_spec(budget, chosen, what=f"--methods {budget}", check=False)
        else:
            spec = make_spec(name, chosen, check=False).with_budget(budget)
        if (name, budget_key(spec.budget)) in seen:
            continue
        seen.add((name, budget_key(spec.budget)))
        make_method(name, spec.options)  # bad values fail here, before the model loads
        configs.append(spec)
    return configs
