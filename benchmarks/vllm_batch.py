"""Offline vLLM batch throughput and time to first token, with and without token reduction.

Run it with the vLLM environment (scripts/setup-vllm.sh) on a LLaVA model directory, e.g. the
embedded default model's (printed by the main environment)::

    MODEL=$(.venv/bin/python -c "from prumerge.models import load_default_model as m; print(m()[0].name_or_path)")
    .venv-vllm/bin/python benchmarks/vllm_batch.py --model "$MODEL" --method prumerge+ \\
        --keeps 32 64 144 --adaptive prumerge prumerge+ --requests 64 --max-tokens 8 --rounds 3

Each round runs every configuration in turn (no reduction, then the method at each budget),
each in a fresh engine process that is warmed up and then times the same batch of image
requests (distinct easy-vqa images, one question each). ``--adaptive`` adds PruMerge's
adaptive budget (each image its own count; the tower runs in the processor). The ratios to "none" are computed
round by round and the table gives medians over the rounds. Besides wall-clock time, each
batch's CPU time (of the process that holds the engine) is reported, which other load on a
shared machine disturbs far less.
Prefix caching and the multimodal processor cache are off, so no round reuses another's work.
Every request generates exactly --max-tokens tokens (EOS ignored), so output tokens are equal.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def _requests(count: int, model: str) -> list[dict[str, Any]]:
    """One question about each of the first ``count`` easy-vqa test images, as vLLM prompts."""
    from PIL import Image
    from transformers import AutoProcessor

    from prumerge.data.easy_vqa import load_easy_vqa
    from prumerge.models.default import format_prompt

    processor = AutoProcessor.from_pretrained(model)
    image_ids, turns, paths = load_easy_vqa("test")
    if count > len(image_ids):
        raise SystemExit(f"vllm_batch: error: easy-vqa has {len(image_ids)} test images")
    requests = []
    for image_id in image_ids[:count]:
        question = turns[image_id][0][0]
        with Image.open(paths[image_id]) as image:
            requests.append(
                {
                    "prompt": format_prompt(processor, question),
                    "multi_modal_data": {"image": image.convert("RGB")},
                }
            )
    return requests


def _engine(connection, model: str, serve: dict[str, Any], requests: int, max_tokens: int) -> None:
    """Child process: start one engine, warm it up, time one batch, report, exit."""
    # The engine core and its worker run in this process, so that its CPU time is theirs.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # vLLM-CPU pins its threads to one logical CPU per core by default; on a small shared
    # machine that pins the engine beside whatever else runs there. Let the OS place them.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    try:
        from vllm import LLM, SamplingParams

        from prumerge.serve import hf_overrides

        options = dict(serve)
        llm = LLM(
            model=model,
            hf_overrides=hf_overrides(options.pop("method"), **options),
            dtype="float32",
            max_model_len=1024,
            limit_mm_per_prompt={"image": 1},
            kv_cache_memory_bytes=1 << 30,  # holds all 64 unreduced requests at once
            enable_prefix_caching=False,
            mm_processor_cache_gb=0,
            distributed_executor_backend="uni",
            enforce_eager=True,  # torch.compile takes minutes on 2 cores; eager for every config
            disable_log_stats=False,
            seed=0,
        )
        batch = _requests(requests, model)
        sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        llm.generate(batch[:4], sampling, use_tqdm=False)  # warm-up
        start, cpu_start = time.perf_counter(), time.process_time()
        outputs = llm.generate(batch, sampling, use_tqdm=False)
        seconds = time.perf_counter() - start
        # The engine, its model runner and the image processor all run in this process, so
        # its CPU time is the batch's work, whatever else the machine is doing.
        cpu_seconds = time.process_time() - cpu_start
        ttft = [o.metrics.first_token_latency for o in outputs]
        connection.send(
            {
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "requests": len(outputs),
                "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
                "prompt_tokens": statistics.mean(len(o.prompt_token_ids) for o in outputs),
                "ttft_mean": statistics.mean(ttft),
                "ttft_median": statistics.median(ttft),
            }
        )
    except Exception as exc:  # reported by the parent as one line
        connection.send({"error": f"{type(exc).__name__}: {exc}"})


def _run_one(context, model: str, serve: dict[str, Any], requests: int, max_tokens: int):
    parent, child = context.Pipe()
    process = context.Process(target=_engine, args=(child, model, serve, requests, max_tokens))
    process.start()
    try:
        reply = parent.recv()
    except EOFError:
        reply = {"error": f"the engine process died (exit code {process.exitcode})"}
    process.join()
    return reply


def _configs(
    method: str, keeps: list[int], adaptive: list[str]
) -> list[tuple[str, dict[str, Any]]]:
    configs = [("none", {"method": "none"})]
    # Adaptive budgets: the plugin's processor runs the tower once per image (in this
    # process, so its CPU time is counted), each image keeping its own count.
    configs += [(f"{name} adaptive", {"method": name}) for name in adaptive]
    configs += [(f"{method} keep={k}", {"method": method, "keep": k}) for k in keeps]
    return configs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a LLaVA model directory")
    parser.add_argument(
        "--method", default="prumerge+", help="reduction method (default prumerge+)"
    )
    parser.add_argument("--keeps", type=int, nargs="+", default=[32, 64, 144])
    parser.add_argument(
        "--adaptive",
        nargs="*",
        default=[],
        metavar="METHOD",
        help="also serve these methods with their adaptive budget (prumerge, prumerge+)",
    )
    parser.add_argument("--requests", type=int, default=64, help="image requests per batch")
    parser.add_argument("--max-tokens", type=int, default=8, help="generated tokens per request")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not Path(args.model, "config.json").is_file():
        parser.error(f"--model {args.model} has no config.json")
    if args.requests < 1 or args.max_tokens < 1 or args.rounds < 1 or min(args.keeps) < 1:
        parser.error("--requests, --max-tokens, --rounds and --keeps must be positive")
    from prumerge.errors import PrumergeError
    from prumerge.serve import parse_serve_config

    configs = _configs(args.method, args.keeps, args.adaptive)
    try:
        for _, serve in configs:
            parse_serve_config(serve)
    except PrumergeError as exc:
        parser.error(str(exc))

    # One engine at a time (each holds the model and a 1 GiB KV cache), each configuration
    # once per round, so every round measures all of them within minutes of each other.
    context = mp.get_context("spawn")
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in configs}
    for round_index in range(args.rounds):
        for name, serve in configs:
            reply = _run_one(context, args.model, serve, args.requests, args.max_tokens)
            if "error" in reply:
                print(f"vllm_batch: error: engine {name}: {reply['error']}", file=sys.stderr)
                return 1
            runs[name].append(reply)
            print(
                f"round {round_index + 1}/{args.rounds} {name}: {reply['seconds']:.2f} s, "
                f"{reply['cpu_seconds']:.1f} CPU s",
                file=sys.stderr,
                flush=True,
            )

    rows = _summarise(runs, baseline="none")
    print(_table(rows, args))
    if args.json:
        record = {"args": vars(args) | {"json": str(args.json)}, "rows": rows, "runs": runs}
        args.json.write_text(json.dumps(record, indent=2))
    return 0


def _summarise(runs: dict[str, list[dict[str, float]]], baseline: str) -> list[dict[str, Any]]:
    """Per configuration: medians over rounds, and the median of per-round ratios to baseline."""
    base = runs[baseline]
    rows = []
    for name, rounds in runs.items():
        rps = [r["requests"] / r["seconds"] for r in rounds]
        tps = [r["output_tokens"] / r["seconds"] for r in rounds]
        speedup = [b["seconds"] / r["seconds"] for r, b in zip(rounds, base, strict=True)]
        ttft_ratio = [b["ttft_mean"] / r["ttft_mean"] for r, b in zip(rounds, base, strict=True)]
        cpu_ratio = [b["cpu_seconds"] / r["cpu_seconds"] for r, b in zip(rounds, base, strict=True)]
        rows.append(
            {
                "config": name,
                "prompt_tokens": rounds[0]["prompt_tokens"],
                "requests_per_s": statistics.median(rps),
                "output_tokens_per_s": statistics.median(tps),
                "ttft_mean_s": statistics.median(r["ttft_mean"] for r in rounds),
                "ttft_median_s": statistics.median(r["ttft_median"] for r in rounds),
                "throughput_vs_none": statistics.median(speedup),
                "ttft_vs_none": statistics.median(ttft_ratio),
                "cpu_seconds": statistics.median(r["cpu_seconds"] for r in rounds),
                "cpu_vs_none": statistics.median(cpu_ratio),
            }
        )
    return rows


def _table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"{args.requests} image requests x {args.max_tokens} output tokens, median of "
        f"{args.rounds} interleaved rounds",
        "",
        "| config | prompt tokens | requests/s | output tokens/s | TTFT mean | TTFT median "
        "| throughput vs none | TTFT speed-up vs none | CPU s per batch | CPU speed-up vs none |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['config']} | {row['prompt_tokens']:.0f} | {row['requests_per_s']:.2f} "
            f"| {row['output_tokens_per_s']:.1f} | {row['ttft_mean_s'] * 1000:.0f} ms "
            f"| {row['ttft_median_s'] * 1000:.0f} ms | {row['throughput_vs_none']:.2f}x "
            f"| {row['ttft_vs_none']:.2f}x | {row['cpu_seconds']:.1f} | {row['cpu_vs_none']:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # vLLM and this script start processes with spawn
    sys.exit(main())
