"""Adaptive budgets served exactly: the multimodal processor counts and reduces each image.

vLLM writes an image's placeholder tokens into the prompt in its multimodal processor,
before the model's encoder runs; PruMerge's count comes from the image's attention. So for
an adaptive budget the plugin's processor does the vision side itself:

1. it runs the image processor (pixel values), then the vision tower (the transformers
   module, with the checkpoint's weights) and the method's ``reduce``, through the Hugging
   Face adapter's own ``ViTTower``: the same code, so the same count and tokens;
2. it hands the reduced tokens (before the projector) and their count on as the item's
   processor outputs, and writes exactly that many placeholders;
3. the model only projects them (``embed_multimodal``).

The selection happens once, here, and never again in the model, so the count in the prompt
and the tokens scattered into it cannot disagree. vLLM's processor cache keys an item by its
image's hash and keeps these outputs, and prefix caching hashes the same image the same way:
the same image gives the same count and tokens, and a cached image skips the tower.

The tower runs on the CPU in float32 in each process that processes prompts: the front end
(once per distinct image) and the engine's workers (only for the memory-profiling run).
"""

from __future__ import annotations

import glob
import os
import re
import threading

import torch
from torch import nn

from prumerge.adapters.towers import ViTTower
from prumerge.errors import PrumergeError
from prumerge.methods import VisionMethod
from prumerge.serve.vllm.towers import DINOV2_RENAMES, tower_kind

#: The processor output fields of an adaptive item.
FEATURES = "prumerge_tokens"
COUNTS = "prumerge_count"

_LOCK = threading.Lock()


def _checkpoint_files(model: str, revision: str | None) -> list[str]:
    if os.path.isdir(model):
        files = sorted(glob.glob(os.path.join(model, "*.safetensors")))
    else:
        from huggingface_hub import snapshot_download

        root = snapshot_download(model, revision=revision, allow_patterns=["*.safetensors"])
        files = sorted(glob.glob(os.path.join(root, "*.safetensors")))
    if not files:
        raise PrumergeError(f"no .safetensors weights found for {model!r}")
    return files


def _tower_state(files: list[str], kind: str) -> dict[str, torch.Tensor]:
    """The vision tower's weights from the checkpoint, named as the transformers module's."""
    from safetensors import safe_open

    state = {}
    prefix = re.compile(r"^(?:model\.)?vision_tower\.")
    for path in files:
        with safe_open(path, "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                if not prefix.match(name):
                    continue
                local = prefix.sub("", name)
                if kind == "dinov2":
                    for old, new in DINOV2_RENAMES.items():
                        local = local.replace(old, new)
                elif not local.startswith("vision_model."):
                    local = "vision_model." + local  # transformers 5 saves it without
                state[local] = handle.get_tensor(name)
    return state


class ProcessorTower:
    """The vision tower and the method, run in the multimodal processor.

    Args:
        model: the served checkpoint (a directory or a hub name).
        revision: its revision, for a hub name.
        config: the model's LLaVA config.
        method: the built reduction method (adaptive).
    """

    def __init__(self, model: str, revision: str | None, config, method: VisionMethod) -> None:
        from transformers import AutoModel

        kind = tower_kind(config.vision_config)
        tower: nn.Module = AutoModel.from_config(config.vision_config)
        state = _tower_state(_checkpoint_files(model, revision), kind)
        missing, _unexpected = tower.load_state_dict(state, strict=False)
        missing = [n for n in missing if "mask_token" not in n]
        if missing:
            raise PrumergeError(
                f"the checkpoint {model!r} lacks vision tower weights: {', '.join(missing[:4])}"
            )
        self.tower = tower.float().eval()
        self.method = method
        self.vit = ViTTower(self.tower, config, method)
        #: Images reduced so far in this process (the processor cache skips repeats).
        self.images_reduced = 0

    @torch.inference_mode()
    def reduce(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Each image's tokens for the projector: (R + K_i, C), registers first."""
        out = self.vit.run(pixel_values.float())
        self.images_reduced += len(pixel_values)
        reduction = self.method.reduce(out.inputs)
        passthrough = out.passthrough.to(reduction.tokens.dtype)
        tokens = torch.cat([passthrough, reduction.tokens], dim=1)
        lengths = (reduction.lengths + passthrough.shape[1]).tolist()
        return [row[:n].clone() for row, n in zip(tokens, lengths, strict=True)]


_TOWERS: dict[tuple[str, str | None, str], ProcessorTower] = {}


def processor_tower(model: str, revision: str | None, config, method_key: str) -> ProcessorTower:
    """One ``ProcessorTower`` per process and served model (loaded on first use).

    Args:
        method_key: the served method config's JSON (built again from the config here).
    """
    from prumerge.serve.config import CONFIG_KEY, parse_serve_config

    key = (model, revision, method_key)
    with _LOCK:
        if key not in _TOWERS:
            method = parse_serve_config(getattr(config, CONFIG_KEY)).build()
            _TOWERS[key] = ProcessorTower(model, revision, config, method)
        return _TOWERS[key]


def max_count(num_patches: int, num_passthrough: int) -> int:
    """The most tokens an adaptive image can send: every patch, the supplement token and
    the registers (vLLM's memory profiling and encoder budget use it)."""
    return num_patches + 1 + num_passthrough
