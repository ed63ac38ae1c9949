"""Write a tiny random checkpoint of every supported family, offline.

    python scripts/tiny_checkpoints.py DIR [--family NAME ...]

Each ``DIR/<family>`` holds a model of a few hundred thousand random parameters, saved the way
a real checkpoint is, with a working processor: an image processor (the PIL one, so no
torchvision is needed), a word-level tokenizer and the family's chat template. Processors
with a video part (OneVision, Qwen) are built and saved without it where torchvision cannot
be imported; ``prumerge.loading`` loads them the same way. Every command
then runs on it without a download (``prumerge ask --model DIR/qwen2_5_vl ...``); the answers
are random words. The tests build their checkpoints with this script.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from prumerge.loading.checkpoint import images_only, save_images_only
from prumerge.models import tiny
from prumerge.models.tiny import BOS, EOS, IMAGE_ID, PAD, PATCH, PINPOINTS, VIEW, VOCAB

#: The layers of each tiny model's text model and vision tower.
LAYERS = 2

#: Words the tokenizer knows (the synth benchmark's answers among them), after the specials.
WORDS = [
    "yes", "no", "red", "green", "blue", "yellow", "purple", "orange",
    "circle", "square", "triangle", "star", "cross", "0", "1", "2", "3", "4", "5", "6",
    "USER", "ASSISTANT", "user", "assistant", "model", ":", "?", ".", ",", "is", "there", "a",
    "an", "the", "in", "image", "what", "color", "shape", "of", "object", "how", "many", "are",
    "to", "left", "right", "above", "below", "answer", "question", "using", "single", "word",
    "or", "phrase", "Answer", "[INST]", "[/INST]",
]  # fmt: skip


def build_tokenizer(specials: dict[int, str], extra: dict[str, str] | None = None):
    """A word-level tokenizer of ``VOCAB`` ids: pad/bos/eos at 0-2, ``specials`` at their
    ids (each one token), the ``WORDS``, and filler words; ``extra`` names special tokens
    the processor reads off the tokenizer (``image_token``, ``boi_token``...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: list[str | None] = [None] * VOCAB
    vocab[PAD], vocab[BOS], vocab[EOS] = "<pad>", "<s>", "</s>"
    for index, token in specials.items():
        vocab[index] = token
    words = iter(WORDS)
    filler = 0
    for index in range(VOCAB):
        if vocab[index] is None:
            word = next(words, None)
            if word is None:
                word, filler = f"w{filler}", filler + 1
            vocab[index] = word
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="w0",
        extra_special_tokens=dict(extra or {}),
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(specials.values())})
    return tokenizer


def chat_template(user: str, image: str, end: str, assistant: str) -> str:
    """A Jinja chat template: ``user`` + the turn's images and text + ``end`` per message,
    then ``assistant`` for the generation prompt."""
    return (
        "{% for message in messages %}"
        f"{{{{ '{user}' if message['role'] == 'user' else '' }}}}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}"
        f"{{% if part['type'] == 'image' %}}{{{{ '{image}' }}}}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        f"{{{{ '{end}' }}}}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ '{assistant}' }}}}{{% endif %}}"
    )


#: Chat-turn markers' ids, below the table's image and video ids.
TURN_START, TURN_END = 95, 94
QWEN_SPECIALS = {
    IMAGE_ID: "<|image_pad|>",
    tiny.VIDEO_ID: "<|video_pad|>",
    tiny.START_ID: "<|vision_start|>",
    tiny.END_ID: "<|vision_end|>",
    TURN_START: "<|im_start|>",
    TURN_END: "<|im_end|>",
}
QWEN_TEMPLATE = chat_template(
    "<|im_start|>user\\n",
    "<|vision_start|><|image_pad|><|vision_end|>",
    "<|im_end|>\\n",
    "<|im_start|>assistant\\n",
)


def llava() -> tuple[torch.nn.Module, Any]:
    """LLaVA-1.5: CLIP 42 px (6x6 patches), Llama, ``USER: <image>\\n... ASSISTANT:``."""
    from transformers import CLIPImageProcessorPil, LlavaForConditionalGeneration, LlavaProcessor

    model = LlavaForConditionalGeneration(tiny.llava(LAYERS))
    tokenizer = build_tokenizer({IMAGE_ID: "<image>"}, {"image_token": "<image>"})
    side = tiny.LLAVA_IMAGE
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"height": side, "width": side}, do_center_crop=False, do_convert_rgb=True
        ),
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template=chat_template("USER: ", "<image>\\n", " ", "ASSISTANT:"),
    )
    return model, processor


def llava_next() -> tuple[torch.nn.Module, Any]:
    """LLaVA-NeXT: CLIP 28 px views, anyres grids, Llama, ``[INST] <image>\\n... [/INST]``."""
    from transformers import (
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    model = LlavaNextForConditionalGeneration(tiny.llava_next(LAYERS))
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": VIEW},
            crop_size={"height": VIEW, "width": VIEW},
            image_grid_pinpoints=PINPOINTS,
        ),
        tokenizer=build_tokenizer({IMAGE_ID: "<image>"}, {"image_token": "<image>"}),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template=chat_template("[INST] ", "<image>\\n", " [/INST]", ""),
    )
    return model, processor


def llava_onevision() -> tuple[torch.nn.Module, Any]:
    """LLaVA-OneVision: SigLIP 28 px views, anyres_max_2, Qwen2, ChatML."""
    from transformers import (
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
    )

    model = LlavaOnevisionForConditionalGeneration(tiny.llava_onevision(LAYERS))
    specials = {
        IMAGE_ID: "<image>",
        tiny.VIDEO_ID: "<video>",
        TURN_START: "<|im_start|>",
        TURN_END: "<|im_end|>",
    }
    processor = images_only(LlavaOnevisionProcessor)(
        image_processor=LlavaOnevisionImageProcessorPil(
            size={"height": VIEW, "width": VIEW}, image_grid_pinpoints=PINPOINTS
        ),
        tokenizer=build_tokenizer(specials, {"image_token": "<image>", "video_token": "<video>"}),
        num_image_tokens=(VIEW // PATCH) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_2",
        chat_template=chat_template(
            "<|im_start|>user ", "<image>\\n", "<|im_end|>\\n", "<|im_start|>assistant\\n"
        ),
    )
    return model, processor


def _qwen_processor(cls: type) -> Any:
    """A Qwen-VL processor of class ``cls``: 4 px patches merged 2x2, 16x16 to 32x32 px
    images, ChatML."""
    from transformers import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=4,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=16 * 16,
        max_pixels=32 * 32,
        size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32},
    )
    tokenizer = build_tokenizer(QWEN_SPECIALS)
    return images_only(cls)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_TEMPLATE
    )


def _qwen(model_class: str, processor_class: str, family: str) -> tuple[torch.nn.Module, Any]:
    """A Qwen-VL model of the table's ``family`` config, with its processor."""
    import transformers

    model = getattr(transformers, model_class)(tiny.CONFIGS[family](LAYERS))
    return model, _qwen_processor(getattr(transformers, processor_class))


def qwen2_vl() -> tuple[torch.nn.Module, Any]:
    """Qwen2-VL: full-attention ViT (4 px patches, 2x2 merger), M-RoPE, ChatML."""
    return _qwen("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", "qwen2_vl")


def qwen2_5_vl() -> tuple[torch.nn.Module, Any]:
    """Qwen2.5-VL: window-attention ViT (4 px patches, 2x2 merger), M-RoPE, ChatML."""
    return _qwen("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", "qwen2_5_vl")


def qwen3_vl() -> tuple[torch.nn.Module, Any]:
    """Qwen3-VL: DeepStack features after LLM layers 0 and 1, interleaved M-RoPE, ChatML."""
    return _qwen("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "qwen3_vl")


def internvl() -> tuple[torch.nn.Module, Any]:
    """InternVL3: InternViT tiles of 56 px (8x8 patches, pixel-shuffled to 4x4 tokens) plus a
    thumbnail, Qwen2, ChatML."""
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLForConditionalGeneration,
        InternVLProcessor,
    )

    model = InternVLForConditionalGeneration(tiny.internvl(LAYERS))
    specials = {
        IMAGE_ID: "<IMG_CONTEXT>",
        tiny.VIDEO_ID: "<video>",
        tiny.START_ID: "<img>",
        tiny.END_ID: "</img>",
        TURN_START: "<|im_start|>",
        TURN_END: "<|im_end|>",
    }
    extra = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    side = tiny.TILE
    processor = images_only(InternVLProcessor)(
        image_processor=GotOcr2ImageProcessorPil(
            size={"height": side, "width": side}, crop_to_patches=True, min_patches=1, max_patches=4
        ),
        tokenizer=build_tokenizer(specials, extra),
        video_processor=None,
        image_seq_length=tiny.TILE_TOKENS,
        chat_template=chat_template(
            "<|im_start|>user\\n", "<IMG_CONTEXT>\\n", "<|im_end|>\\n", "<|im_start|>assistant\\n"
        ),
    )
    return model, processor


def gemma3() -> tuple[torch.nn.Module, Any]:
    """Gemma 3: SigLIP 56 px (8x8 patches) average-pooled to 4x4 tokens, a bidirectional
    image block, ``<start_of_turn>user ... <start_of_turn>model``."""
    from transformers import (
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
    )

    model = Gemma3ForConditionalGeneration(tiny.gemma3(LAYERS))
    with torch.no_grad():  # the projection starts at zero: give the images some weight
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.5)
    specials = {
        IMAGE_ID: "<image_soft_token>",
        tiny.START_ID: "<start_of_image>",
        tiny.END_ID: "<end_of_image>",
        TURN_START: "<start_of_turn>",
        TURN_END: "<end_of_turn>",
    }
    extra = {
        "image_token": "<image_soft_token>",
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
    }
    side = tiny.TILE
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": side, "width": side}),
        tokenizer=build_tokenizer(specials, extra),
        image_seq_length=tiny.TILE_TOKENS,
        chat_template=chat_template(
            "<start_of_turn>user\\n",
            "<start_of_image>",
            "<end_of_turn>\\n",
            "<start_of_turn>model\\n",
        ),
    )
    return model, processor


#: The families this script writes: every one of the table (``prumerge.models.tiny.CONFIGS``),
#: each by the function of its name above.
FAMILIES: dict[str, Callable[[], tuple[torch.nn.Module, Any]]] = {
    family: globals()[family] for family in tiny.CONFIGS
}


def write(directory: Path, family: str, seed: int = 0) -> Path:
    """Write ``family``'s tiny checkpoint into ``directory / family``; returns that path."""
    torch.manual_seed(seed)
    model, processor = FAMILIES[family]()
    model = tiny.peaked(model.eval())
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    target = directory / family
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(target))
    if hasattr(processor, "video_processor") and processor.video_processor is None:
        save_images_only(processor, target)
    else:
        processor.save_pretrained(str(target))
    return target


def write_all(directory: Path, families: list[str] | None = None) -> dict[str, Path]:
    return {family: write(directory, family) for family in families or list(FAMILIES)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--family", action="append", choices=list(FAMILIES))
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    for family, path in write_all(args.directory, args.family).items():
        print(f"{family}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
