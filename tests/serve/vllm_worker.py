"""Runs one vLLM engine for the serving tests; started with the vLLM environment's Python.

    .venv-vllm/bin/python tests/serve/vllm_worker.py SPEC.json RESULT.json

SPEC holds the model directory, the served method and budget (``serve``), the requests
(``items``: prompt text with one ``<image>`` and an image path), ``max_tokens``, and optionally
``encode``: a ``.pt`` file of pixel values, a list of method configs and an output ``.pt`` path.
RESULT gets, per request, the generated text and token ids and the prompt's token ids, plus
timings. With ``encode``, the served model's ``encode_images`` runs inside the engine's worker
for each listed method (swapped in and out again) on those pixel values, and the reduced,
projected tokens are saved for comparison with the Hugging Face adapter's. For an adaptive
engine, ``repeat`` (item indices sent again: the caches), ``faults`` (requests whose
reduction fails) and ``in_processor`` (the processor's reduction for other adaptive configs,
run in this front-end process) add their results. ``architecture`` gives the served
architecture with the ``serve`` config as is (Qwen2.5-VL); ``qwen_in_processor`` runs that
processor's reduction for other configs.
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


def reduce_in_processor(model_dir: str, pixel_path: str, configs: list[dict], out_path: str):
    """In this (front-end) process: the adaptive processor's tower and reduction for each
    listed method config on the given pixels, as the plugin's multimodal processor runs them."""
    import torch
    from transformers import LlavaConfig

    from prumerge.serve.config import parse_serve_config
    from prumerge.serve.vllm.adaptive import ProcessorTower

    pixel_values = torch.load(pixel_path)
    results = []
    for served in configs:
        config = LlavaConfig.from_pretrained(model_dir)
        method = parse_serve_config(served).build()
        tower = ProcessorTower(model_dir, None, config, method)
        results.append([t.float().clone() for t in tower.reduce(pixel_values)])
    torch.save(results, out_path)


def reduce_in_qwen_processor(model_dir: str, images: list[str], configs: list[dict], out_path: str):
    """In this (front-end) process: the Qwen2.5-VL processor's tower and reduction for each
    listed method config on the given images: each image's tokens and anchors."""
    import torch
    from PIL import Image
    from transformers import AutoConfig

    from prumerge.loading.checkpoint import load_processor
    from prumerge.serve.vllm.qwen import QwenProcessorTower, serve_config_of

    config = AutoConfig.from_pretrained(model_dir)
    processor = load_processor(model_dir).image_processor
    pixels = processor(images=[Image.open(p).convert("RGB") for p in images], return_tensors="pt")
    results = []
    for served in configs:
        config.prumerge = served
        tower = QwenProcessorTower(model_dir, None, config, serve_config_of(config).build())
        results.append(tower.reduce(pixels["pixel_values"], pixels["image_grid_thw"]))
    torch.save(results, out_path)


def flat_images_fail():
    """A fault for the tests: the adaptive processor's reduction raises for a flat image
    (every pixel alike), as a reduction that fails would; other images reduce as usual."""
    from prumerge.errors import PrumergeError
    from prumerge.serve.vllm.adaptive import ProcessorTower

    reduce = ProcessorTower.reduce

    def failing(self, pixel_values):
        flat = pixel_values.flatten(2).std(dim=2).amax(dim=1) == 0  # each channel constant
        if bool(flat.any()):
            raise PrumergeError("the reduction failed on a flat image (test fault)")
        return reduce(self, pixel_values)

    ProcessorTower.reduce = failing


def request_of(item: dict) -> dict:
    from PIL import Image

    if item.get("flat"):
        image = Image.new("RGB", (64, 64), (90, 90, 90))
    else:
        with Image.open(item["image"]) as opened:
            image = opened.convert("RGB")
    return {"prompt": item["prompt"], "multi_modal_data": {"image": image}}


def outputs_of(outputs) -> dict:
    return {
        "texts": [o.outputs[0].text for o in outputs],
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "prompt_token_ids": [list(o.prompt_token_ids) for o in outputs],
        "num_cached_tokens": [o.num_cached_tokens for o in outputs],
    }


def images_reduced() -> int:
    """Images the adaptive processor's tower has reduced in this process."""
    from prumerge.serve.vllm.adaptive import _TOWERS

    return sum(tower.images_reduced for tower in _TOWERS.values())


def main(spec_path: str, result_path: str) -> None:
    # encode_with_methods travels to the engine's worker process as a pickled function.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    # vLLM-CPU pins its threads to one logical CPU per core by default, which on a small
    # shared machine leaves it one CPU beside other work; let the OS place them instead.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from vllm import LLM, SamplingParams

    from prumerge.serve import hf_overrides

    with open(spec_path) as handle:
        spec = json.load(handle)
    serve = dict(spec["serve"])
    if "architecture" in spec:  # the config as a user writes it, for that architecture
        overrides = {"architectures": [spec["architecture"]], "prumerge": serve}
    else:
        overrides = hf_overrides(serve.pop("method"), **serve)
    start = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        hf_overrides=overrides,
        dtype="float32",
        max_model_len=1024,
        limit_mm_per_prompt={"image": 1},
        kv_cache_memory_bytes=1 << 29,
        enforce_eager=True,
        seed=0,
        # Small blocks (vLLM-CPU's default is 128) let short prompts reach the prefix cache.
        **({"block_size": spec["block_size"]} if "block_size" in spec else {}),
    )
    engine_seconds = time.perf_counter() - start
    requests = [request_of(item) for item in spec["items"]]
    start = time.perf_counter()
    sampling = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"])
    reduced_before = images_reduced()
    outputs = llm.generate(requests, sampling, use_tqdm=False) if requests else []
    generate_seconds = time.perf_counter() - start
    result = {
        "engine_seconds": engine_seconds,
        "generate_seconds": generate_seconds,
        "images_reduced": images_reduced() - reduced_before,
        **outputs_of(outputs),
    }
    repeat = spec.get("repeat")
    if repeat:
        # The same requests again: the processor cache and the prefix cache hold them now.
        before = images_reduced()
        again = llm.generate([requests[i] for i in repeat], sampling, use_tqdm=False)
        result["repeat"] = {**outputs_of(again), "images_reduced": images_reduced() - before}
    faults = spec.get("faults")
    if faults:
        # Requests whose reduction fails: vLLM's usual error; the engine answers afterwards.
        flat_images_fail()
        result["faults"] = []
        for item in faults:
            try:
                llm.generate([request_of(item)], sampling, use_tqdm=False)
                result["faults"].append(None)
            except Exception as exc:  # noqa: BLE001 (the error is what is checked)
                result["faults"].append(f"{type(exc).__name__}: {exc}")
        after = llm.generate(requests[:1], sampling, use_tqdm=False)
        result["after_faults"] = outputs_of(after)
    in_processor = spec.get("in_processor")
    if in_processor:
        reduce_in_processor(
            spec["model"], in_processor["pixels"], in_processor["configs"], in_processor["out"]
        )
    qwen = spec.get("qwen_in_processor")
    if qwen:
        reduce_in_qwen_processor(spec["model"], qwen["images"], qwen["configs"], qwen["out"])
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
