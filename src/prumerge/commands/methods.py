"""`prumerge methods`: list the registered reduction methods and their options."""

from __future__ import annotations

import argparse
import inspect
import json


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("methods", help="list the token-reduction methods and their options")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)


def describe() -> list[dict]:
    from prumerge.methods import METHODS
    from prumerge.methods.base import option_defaults

    rows = []
    for name in sorted(METHODS):
        cls = METHODS[name]
        options = option_defaults(cls)
        doc = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
        rows.append(
            {
                "name": name,
                "summary": doc,
                "needs_attention": cls.needs_attention,
                "budget": cls().describe_budget(),
                "options": options,
            }
        )
    return rows


def run(args: argparse.Namespace) -> int:
    rows = describe()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for row in rows:
        print(f"{row['name']}: {row['summary']}")
        print(f"    budget: {row['budget']}")
        if row["options"]:
            opts = ", ".join(f"{k}={v!r}" for k, v in row["options"].items())
            print(f"    options: {opts}")
    return 0
