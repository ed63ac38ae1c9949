"""Loss per step of a `prumerge train` run or recipe, as one plot (and a summary).

Each argument is a training output directory (holding metrics.jsonl) or a recipe directory
(whose sub-directories are its stages, in the recipe's order). The plot has one panel per
stage: every step's loss as faint points coloured by the reduction drawn for that step, and a
moving average per reduction as a line. The printed summary gives, per stage and reduction,
the steps, the mean loss of the first and the last 50 steps, and the mean seconds per step.

Usage:
  python scripts/training_curves.py runs/recipe --plot docs/images/training-loss.png [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

WINDOW = 25  # steps in the moving average
EDGE = 50  # steps in the first/last means of the summary


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a killed run
        if "loss" in row:
            rows.append(row)
    return rows


def stages(directories: list[Path]) -> list[tuple[str, list[dict]]]:
    found = []
    for directory in directories:
        if (directory / "metrics.jsonl").is_file():
            found.append((directory.name, read_metrics(directory / "metrics.jsonl")))
            continue
        order = []
        recipe = directory / "recipe.json"
        if recipe.is_file():
            order = [s["name"] for s in json.loads(recipe.read_text()).get("stages", [])]
        subs = sorted(p for p in directory.iterdir() if (p / "metrics.jsonl").is_file())
        subs.sort(key=lambda p: order.index(p.name) if p.name in order else len(order))
        if not subs:
            sys.exit(f"training_curves: no metrics.jsonl in {directory} or its sub-directories")
        found += [(p.name, read_metrics(p / "metrics.jsonl")) for p in subs]
    return found


def summarize(rows: list[dict]) -> dict:
    out = {}
    for kind in sorted({r["reduce"] for r in rows}):
        mine = [r for r in rows if r["reduce"] == kind]
        losses = [r["loss"] for r in mine]
        out[kind] = {
            "steps": len(mine),
            "first_loss": round(sum(losses[:EDGE]) / len(losses[:EDGE]), 4),
            "last_loss": round(sum(losses[-EDGE:]) / len(losses[-EDGE:]), 4),
            "s_per_step": round(sum(r["step_s"] for r in mine) / len(mine), 2),
        }
    return out


def moving_average(xs: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, x in enumerate(xs):
        total += x
        if i >= window:
            total -= xs[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(found: list[tuple[str, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(found), figsize=(6 * len(found), 4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    kinds = sorted({r["reduce"] for _, rows in found for r in rows})
    for ax, (name, rows) in zip(axes[0], found, strict=True):
        for i, kind in enumerate(kinds):
            mine = [r for r in rows if r["reduce"] == kind]
            if not mine:
                continue
            steps = [r["step"] for r in mine]
            losses = [r["loss"] for r in mine]
            colour = colours[i % len(colours)]
            ax.scatter(steps, losses, s=4, alpha=0.25, color=colour)
            ax.plot(steps, moving_average(losses, WINDOW), color=colour, label=kind)
        ax.set_yscale("log")
        ax.set_title(f"stage {name}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (answer tokens)")
        ax.grid(alpha=0.3)
        ax.legend(title=f"reduction ({WINDOW}-step mean)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="training or recipe directories")
    parser.add_argument("--plot", type=Path, help="write the plot here (PNG)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args()
    for directory in args.runs:
        if not directory.is_dir():
            sys.exit(f"training_curves: {directory} is not a directory")
    found = stages(args.runs)
    summary = {name: summarize(rows) for name, rows in found if rows}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print("| stage | reduction | steps | loss, first 50 | loss, last 50 | s/step |")
        print("|---|---|---|---|---|---|")
        for name, kinds in summary.items():
            for kind, s in kinds.items():
                print(
                    f"| {name} | `{kind}` | {s['steps']} | {s['first_loss']:.3f} "
                    f"| {s['last_loss']:.3f} | {s['s_per_step']:.1f} |"
                )
    if args.plot:
        plot([(n, r) for n, r in found if r], args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
