"""Qwen2.5-VL for vLLM with reduced visual tokens, counted and reduced in the processor.

vLLM's own Qwen2.5-VL module cannot be imported beside the CPU build of torch: its
``qwen2_vl`` module imports ``smart_resize`` from transformers' torchvision image processor.
This module needs neither: the processor is transformers' PIL one (``prumerge.loading``
builds it without the torchvision video part), and the vision side runs in vLLM's
multimodal processor, as for adaptive LLaVA budgets (``adaptive.py``):

1. the image processor gives the patches and ``image_grid_thw``; the transformers vision
   tower (the checkpoint's ``visual.*`` weights) and the method run through the Hugging Face
   adapter's own ``Qwen25VLAdapter.encode``: the same code, so the same tokens;
2. each image's reduced tokens (after the PatchMerger, the LLM's width), their count and
   their anchors (the merged-grid cell each token stands at) are the item's processor
   outputs, and exactly that many placeholders are written;
3. ``get_mrope_input_positions`` gives every kept token the 3-D M-RoPE position of its cell
   in the unreduced grid, and the text after an image the positions it has without
   reduction, as the adapter does; decoding continues from there. vLLM's EVS video pruning
   keeps positions the same way, but recomputes them after the encoder; here the kept cells
   are known when the request's positions are computed, so nothing is recomputed.

The language model is vLLM's ``Qwen2ForCausalLM`` with M-RoPE. Fixed and adaptive budgets
take the same route; the count is each image's own either way.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from types import SimpleNamespace

import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.model_executor.models.interfaces import SupportsMRoPE, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageSize, MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)
from vllm.sequence import IntermediateTensors

from prumerge.errors import PrumergeError
from prumerge.serve.config import QWEN_ARCHITECTURE, ServeConfig
from prumerge.serve.config import serve_config_of as config_entry
from prumerge.serve.positions import ReducedImage, reduced_mrope_positions
from prumerge.serve.vllm.adaptive import COUNTS, FEATURES, _checkpoint_files

#: The merged-grid cell (raster order) each reduced token stands at: its M-RoPE position.
ANCHORS = "prumerge_anchors"

_LOCK = threading.Lock()


def serve_config_of(hf_config) -> ServeConfig:
    """The validated ``prumerge`` entry of a served Qwen2.5-VL's config (on the projector's
    outputs)."""
    return config_entry(hf_config, architecture=QWEN_ARCHITECTURE, keep=16, projected=True)


class QwenProcessorTower:
    """The transformers Qwen2.5-VL vision tower and the method, run in the processor.

    Args:
        model: the served checkpoint (a directory or a hub name).
        revision: its revision, for a hub name.
        config: the model's Qwen2.5-VL config.
        method: the built reduction method.
    """

    def __init__(self, model: str, revision: str | None, config, method) -> None:
        from safetensors import safe_open
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel,
        )

        from prumerge.adapters.qwen2_5_vl import Qwen25VLAdapter

        visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(config.vision_config)
        prefix = re.compile(r"^(?:model\.)?visual\.")
        state = {}
        for path in _checkpoint_files(model, revision):
            with safe_open(path, "pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if prefix.match(name):
                        state[prefix.sub("", name)] = handle.get_tensor(name)
        missing, _ = visual.load_state_dict(state, strict=False)
        if missing:
            raise PrumergeError(
                f"the checkpoint {model!r} lacks vision tower weights: {', '.join(missing[:4])}"
            )
        visual = visual.float().eval()
        # The adapter reads only model.model.visual and model.config.
        shell = SimpleNamespace(model=SimpleNamespace(visual=visual), config=config)
        self.adapter = Qwen25VLAdapter(shell, method)  # type: ignore[arg-type]
        self.images_reduced = 0

    @torch.inference_mode()
    def reduce(
        self, pixel_values: torch.Tensor, grid: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each image's reduced tokens (K_i, H) and anchors (K_i,)."""
        encoded = self.adapter.encode(
            {"pixel_values": pixel_values.float(), "image_grid_thw": grid}
        )
        self.images_reduced += len(grid)
        tokens = [t.float().clone() for t in encoded.features]
        anchors = [a.long().clone() for a in encoded.anchors]
        return tokens, anchors


_TOWERS: dict[tuple[str, str | None, str], QwenProcessorTower] = {}


def processor_tower(model: str, revision: str | None, config) -> QwenProcessorTower:
    """One tower per process and served model (loaded on first use)."""
    serve = serve_config_of(config)
    key = (model, revision, json.dumps(serve.as_dict(), sort_keys=True))
    with _LOCK:
        if key not in _TOWERS:
            _TOWERS[key] = QwenProcessorTower(model, revision, config, serve.build())
        return _TOWERS[key]


# -- processing --------------------------------------------------------------------------
class PrumergeQwenProcessingInfo(BaseProcessingInfo):
    """Qwen2.5-VL processing with each image's reduced count of placeholders."""

    @cached_property
    def serve_config(self) -> ServeConfig:
        return serve_config_of(self.get_hf_config())

    def get_hf_processor(self, **kwargs: object):
        return self._hf_processor

    @cached_property
    def _hf_processor(self):
        from prumerge.loading.checkpoint import load_processor

        return load_processor(self.ctx.model_config.model)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def processor_tower(self) -> QwenProcessorTower:
        model_config = self.ctx.model_config
        return processor_tower(model_config.model, model_config.revision, self.get_hf_config())

    @cached_property
    def _largest(self) -> tuple[int, int]:
        """(height, width) in pixels of the image with the most patches, and its merged cells."""
        processor = self.get_hf_processor().image_processor
        unit = processor.patch_size * processor.merge_size
        max_pixels = processor.size["longest_edge"]
        side = max(unit, int(max_pixels**0.5) // unit * unit)
        return side, side

    def get_image_size_with_most_features(self) -> ImageSize:
        height, width = self._largest
        return ImageSize(width=width, height=height)

    def get_mm_max_tokens_per_item(
        self, seq_len: int, mm_counts: Mapping[str, int]
    ) -> Mapping[str, int]:
        # vLLM asks this first, in the front end, before any engine process starts: a config
        # the plugin cannot serve fails here, in one line.
        serve_config_of(self.get_hf_config())
        processor = self.get_hf_processor().image_processor
        height, width = self._largest
        cells = (height // processor.patch_size) * (width // processor.patch_size)
        # Every merged cell and a supplement token: the most a reduced image sends.
        return {"image": cells // processor.merge_size**2 + 1}


class PrumergeQwenDummyInputsBuilder(BaseDummyInputsBuilder[PrumergeQwenProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return "<|vision_start|><|image_pad|><|vision_end|>" * mm_counts.get("image", 0)

    def get_dummy_mm_data(
        self,
        seq_len: int,
        mm_counts: Mapping[str, int],
        mm_options: Mapping[str, MultiModalDummyOptions],
    ):
        size = self.info.get_image_size_with_most_features()
        return {
            "image": self._get_dummy_images(
                width=size.width,
                height=size.height,
                num_images=mm_counts.get("image", 0),
                overrides=mm_options.get("image"),
            )
        }


class PrumergeQwenMultiModalProcessor(BaseMultiModalProcessor[PrumergeQwenProcessingInfo]):
    """Runs the image processor, the tower and the reduction; writes each image's count."""

    def _call_hf_processor(
        self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        images = hf_data.get("images")
        if not images:
            return BatchFeature()
        processor = self.info.get_hf_processor().image_processor
        pixels = processor(images=images, return_tensors="pt")
        grid = pixels["image_grid_thw"]
        tokens, anchors = self.info.processor_tower().reduce(pixels["pixel_values"], grid)
        return BatchFeature(
            {
                FEATURES: torch.cat(tokens),
                ANCHORS: torch.cat(anchors),
                COUNTS: torch.tensor([len(t) for t in tokens]),
                "image_grid_thw": grid,
            }
        )

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        counts = hf_inputs.get(COUNTS, torch.empty(0, dtype=torch.long))
        return {
            FEATURES: MultiModalFieldConfig.flat_from_sizes("image", counts),
            ANCHORS: MultiModalFieldConfig.flat_from_sizes("image", counts),
            COUNTS: MultiModalFieldConfig.batched("image"),
            "image_grid_thw": MultiModalFieldConfig.batched("image"),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image_token_id = self.info.get_hf_config().image_token_id

        def replacement(item_idx: int) -> list[int]:
            count = int(out_mm_kwargs["image"][item_idx][COUNTS].data)
            return [image_token_id] * count

        return [
            PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)
        ]


# -- the model ---------------------------------------------------------------------------
@MULTIMODAL_REGISTRY.register_processor(
    PrumergeQwenMultiModalProcessor,
    info=PrumergeQwenProcessingInfo,
    dummy_inputs=PrumergeQwenDummyInputsBuilder,
)
class PrumergeQwen2_5_VLForConditionalGeneration(  # noqa: N801 (vLLM's naming)
    nn.Module, SupportsMultiModal, SupportsMRoPE, SupportsPP
):
    """Qwen2.5-VL whose images arrive reduced from the processor; vLLM's Qwen2 LLM."""

    # Checkpoint names (the original layout and transformers 5's) -> module names here; the
    # processor runs the tower, so its weights are dropped.
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            "visual.": None,
            "model.visual.": None,
            "model.language_model.": "language_model.model.",
            "model.": "language_model.model.",
            "lm_head.": "language_model.lm_head.",
        }
    )
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<|vision_start|><|image_pad|><|vision_end|>"
        raise ValueError("only images are supported")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.serve_config = serve_config_of(config)
        self.configure_mm_token_handling(
            vocab_size=config.text_config.vocab_size, mm_token_ids=[config.image_token_id]
        )
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                prefix=maybe_prefix(prefix, "language_model"),
                architectures=["Qwen2ForCausalLM"],
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def embed_multimodal(self, **kwargs: object) -> list[torch.Tensor]:
        tokens, counts = kwargs.get(FEATURES), kwargs.get(COUNTS)
        if tokens is None:
            return []
        if isinstance(tokens, torch.Tensor):  # all items' tokens, concatenated
            sizes = torch.as_tensor(counts).reshape(-1).tolist()
            tokens = list(tokens.split(sizes))
        dtype = self.language_model.model.embed_tokens.weight.dtype
        return [t.to(dtype) for t in tokens]  # type: ignore[union-attr]

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list
    ) -> tuple[torch.Tensor, int]:
        """(3, L) M-RoPE positions of the reduced prompt and the decoding delta: every kept
        token at its cell of the unreduced grid (``prumerge.serve.positions``)."""
        merge = self.config.vision_config.spatial_merge_size
        images = []
        for feature in mm_features:
            _, h, w = feature.data["image_grid_thw"].data.tolist()
            anchors = feature.data[ANCHORS].data
            images.append(
                ReducedImage(feature.mm_position.offset, (h // merge, w // merge), anchors)
            )
        return reduced_mrope_positions(len(input_tokens), images)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(
            input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds
        )

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
