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
    from prumerge.serve.vision import layout_of

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


def encode_with_towers(
    model, checkpoints: dict[str, str], pixel_path: str, cases: list, out_path: str
) -> int:
    """Inside the engine's worker: the plugin's vLLM towers (vLLM's CLIPVisionModel and
    SiglipVisionModel, run layer by layer) for LLaVA checkpoints with those towers, reduced
    by each listed method.

    The default model served by the engine has a DINOv2 tower, and no CLIP or SigLIP weights
    install offline; this builds the tower the plugin would build for each checkpoint (tiny
    random LLaVAs) beside it, loads its weights with vLLM's loader and saves the reductions.
    """
    import torch
    from safetensors.torch import load_file
    from torch import nn
    from transformers import LlavaConfig
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.models.utils import AutoWeightsLoader

    from prumerge.serve.config import parse_serve_config
    from prumerge.serve.vision import layout_of, reduce_patches
    from prumerge.serve.vllm.towers import build_tower, run_tower, tower_kind, tower_weights_mapper

    pixel_values = torch.load(pixel_path)
    results = []
    for tower_name, served in cases:
        checkpoint = checkpoints[tower_name]
        config = LlavaConfig.from_pretrained(checkpoint)
        kind = tower_kind(config.vision_config)
        assert kind == tower_name
        state = load_file(os.path.join(checkpoint, "model.safetensors"))
        # The tower's weights, named as in the checkpoint; the plugin's own mapper renames them.
        tower_state = [(name, tensor) for name, tensor in state.items() if "vision_tower." in name]
        mapper = tower_weights_mapper(kind) | model.hf_to_vllm_mapper
        method = parse_serve_config(served).build()
        layout = layout_of(config, method)
        # vLLM's layers read the current config when built; the defaults suit a lone tower.
        with set_current_vllm_config(VllmConfig()):
            tower = build_tower(config, layout, None, "vision_tower")
        holder = nn.Module()
        holder.vision_tower = tower
        loaded = AutoWeightsLoader(holder).load_weights(iter(tower_state), mapper=mapper)
        assert loaded == {name for name, _ in holder.named_parameters()}, "weights missing"
        # What vLLM's loader does after load_weights: linear layers set up their kernels.
        for module in tower.modules():
            quant_method = getattr(module, "quant_method", None)
            if quant_method is not None:
                quant_method.process_weights_after_loading(module)
        with torch.inference_mode():
            hidden, q, k = run_tower(tower, kind, layout, pixel_values)
            reduction, _ = reduce_patches(
                method, layout, hidden, tuple(pixel_values.shape[-2:]), q, k
            )
        results.append(
            {
                "layers_built": len(tower.vision_model.encoder.layers),
                "tokens": reduction.tokens.float().cpu().clone(),
                "lengths": reduction.lengths.cpu().clone(),
                "index": reduction.index.cpu().clone(),
            }
        )
    torch.save(results, out_path)
    return len(results)


def main(spec_path: str, result_path: str) -> None:
    # encode_with_methods travels to the engine's worker process as a pickled function.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    # vLLM-CPU pins its threads to one logical CPU per core by default, which on a small
    # shared machine leaves it one CPU beside other work; let the OS place them instead.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
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
    sampling = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"])
    outputs = llm.generate(requests, sampling, use_tqdm=False) if requests else []
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
    towers = spec.get("towers")
    if towers:
        run = functools.partial(
            encode_with_towers,
            checkpoints=towers["checkpoints"],
            pixel_path=towers["pixels"],
            cases=towers["cases"],
            out_path=towers["out"],
        )
        result["towers_encoded"] = llm.apply_model(run)[0]
    with open(result_path, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":  # vLLM starts its engine processes with spawn
    main(*sys.argv[1:3])
