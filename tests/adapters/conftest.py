import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    Dinov2Config,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

IMAGE_TOKEN = 99
IMAGE_SIZE = 42  # 6x6 patches of 7 px
PATCHES = 36


def tiny_llava(
    tower: str = "clip", attn: str = "sdpa", seed: int = 0, text_layers: int = 2, **overrides
):
    common = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=7,
    )
    vision = CLIPVisionConfig(**common) if tower == "clip" else Dinov2Config(**common)
    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        pad_token_id=0,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2,
        **overrides,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.model.vision_tower.set_attn_implementation(attn)
    # Peaked [CLS] attention, as in trained towers: random weights give an almost flat one.
    with torch.no_grad():
        for module in model.model.vision_tower.modules():
            if type(module).__name__.endswith(("Attention", "SelfAttention")) and hasattr(
                module, "q_proj"
            ):
                module.q_proj.weight.mul_(6.0)
    return model


def prompt(*parts, images=1):
    """Token ids: the parts (lists of ids) around `images` runs of placeholders."""
    ids = list(parts[0])
    for part in parts[1:]:
        ids += [IMAGE_TOKEN] * PATCHES
        ids += list(part)
    return ids


def left_pad(rows):
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def images(count, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)


@pytest.fixture(params=["clip", "dinov2"])
def model(request):
    return tiny_llava(request.param)


def varied_images():
    """Three images whose [CLS] attention has different numbers of IQR outliers."""
    pixels = images(3, seed=1)
    pixels[1] *= 3
    pixels[2] *= 0.1
    return pixels
