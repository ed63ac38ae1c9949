"""Scores, tables and the accuracy-vs-tokens plot of a results directory."""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prumerge.atomic import write_bytes_atomic, write_text_atomic
from prumerge.errors import PrumergeError
from prumerge.eval.datasets import Benchmark
from prumerge.eval.metrics import METRIC_DESCRIPTIONS, score_records
from prumerge.eval.results import CONFIG, format_budget, read_predictions
from prumerge.methods.base import METHODS
from prumerge.methods.spec import MethodSpec

__all__ = ["ConfigResult", "Summary", "plot_summary", "summarize"]

logger = logging.getLogger(__name__)


@dataclass
class ConfigResult:
    """Scores and costs of one configuration.

    Attributes:
        name: Configuration (directory) name.
        method: Reduction method.
        budget: Its budget, or None.
        model_id: Model.
        benchmark: Benchmark name.
        metric: Metric name.
        score: Headline score (see the metric's description), or None without references.
        relative: ``score`` as a percentage of the ``none`` configuration's, or None.
        scores: All metric outputs (per subtask, per split, ...).
        tokens_in: Mean visual tokens before reduction.
        tokens_out: Mean visual tokens the language model received (LLM-side methods: from
            their last pruning stage on).
        n: Records scored.
        n_expected: Samples in the benchmark.
        predict_seconds: Total time spent in ``predict`` over all runs and ranks.
        equivalent_tokens: Mean visual tokens averaged over the LLM's layers (the
            "equivalent tokens" LLM-side papers report; ``tokens_out`` for vision-side
            methods), or None where records of an LLM-side method lack them (results written
            before the records had the field).
    """

    name: str
    method: str
    budget: int | float | None
    model_id: str
    benchmark: str
    metric: str
    score: float | None
    relative: float | None
    scores: dict[str, float]
    tokens_in: float
    tokens_out: float
    n: int
    n_expected: int
    predict_seconds: float
    equivalent_tokens: float | None = None

    @property
    def complete(self) -> bool:
        return self.n == self.n_expected


@dataclass
class Summary:
    """Results of all configurations in one output directory.

    Attributes:
        benchmark: Benchmark name.
        metric: Metric name.
        results: One per configuration, in the summary's order.
        wall_seconds: Seconds the ``evaluate`` call that made this summary spent on each
            configuration (building its predictor and predicting); empty for a summary read
            from disk alone. Not written to ``summary.json``: it is of one run, not the results.
    """

    benchmark: str
    metric: str
    results: list[ConfigResult]
    wall_seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict, configurations keyed by name."""
        return {
            "benchmark": self.benchmark,
            "metric": self.metric,
            "metric_description": METRIC_DESCRIPTIONS.get(self.metric, self.metric),
            "configs": {r.name: asdict(r) | {"complete": r.complete} for r in self.results},
        }

    def table(self) -> str:
        """A plain-text table, one row per configuration, in the summary's order."""
        details = _detail_keys(self.results)
        header = ["config", "method", "budget", "score", "vs none", "tok in", "tok out"]
        header += ["tok eq", "n"]
        header += details + ["time s", "s/sample"]
        rows = [header]
        for r in self.results:
            per_sample = r.predict_seconds / r.n if r.n else float("nan")
            rows.append(
                [
                    r.name,
                    r.method,
                    format_budget(r.budget, takes_budget=MethodSpec(r.method).takes_budget),
                    _fmt(r.score),
                    "-" if r.relative is None else f"{r.relative:.1f}%",
                    f"{r.tokens_in:.1f}",
                    f"{r.tokens_out:.1f}",
                    "-" if r.equivalent_tokens is None else f"{r.equivalent_tokens:.1f}",
                    f"{r.n}" if r.complete else f"{r.n}/{r.n_expected}",
                ]
                + [_fmt(r.scores.get(key)) for key in details]
                + [f"{r.predict_seconds:.1f}", f"{per_sample:.3f}"]
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [
            "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
            for row in rows
        ]
        description = METRIC_DESCRIPTIONS.get(self.metric, self.metric)
        lines.insert(0, f"{self.benchmark}: score = {description}")
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{value:.2f}")
    )


def _detail_keys(results: Sequence[ConfigResult]) -> list[str]:
    keys: dict[str, None] = {}
    for r in results:
        for key in r.scores:
            if key.endswith(("/score", "/f1")) or key in ("perception", "cognition"):
                keys[key] = None
    return sorted(keys)


def _result_for(directory: Path, sample_ids: set[str] | None = None) -> ConfigResult | None:
    config_path = directory / CONFIG
    if not config_path.exists():
        return None
    try:
        payload = json.loads(config_path.read_text(encoding="utf-8"))
        identity = payload["identity"]
    except json.JSONDecodeError as exc:
        raise PrumergeError(
            f"{config_path} is damaged (line {exc.lineno}: {exc.msg}); delete {directory} or "
            "run with --overwrite"
        ) from None
    except (ValueError, KeyError, TypeError, OSError):
        raise PrumergeError(
            f"{config_path} is unreadable; delete {directory} or run with --overwrite"
        ) from None
    records = read_predictions(directory)
    if sample_ids is not None:
        foreign = [r for r in records if r["id"] not in sample_ids]
        if foreign:
            logger.warning(
                "%s: %d record(s) with ids that are not in the benchmark (e.g. %r) are not counted",
                directory,
                len(foreign),
                foreign[0]["id"],
            )
            records = [r for r in records if r["id"] in sample_ids]
    scores = score_records(identity["metric"], records)
    n = len(records)
    return ConfigResult(
        name=payload["name"],
        method=identity["method"],
        budget=identity["budget"],
        model_id=identity["model_id"],
        benchmark=identity["benchmark"],
        metric=identity["metric"],
        score=scores.get("score"),
        relative=None,
        scores=scores,
        tokens_in=sum(r["tokens_in"] for r in records) / n if n else float("nan"),
        tokens_out=sum(r["tokens_out"] for r in records) / n if n else float("nan"),
        n=n,
        n_expected=identity["n_samples"],
        predict_seconds=sum(float(r.get("time_s", 0.0)) for r in records),
        equivalent_tokens=_mean_equivalent(identity["method"], records),
    )


def _mean_equivalent(method: str, records: Sequence[dict[str, Any]]) -> float | None:
    """The mean of the records' ``equivalent_tokens``. A record written before the field
    existed stands for its ``tokens_out`` where the method acts on the vision side (the two
    are equal there); for an LLM-side method (or one no longer registered) the mean is
    unknown: None."""
    if not records:
        return float("nan")
    missing = [r for r in records if "equivalent_tokens" not in r]
    if missing:
        cls = METHODS.get(method)
        if cls is None or cls.side != "vision":
            return None
    total = sum(float(r.get("equivalent_tokens", r["tokens_out"])) for r in records)
    return total / len(records)


def summarize(
    out_dir: str | Path,
    names: Sequence[str] | None = None,
    *,
    write: bool = True,
    plot: bool = True,
    benchmark: Benchmark | None = None,
) -> Summary:
    """Score every configuration in ``out_dir`` and write the summary files.

    Args:
        out_dir: Results directory of one benchmark.
        names: Configurations to include, in this order; default: all, sorted by method, then
            by decreasing mean tokens.
        write: Write ``summary.txt``, ``summary.json`` and (with ``plot``)
            ``accuracy_vs_tokens.png``.
        plot: Draw the plot when writing.
        benchmark: The benchmark the results are of, if at hand: records of samples it does
            not hold are then left out (with a warning) instead of counted.

    Returns:
        The summary.

    Raises:
        PrumergeError: No configuration found, or configurations of different benchmarks.
    """
    out = Path(out_dir)
    directories = (
        [out / name for name in names]
        if names is not None
        else sorted(p for p in out.iterdir() if (p / CONFIG).exists())
        if out.is_dir()
        else []
    )
    sample_ids = None if benchmark is None else {s.id for s in benchmark.samples}
    results = [r for r in (_result_for(d, sample_ids) for d in directories) if r is not None]
    if not results:
        raise PrumergeError(f"no evaluation results in {out}")
    benchmarks = {(r.benchmark, r.metric) for r in results}
    if len(benchmarks) > 1:
        raise PrumergeError(f"{out} mixes results of several benchmarks: {sorted(benchmarks)}")
    if names is None:
        results.sort(key=lambda r: (r.method != "none", r.method, -_finite(r.tokens_out)))
    baseline = next((r for r in results if r.method == "none" and r.score is not None), None)
    if baseline is not None and baseline.score:
        for r in results:
            if r.score is not None:
                r.relative = 100.0 * r.score / baseline.score
    benchmark, metric = benchmarks.pop()
    summary = Summary(benchmark=benchmark, metric=metric, results=results)
    if write:
        write_text_atomic(out / "summary.txt", summary.table() + "\n")
        write_text_atomic(
            out / "summary.json", json.dumps(summary.to_dict(), indent=2, default=str) + "\n"
        )
        if plot:
            plot_summary(summary, out / "accuracy_vs_tokens.png")
    return summary


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -1.0


def plot_summary(summary: Summary, path: str | Path) -> Path:
    """Plot the headline score against mean visual tokens, one line per method.

    Uses matplotlib's object-oriented API with the Agg canvas, so no global backend is set.

    Args:
        summary: The summary to plot.
        path: PNG file to write.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.4), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    by_method: dict[str, list[ConfigResult]] = {}
    for r in summary.results:
        if r.score is not None and math.isfinite(r.tokens_out):
            by_method.setdefault(r.method, []).append(r)
    for method, results in sorted(by_method.items()):
        results = sorted(results, key=lambda r: r.tokens_out)
        xs = [r.tokens_out for r in results]
        ys = [float(r.score or 0.0) for r in results]  # None was filtered out above
        if method == "none":
            axes.axhline(ys[0], color="0.4", linestyle="--", linewidth=1, label="none (full)")
            axes.plot(xs, ys, "k*", markersize=10)
            continue
        axes.plot(xs, ys, "o-", label=method)
        for r in results:
            axes.annotate(
                r.name,
                (r.tokens_out, r.score),
                fontsize=7,
                alpha=0.7,
                textcoords="offset points",
                xytext=(3, 3),
            )
    axes.set_xlabel("mean visual tokens given to the language model")
    axes.set_ylabel(METRIC_DESCRIPTIONS.get(summary.metric, summary.metric))
    axes.set_title(summary.benchmark)
    axes.grid(True, alpha=0.3)
    if by_method:
        axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png")
    return write_bytes_atomic(path, buffer.getvalue())
