"""A tiny random LLaVA with a word-level tokenizer and a processor, saved like a checkpoint.

`prumerge eval --model DIR` loads it through the same `from_pretrained` path as a real
checkpoint, in well under a second, so CLI tests (subprocesses included) stay fast.
"""

from __future__ import annotations

from pathlib import Path

from tests.adapters.conftest import IMAGE_SIZE, IMAGE_TOKEN, tiny_llava

# ids 0-2 are special, as LlamaConfig's defaults expect (pad 0, bos 1, eos 2); 99 is <image>.
SPECIAL = ["<pad>", "<s>", "</s>"]
WORDS = [
    # the synth benchmark's answers, so that some answers can be right
    "yes", "no", "red", "green", "blue", "yellow", "purple", "orange",
    "circle", "square", "triangle", "star", "cross", "0", "1", "2", "3", "4", "5", "6",
    # prompt words
    "USER", "ASSISTANT", ":", "?", ".", ",", "is", "there", "a", "an", "the", "in", "image",
    "what", "color", "shape", "of", "object", "how", "many", "are", "to", "left", "right",
    "above", "below", "top", "bottom", "middle", "center", "answer", "question", "using",
    "single", "word", "or", "phrase", "Answer",
]  # fmt: skip


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = SPECIAL + WORDS
    vocab += [f"w{i}" for i in range(IMAGE_TOKEN - len(vocab))]
    vocab.append("<image>")
    assert vocab.index("<image>") == IMAGE_TOKEN and len(vocab) == IMAGE_TOKEN + 1
    unk = "w0"  # an ordinary word stands in for unknown ones
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=unk))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token=unk,
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def build_processor():
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=7,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,  # CLIP's [CLS], which "default" drops again
    )


def save_tiny_llava(directory: Path) -> Path:
    """Write a tiny LLaVA checkpoint (model, tokenizer, processor) into ``directory``."""
    model = tiny_llava("clip")
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    build_processor().save_pretrained(str(directory))
    return directory
