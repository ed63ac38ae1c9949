"""`prumerge eval`: score reduction methods at token budgets on a benchmark, resumably."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prumerge.commands._args import (
    add_model_placement_args,
    check_model_placement,
    load_args_model,
)
from prumerge.errors import PrumergeError

if TYPE_CHECKING:
    from prumerge.methods.spec import MethodSpec

ADAPTIVE = "adaptive"

DESCRIPTION = """\
Evaluate visual-token reduction methods on a benchmark and print one row per method and
budget: the score (per task and subtask), the score relative to the unreduced baseline
(`none`), the mean visual tokens before and after reduction, and the time spent.

Which configurations run (methods x budgets):
  * `none` runs once, unreduced, whatever --keep says.
  * Every other method runs once per --keep entry. A number is a budget: a count of
    tokens (64) or a ratio of the patch tokens (0.25). The word `adaptive` means no budget;
    it applies only to methods that choose their own count per image (prumerge, prumerge+:
    IQR outliers of the [CLS] attention) and is skipped for fixed-budget methods.
  * The default --keep is `adaptive`; a fixed-budget method left with no budget is an error.
  So `--methods none,prumerge,visionzip --keep adaptive,0.25` runs none, prumerge
  (adaptive), prumerge-0.25 and visionzip-0.25.

Results go to OUT/<config>/predictions.jsonl, one line per answered sample as soon as it is
answered. Run the same command again after an interruption and it resumes where it stopped;
a directory holding another configuration's results is refused unless --overwrite. The
table is also written to OUT/summary.txt and OUT/summary.json, the accuracy-vs-tokens plot
to OUT/accuracy_vs_tokens.png.

Data parallel: `torchrun --nproc-per-node N -m prumerge.cli eval ...` (gloo on CPU, NCCL on
GPUs) splits the samples across processes; the merged results equal a single-process run's.
"""

EPILOG = """\
examples:
  prumerge eval --benchmark easy-vqa --limit 200
  prumerge eval --benchmark easy-vqa --methods none,prumerge,prumerge+,visionzip \\
      --keep adaptive,0.1,0.25 --limit 500 --out results/easy-vqa
  prumerge eval --benchmark pope --data-root playground/data/eval/pope \\
      --model llava-hf/llava-1.5-7b-hf --device cuda --methods none,prumerge+ \\
      --option prumerge+:attention=reference
"""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval",
        help="score reduction methods at token budgets on a benchmark",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--benchmark",
        required=True,
        help="synth, easy-vqa, vqav2, textvqa, pope, mme or scienceqa-img",
    )
    parser.add_argument(
        "--methods",
        default="none,prumerge,prumerge+",
        help="comma-separated methods (see `prumerge methods`; default: %(default)s)",
    )
    parser.add_argument(
        "--keep",
        default=ADAPTIVE,
        help="comma-separated budgets: counts (64), ratios (0.25) and/or 'adaptive' "
        "(default: %(default)s); see the rule above",
    )
    parser.add_argument("--limit", type=int, help="first N samples of the benchmark")
    parser.add_argument(
        "--out", help="results directory (default: results/<benchmark>)", metavar="DIR"
    )
    parser.add_argument(
        "--data-root", metavar="DIR", help="benchmark data directory (for external benchmarks)"
    )
    parser.add_argument(
        "--model",
        help="HF LLaVA model id or local directory, or default:base for the embedded model "
        "trained without reduction (default: the embedded model)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="samples per generate call")
    parser.add_argument(
        "--option",
        action="append",
        metavar="[METHOD:]KEY=VALUE",
        help="method option, for every listed method that takes it, or for METHOD only "
        "(e.g. merge=mean, visionzip:contextual=0.1; repeatable; use --keep for budgets)",
    )
    parser.add_argument(
        "--benchmark-option",
        action="append",
        metavar="KEY=VALUE",
        help="loader option (e.g. n_scenes=50, splits=random,popular; repeatable)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        help="generation cap (default: 8 for one-word benchmarks, 16 for VQA-style ones)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace results of a different configuration in OUT",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the plot")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda, cuda:1, ... (default: the local GPU if there is one, else cpu)",
    )
    add_model_placement_args(parser)
    parser.add_argument("--cache-dir", help="cache of the built default model")
    parser.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------


def parse_budgets(text: str) -> list[int | float | None]:
    """``--keep``: counts, ratios and ``adaptive`` (None), in order, without repeats.

    ``1`` (one token) and ``1.0`` (all of them) are different budgets and both run.
    """
    from prumerge.methods.spec import budget_key, parse_budget

    budgets: list[int | float | None] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        value = parse_budget(item, what="--keep", adaptive=True)
        if budget_key(value) not in {budget_key(b) for b in budgets}:
            budgets.append(value)
    if not budgets:
        raise PrumergeError("--keep is empty")
    return budgets


def _split_option(pair: str, methods: list[str]) -> tuple[str | None, str]:
    """``visionzip:contextual=0.1`` -> ("visionzip", "contextual=0.1"); unscoped -> None."""
    key, sep, _ = pair.partition("=")
    if sep and ":" in key:
        scope, _, rest = pair.partition(":")
        if scope not in methods:
            raise PrumergeError(
                f"--option {pair!r}: method {scope!r} is not in --methods ({','.join(methods)})"
            )
        return scope, rest
    return None, pair


def method_options(pairs: list[str] | None, methods: list[str]) -> dict[str, dict[str, Any]]:
    """Per-method options from ``--option``, as text; each unscoped option goes to every
    listed method that takes it, and must be taken by at least one."""
    from prumerge.methods import METHODS, option_defaults
    from prumerge.methods.spec import parse_options

    per_method: dict[str, dict[str, Any]] = {name: {} for name in methods}
    for pair in pairs or []:
        scope, rest = _split_option(pair, methods)
        options = parse_options([rest])
        ((key, value),) = options.items()
        if key == "keep":
            raise PrumergeError("--option keep=...: give budgets with --keep")
        takers = [
            name
            for name in ([scope] if scope else methods)
            if key in option_defaults(METHODS[name])
        ]
        if not takers:
            where = f"method {scope!r}" if scope else f"any of {','.join(methods)}"
            raise PrumergeError(f"--option {pair!r}: {where} takes no option {key!r}")
        for name in takers:
            per_method[name][key] = value
    return per_method


def plan_configs(
    methods_text: str, keep_text: str, option_pairs: list[str] | None
) -> list[MethodSpec]:
    """The configurations ``--methods``, ``--keep`` and ``--option`` ask for (see the help).

    Every method is built once per configuration here (``prumerge.methods.spec.make_method``), so
    unknown methods, unknown options and bad values fail before any model is loaded.
    """
    from prumerge.methods import METHODS, method_names, option_defaults
    from prumerge.methods.spec import make_spec

    methods: list[str] = []
    for raw in methods_text.split(","):
        name = raw.strip()
        if name and name not in methods:
            methods.append(name)
    if not methods:
        raise PrumergeError("--methods is empty")
    for name in methods:
        if name not in METHODS:
            raise PrumergeError(f"unknown method {name!r}; available: {', '.join(method_names())}")
    budgets = parse_budgets(keep_text)
    options = method_options(option_pairs, methods)

    planned: list[MethodSpec] = []
    for name in methods:
        takes_keep = "keep" in option_defaults(METHODS[name])
        adaptive = takes_keep and option_defaults(METHODS[name])["keep"] is None
        if name == "none" or not takes_keep:
            chosen: list[int | float | None] = [None]
        else:
            chosen = [b for b in budgets if b is not None or adaptive]
            if not chosen:
                raise PrumergeError(
                    f"method {name!r} needs a token budget and --keep lists none; add one "
                    f"(e.g. --keep {keep_text},64)"
                )
        spec = make_spec(name, options[name], check=False)
        for budget in chosen:
            planned.append(make_spec(name, spec.with_budget(budget).options))
    return planned


def benchmark_options(pairs: list[str] | None, benchmark: str) -> dict[str, Any]:
    """``--benchmark-option`` values, typed by the loader's annotations: integers, numbers,
    true/false, and comma-separated lists for options typed as lists or iterables
    (``splits``, ``question_types``, ``subtasks``); other values stay text."""
    from prumerge.eval.datasets import get_benchmark
    from prumerge.methods.spec import parse_options

    options: dict[str, Any] = dict(parse_options(pairs))
    if not options:
        return options
    loader = get_benchmark(benchmark).loader
    parameters = inspect.signature(loader).parameters
    for key, value in list(options.items()):
        if key not in parameters or key == "root":
            known = ", ".join(p for p in parameters if p != "root") or "none"
            raise PrumergeError(
                f"--benchmark-option {key}: {benchmark} takes no option {key!r} (options: {known})"
            )
        options[key] = _typed_loader_value(key, value, parameters[key])
    return options


def _typed_loader_value(key: str, text: str, parameter: inspect.Parameter) -> Any:
    """One loader option from text, typed by the loader's annotation."""
    from prumerge.methods.spec import coerce_value, value_kinds

    annotation = str(parameter.annotation)
    if any(t in annotation for t in ("list", "Iterable", "tuple")):
        if text.strip().lower() == "none" and "None" in annotation:
            return None
        items = [part.strip() for part in text.split(",") if part.strip()]
        if not items:
            raise PrumergeError(f"--benchmark-option {key}: give at least one value")
        return items
    default = None if parameter.default is inspect.Parameter.empty else parameter.default
    kinds = value_kinds(parameter.annotation, default)
    return coerce_value(text, kinds, f"--benchmark-option {key}")


# ---------------------------------------------------------------------------------------------
# Processes and devices
# ---------------------------------------------------------------------------------------------


def _launcher_rank() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` from the launcher's environment (torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def _init_distributed(world: int, device: str) -> bool:
    """Join the launcher's process group (gloo on CPU, NCCL on GPUs); False if single."""
    import torch.distributed as dist

    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise PrumergeError("WORLD_SIZE > 1 but torch.distributed is not available")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        import torch

        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    return True


def _model_id(requested: str | None) -> str:
    """What identifies the model in result files, known before the model loads.

    The embedded model is named by its variant and cache entry, which hashes the projector
    and adapter weights, so results of different weights never mix.
    """
    from prumerge.loading import default_variant
    from prumerge.models.default import default_entry_name

    variant = default_variant(requested)
    if variant is not None:
        entry = default_entry_name(variant)
        return ("default:" if variant == "default" else f"default:{variant}:") + entry
    path = Path(requested).expanduser()
    return str(path.resolve()) if path.exists() else requested


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    rank, world, local_rank = _launcher_rank()
    try:
        return _run(args, rank, world, local_rank)
    except _QuietError:
        return 2


class _QuietError(Exception):
    """An input error every process hit alike: only rank 0 reports it."""


def _run(args: argparse.Namespace, rank: int, world: int, local_rank: int) -> int:
    from prumerge.eval.datasets import get_benchmark, load_benchmark
    from prumerge.eval.predictor import max_new_tokens_for
    from prumerge.eval.runner import check_results_directory
    from prumerge.loading import resolve_device

    # Everything up to the model load depends only on the arguments and the files, so every
    # process fails alike; only rank 0 says why.
    try:
        if args.batch_size < 1:
            raise PrumergeError(f"--batch-size must be at least 1, got {args.batch_size}")
        if args.limit is not None and args.limit < 1:
            raise PrumergeError(f"--limit must be at least 1, got {args.limit}")
        if args.max_new_tokens is not None and args.max_new_tokens < 1:
            raise PrumergeError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
        planned = plan_configs(args.methods, args.keep, args.option)
        bench_options = benchmark_options(args.benchmark_option, args.benchmark)
        if get_benchmark(args.benchmark).needs_root and args.data_root is None:
            raise PrumergeError(
                f"{args.benchmark} reads its data from files: give --data-root DIR (LLaVA's "
                f"playground/data/eval/<name> layout; see docs/eval.md)"
            )
        out = Path(args.out or Path("results") / args.benchmark)
        check_results_directory(out)
        benchmark = load_benchmark(
            args.benchmark, args.data_root, limit=args.limit, **bench_options
        )
        if not benchmark.samples:
            raise PrumergeError(f"{args.benchmark}: no samples to evaluate")
        device = resolve_device(args.device, local_rank=local_rank)
        check_model_placement(args, device)
    except PrumergeError:
        if rank != 0:
            raise _QuietError from None
        raise

    max_new_tokens = args.max_new_tokens or max_new_tokens_for(benchmark.metric)
    distributed = _init_distributed(world, device)
    try:
        return _evaluate(args, benchmark, planned, out, device, max_new_tokens, rank, world)
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()


def _evaluate(
    args: argparse.Namespace,
    benchmark: Any,
    planned: list[MethodSpec],
    out: Path,
    device: str,
    max_new_tokens: int,
    rank: int,
    world: int,
) -> int:
    from prumerge.eval.predictor import ModelPredictor
    from prumerge.eval.runner import EvalConfig, check_directory, evaluate, hold_results

    if args.no_progress or rank != 0:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # from_pretrained's weight-loading bar
    model_id = _model_id(args.model)
    if args.dtype not in (None, "float32"):
        model_id += f" ({args.dtype})"  # results of another dtype never mix with these

    configs = []
    for plan in planned:
        method = plan.build()
        recorded = {k: v for k, v in method.options().items() if k != "keep"}
        recorded["max_new_tokens"] = max_new_tokens  # it changes the answers, so it is hashed
        configs.append(
            (EvalConfig(plan.method, plan.budget, model_id=model_id, options=recorded), method)
        )

    with contextlib.ExitStack() as held:
        # One run per results directory at a time: a second one would append every
        # prediction again. Rank 0 holds the lock from before the model loads to the end,
        # and a directory of another configuration is refused before the model loads.
        try:
            held.enter_context(hold_results(out))
            if not args.overwrite:
                for config, _ in configs:
                    check_directory(benchmark, config, out)
        except PrumergeError:
            if rank != 0:
                raise _QuietError from None
            raise

        started = time.perf_counter()
        model, processor, prompt_fn = load_args_model(
            args, device, [method for _, method in configs]
        )
        load_seconds = time.perf_counter() - started

        def predictor(method: Any) -> Any:
            return lambda: ModelPredictor(
                model, processor, prompt_fn, method, max_new_tokens=max_new_tokens
            )

        summary = evaluate(
            benchmark,
            [(config, predictor(method)) for config, method in configs],
            out,
            batch_size=args.batch_size,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            plot=not args.no_plot,
        )
    if summary is None:  # not rank 0
        return 0

    wall = summary.wall_seconds
    report = summary.to_dict()
    report.update(
        out_dir=str(out),
        summary_files=[str(out / "summary.txt"), str(out / "summary.json")],
        plot=None if args.no_plot else str(out / "accuracy_vs_tokens.png"),
        model_id=model_id,
        device=str(model.device),
        dtype=str(model.dtype).removeprefix("torch."),
        n_samples=len(benchmark.samples),
        processes=world,
        batch_size=args.batch_size,
        max_new_tokens=max_new_tokens,
        wall_seconds={"model_load": round(load_seconds, 3)}
        | {name: round(seconds, 3) for name, seconds in wall.items()},
    )
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(summary.table())
    walls = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in wall.items())
    print(
        f"wall time this run ({world} process{'es' if world > 1 else ''}, batch "
        f"{args.batch_size}): model load {load_seconds:.1f} s; {walls}"
    )
    print(f"model: {model_id}")
    written = f"results: {out}/ (summary.txt, summary.json"
    print(written + (")" if args.no_plot else ", accuracy_vs_tokens.png)"))
    return 0
