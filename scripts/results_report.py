"""Tables and plots for docs/results.md from `prumerge eval` runs of several models.

Each MODEL=DIR argument names a model and the `--out` directory of one `prumerge eval` run
(its summary.json). MODEL=DIR+DIR2+... joins several runs of one model: a configuration of a
later run replaces the one of the same name in an earlier run, and every "vs none" is computed
again against the joined `none`. A DIR may also be a summary.json file (for example one copied
under docs/results/), whose predictions are then not read. For every benchmark given, it prints a Markdown table per model (score,
retention against that model's `none`, per-subtask scores, mean visual tokens), for easy-vqa
also its yes/no answers per (plain/negated, true answer) cell. Where a run holds fixed budgets, it
first prints one table of every method by budget, the models side by side (score and
retention). It writes one
plot with a panel per model and a line per method (the adaptive count circled). No point
carries a text label, so labels never overlap; one legend names the lines.

Usage:
  python scripts/results_report.py --benchmark easy-vqa \
      default=results/easy-vqa-default base=results/easy-vqa-base \
      --plot docs/results/easy-vqa-accuracy_vs_tokens.png > /tmp/easy-vqa-tables.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(directory: Path) -> dict:
    path = directory if directory.suffix == ".json" else directory / "summary.json"
    if not path.is_file():
        sys.exit(f"results_report: {path} does not exist; run `prumerge eval --out {directory}`")
    return json.loads(path.read_text())


def join(directories: list[Path]) -> tuple[dict, dict[str, Path]]:
    """One summary from several runs of one model, and the directory each configuration's
    predictions are in. Later runs replace earlier configurations of the same name."""
    summary: dict = {}
    where: dict[str, Path] = {}
    for directory in directories:
        part = load(directory)
        if summary and part["benchmark"] != summary["benchmark"]:
            sys.exit(
                f"results_report: {directory} is {part['benchmark']}, not {summary['benchmark']}"
            )
        configs = {**summary.get("configs", {}), **part["configs"]}
        summary = {**part, "configs": configs}
        where.update({name: directory for name in part["configs"]})
    lead = {"none": 0, "prumerge": 1, "prumerge+": 2}  # then the others by name, as run
    order = sorted(
        summary["configs"].items(),
        key=lambda item: (
            lead.get(item[1]["method"], 3),
            "" if item[1]["method"] in lead else item[1]["method"],
        ),
    )
    summary["configs"] = dict(order)
    full = [c["score"] for c in summary["configs"].values() if c["method"] == "none"]
    if full and full[0]:
        for config in summary["configs"].values():
            if config.get("score") is not None:
                config["relative"] = 100 * config["score"] / full[0]
    return summary, where


def budget_label(config: dict) -> str:
    budget = config.get("budget")
    if budget is None:
        return "-" if config["method"] == "none" else "adaptive"
    return f"{budget:g}" if isinstance(budget, float) else str(budget)


def tokens(config: dict) -> float:
    """The x of a configuration: its equivalent tokens (image tokens averaged over the LLM's
    layers, which LLM-side methods are compared by), else the tokens out of the vision side."""
    equivalent = config.get("equivalent_tokens")
    return config["tokens_out"] if equivalent is None else equivalent


def subtasks(summary: dict) -> list[str]:
    keys = set()
    for config in summary["configs"].values():
        keys |= {k[: -len("/score")] for k in config["scores"] if k.endswith("/score")}
    return sorted(keys)


def table(name: str, summary: dict) -> str:
    columns = subtasks(summary)
    head = ["method", "budget", "tokens out", "tokens eq", "score", "vs none", "n", *columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for config in summary["configs"].values():
        if config.get("score") is None:
            continue
        row = [
            f"`{config['method']}`",
            budget_label(config),
            f"{config['tokens_out']:.1f}",
            f"{tokens(config):.1f}",
            f"{config['score']:.2f}",
            "-" if config.get("relative") is None else f"{config['relative']:.1f}%",
            str(config["n"]),
            *(f"{config['scores'].get(c + '/score', float('nan')):.1f}" for c in columns),
        ]
        if config["method"] == "none":
            row[2:5] = [f"**{row[2]}**", f"**{row[3]}**", f"**{row[4]}**"]
        lines.append("| " + " | ".join(row) + " |")
    return f"**{name}**\n\n" + "\n".join(lines) + "\n"


def budget_grid(summaries: dict[str, dict]) -> str:
    """Methods by budget, models side by side: ``score (retention)``; '' where not run."""
    budgets: list[str] = []
    methods: list[str] = []
    cells: dict[tuple[str, str, str], str] = {}
    for model, summary in summaries.items():
        for config in summary["configs"].values():
            if config.get("score") is None or config["method"] == "none":
                continue
            label = budget_label(config)
            if label not in budgets:
                budgets.append(label)
            if config["method"] not in methods:
                methods.append(config["method"])
            cells[(model, config["method"], label)] = f"{config['score']:.1f}" + (
                "" if config.get("relative") is None else f" ({config['relative']:.0f}%)"
            )
    order = sorted(budgets, key=lambda b: (b == "adaptive", float(b) if b != "adaptive" else 0))
    head = ["method"] + [f"{model} {b}" for model in summaries for b in order]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        row = [f"`{method}`"] + [
            cells.get((model, method, b), "") for model in summaries for b in order
        ]
        lines.append("| " + " | ".join(row) + " |")
    nones = ", ".join(
        f"{model} {c['score']:.2f}"
        for model, summary in summaries.items()
        for c in summary["configs"].values()
        if c["method"] == "none" and c.get("score") is not None
    )
    return "\n".join(lines) + f"\n\n`none` (all tokens): {nones}.\n"


def yes_no_cells(name: str, where: dict[str, Path], summary: dict) -> str:
    """easy-vqa's yes/no questions per (plain/negated, true answer) cell, per configuration:
    correct / total. A model that answers from the question's wording alone scores well on the
    two majority cells (plain "no", negated "yes") and badly on the others."""
    from prumerge.data.easy_vqa import is_negated
    from prumerge.eval.metrics import normalize_answer

    cells = [(f, a) for f in ("plain", "negated") for a in ("no", "yes")]
    head = ["config", "tokens out", *(f"{f} / {a}" for f, a in cells)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for config_name, config in summary["configs"].items():
        path = where[config_name] / config_name / "predictions.jsonl"
        if where[config_name].suffix == ".json" or not path.is_file():
            continue
        counts = {c: [0, 0] for c in cells}
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("subtask") != "yes/no":
                continue
            answer = row["answers"][0]
            cell = ("negated" if is_negated(row["meta"]["question"]) else "plain", answer)
            counts[cell][1] += 1
            counts[cell][0] += normalize_answer(row["prediction"]) == normalize_answer(answer)
        row_cells = [f"{c}/{n} ({100 * c / max(n, 1):.0f}%)" for c, n in counts.values()]
        lines.append(
            f"| `{config_name}` | {config['tokens_out']:.1f} | " + " | ".join(row_cells) + " |"
        )
    return f"**{name}: yes/no by cell**\n\n" + "\n".join(lines) + "\n"


def plot(summaries: dict[str, dict], benchmark: str, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    figure = Figure(figsize=(5.2 * len(summaries) + 1.8, 5.0), dpi=120)
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, len(summaries), sharey=True, squeeze=False)[0]
    methods = sorted(
        {c["method"] for s in summaries.values() for c in s["configs"].values()} - {"none"}
    )
    from matplotlib import colormaps

    palette = colormaps["tab20"].colors
    colours = {m: palette[(2 * i) % 20 + (2 * i) // 20 % 2] for i, m in enumerate(methods)}
    styles = {m: "-" if i < 10 else "--" for i, m in enumerate(methods)}
    ticks = [16, 32, 64, 128, 256]
    for axes, (model, summary) in zip(panels, summaries.items(), strict=True):
        configs = [c for c in summary["configs"].values() if c.get("score") is not None]
        for method in methods:
            points = sorted(
                (tokens(c), c["score"], c.get("budget") is None)
                for c in configs
                if c["method"] == method
            )
            if not points:
                continue
            xs, ys, adaptive = zip(*points, strict=True)
            axes.plot(xs, ys, styles[method], marker="o", markersize=4, color=colours[method],
                      linewidth=1.4)  # fmt: skip
            for x, y, a in points:
                if a:  # the adaptive (per-image) count: a larger open marker
                    axes.plot(x, y, "o", markersize=10, markerfacecolor="none",
                              markeredgecolor=colours[method], markeredgewidth=1.6)  # fmt: skip
        full = [c for c in configs if c["method"] == "none"]
        if full:
            axes.axhline(full[0]["score"], color="0.3", linestyle="--", linewidth=1)
        axes.set_xscale("log")
        axes.xaxis.set_major_locator(FixedLocator(ticks))
        axes.xaxis.set_major_formatter(ScalarFormatter())
        axes.xaxis.set_minor_locator(NullLocator())
        axes.set_xlim(14, 300)
        axes.set_title(f"{model} model")
        axes.set_xlabel("mean visual tokens per image, per LLM layer (log scale)")
        axes.grid(True, alpha=0.3)
    panels[0].set_ylabel("exact match (%)")
    handles = [
        Line2D([], [], color=colours[m], linestyle=styles[m], linewidth=2, label=m) for m in methods
    ]
    handles += [
        Line2D([], [], color="0.3", linestyle="--", label="none (all tokens)"),
        Line2D([], [], marker="o", markersize=9, markerfacecolor="none", color="0.3",
               linestyle="none", label="adaptive count"),
    ]  # fmt: skip
    figure.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    figure.suptitle(f"{benchmark}: accuracy against visual tokens")
    figure.tight_layout(rect=(0, 0, 1 - 1.6 / (5.2 * len(summaries) + 1.8), 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", required=True)
    parser.add_argument("runs", nargs="+", metavar="MODEL=DIR")
    parser.add_argument("--plot", type=Path, required=True)
    parser.add_argument(
        "--drop",
        action="append",
        default=[],
        metavar="MODEL:METHOD,...",
        help="leave these methods out of that model's tables and panel (for example figures "
        "measured with a former default); repeatable",
    )
    args = parser.parse_args()
    summaries, directories = {}, {}
    for item in args.runs:
        name, sep, directory = item.partition("=")
        if not sep:
            sys.exit(f"results_report: {item!r} is not MODEL=DIR")
        summaries[name], directories[name] = join([Path(d) for d in directory.split("+")])
    for item in args.drop:
        name, sep, methods = item.partition(":")
        if not sep or name not in summaries:
            sys.exit(f"results_report: --drop {item!r} is not MODEL:METHOD,... of a given model")
        dropped = set(methods.split(","))
        configs = summaries[name]["configs"]
        summaries[name]["configs"] = {
            k: c for k, c in configs.items() if c["method"] not in dropped
        }
    if any(
        isinstance(c.get("budget"), (int, float))
        for summary in summaries.values()
        for c in summary["configs"].values()
    ):
        print(budget_grid(summaries))
    for name, summary in summaries.items():
        print(table(name, summary))
        if args.benchmark == "easy-vqa":
            print(yes_no_cells(name, directories[name], summary))
    plot(summaries, args.benchmark, args.plot)
    print(f"![{args.benchmark}: accuracy against visual tokens]({args.plot.name})")


if __name__ == "__main__":
    main()
