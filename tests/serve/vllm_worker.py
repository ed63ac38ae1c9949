"""Runs one vLLM engine for the serving tests; started with the vLLM environment's Python.

    .venv-vllm/bin/python tests/serve/vllm_worker.py SPEC.json RESULT.json

SPEC holds the model directory, the served method and budget (``serve``), the requests
(``items``: prompt text with one ``<image>`` and an image path), ``max_tokens``, and optionally
``encode``: a ``.pt`` file of pixel values, a list of method configs and an output ``.pt`` path.
RESULT gets, per request, the generated text and token ids and the prompt's token ids, plus
timings. With ``encode``, the served model's ``encode_images`` runs inside the engine's worker
for each listed method (swapped in and out again) on those pixel values, and the reduced,
projected tokens are saved for comparison with the Hugging Face adapter's.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time


def encode_with_methods(model, pixel_path: str, configs: list[dict], out_path: str) -> int:
    """Inside the engine's worker: each method's ``encode_images`` on the given pixels."""
    import torch

    from prumerge.serve.config import parse_serve_config
    from prumerge.serve.vllm.model import layout_of

    pixel_values = torch.load(pixel_path)
    served = (model.reduction_method, model.layout)
    results = []
    try:
        with torch.inference_mode():
            for config in configs:
                method = parse_serve_config(config).build()
                model.reduction_method, model.layout = method, layout_of(model.config, method)
                tokens = model.encode_images(pixel_values.to(model.suppress_tokens.device))
                results.append([t.float().cpu().clone() for t in tokens])
    finally:
        model.reduction_method, model.layout = served
    torch.save(results, out_path)
    return len(results)


def main(spec_path: str, result_path: str) -> None:
    # encode_with_methods travels to the engine's worker process as a pickled function.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from PIL import Image
    from vllm import LLM, SamplingParams

    from prumerge.serve import hf_overrides

    with open(spec_path) as handle:
        spec = json.load(handle)
    serve = dict(spec["serve"])
    start = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        hf_overrides=hf_overrides(serve.pop("method"), **serve),
        dtype="float32",
        max_model_len=1024,
        limit_mm_per_prompt={"image": 1},
        kv_cache_memory_bytes=1 << 29,
        enforce_eager=True,
        seed=0,
    )
    engine_seconds = time.perf_counter() - start
    requests = []
    for item in spec["items"]:
        with Image.open(item["image"]) as image:
            requests.append(
                {"prompt": item["prompt"], "multi_modal_data": {"image": image.convert("RGB")}}
            )
    start = time.perf_counter()
    outputs = llm.generate(
        requests,
        SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"]),
        use_tqdm=False,
    )
    generate_seconds = time.perf_counter() - start
    result = {
        "engine_seconds": engine_seconds,
        "generate_seconds": generate_seconds,
        "texts": [o.outputs[0].text for o in outputs],
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "prompt_token_ids": [list(o.prompt_token_ids) for o in outputs],
    }
    encode = spec.get("encode")
    if encode:
        # A module-level function (pickled by name: the spawned workers import this script
        # as their __main__), bound to its arguments.
        run = functools.partial(
            encode_with_methods,
            pixel_path=encode["pixels"],
            configs=encode["configs"],
            out_path=encode["out"],
        )
        result["encoded"] = llm.apply_model(run)[0]
    with open(result_path, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":  # vLLM starts its engine processes with spawn
    main(*sys.argv[1:3])
