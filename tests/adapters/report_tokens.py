"""Tokens in and out per image on every family's tiny test configuration.

    python -m tests.adapters.report_tokens [--json]

Builds each family's tiny random model (``families.CASES``, no downloads), runs one batch of
three images of different sizes through ``generate`` with each method, and prints the
visual tokens per image before and after reduction. Random weights: the counts show what
each family's layout and budget rules do, not what a trained model would keep.
"""

from __future__ import annotations

import argparse
import json

import torch

import prumerge

from .families import CASES, build_batch
from .test_families import ROWS, generate

METHODS = [
    ("prumerge", {}),
    ("prumerge+", {}),
    ("prumerge", {"importance": "mean"}),
    ("cls_topk", {"keep": 0.25}),
    ("visionzip", {"keep": 0.25, "budget_per": "view"}),
    ("fastv", {"keep": 0.25}),
]


def measure() -> list[dict]:
    rows = []
    for family, case in CASES.items():
        model = case.build("sdpa", 0)
        inputs = build_batch(case, model, ROWS)
        for method, options in METHODS:
            if method in case.refuses:  # a one-line error (test_refused_methods_...)
                continue
            options = dict(options)
            if (family.startswith("qwen") or family == "gemma3") and options.get("budget_per"):
                options.pop("budget_per")  # one view per image: the same thing
            with prumerge.apply(model, method, **options) as handle:
                generate(model, inputs, max_new_tokens=1)
                importance = getattr(handle.adapter, "importance", None) or getattr(
                    getattr(handle.adapter, "tower", None), "importance", None
                )
                rows.append(
                    {
                        "family": family,
                        "method": method,
                        "options": options,
                        "importance": importance,
                        "tokens_in": handle.stats.tokens_in,
                        "tokens_out": handle.stats.tokens_out,
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    rows = measure()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| family | method | options | importance | tokens in | tokens out |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
        print(
            f"| {r['family']} | {r['method']} | {opts} | {r['importance'] or '-'} | "
            f"{r['tokens_in']} | {r['tokens_out']} |"
        )


if __name__ == "__main__":
    main()
