"""The model a run trains and its trainable parts: loading it with the encoder of its chat
format, and the projector, prompt embeddings and LoRA adapters put into it for the run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from prumerge.errors import PrumergeError
from prumerge.train.config import TrainConfig
from prumerge.train.packing import TrainSequence, encode_chat, encode_isolated_turns


def load_model(cfg: TrainConfig) -> tuple[Any, Any, Any]:
    """``(model, processor, encode)`` where ``encode(turns, num_image_tokens)`` packs an item."""
    if cfg.uses_default_model:
        from prumerge.models.default import build_default_model, format_prompt

        model, processor = build_default_model(
            cfg.resolution, projector=None, seed=cfg.seed, num_prompt_tokens=cfg.prompt_tokens
        )

        def prompt_fn(question: str) -> str:
            return format_prompt(processor, question)

        def render(messages: list[dict[str, Any]], generation: bool) -> str:
            return processor.apply_chat_template(
                messages, add_generation_prompt=generation, tokenize=False
            )

        def encode(turns: Sequence[tuple[str, str]], n: int) -> TrainSequence:
            if cfg.packing == "isolated":
                return encode_isolated_turns(processor, turns, n, prompt_fn, "<|im_end|>")
            return encode_chat(processor, turns, n, render)

        return model, processor, encode

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    try:
        model = LlavaForConditionalGeneration.from_pretrained(cfg.model, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(cfg.model)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PrumergeError(f"--model {cfg.model}: cannot load it: {first}") from None

    def render_hf(messages: list[dict[str, Any]], generation: bool) -> str:
        if getattr(processor, "chat_template", None):
            return processor.apply_chat_template(
                messages, add_generation_prompt=generation, tokenize=False
            )
        # LLaVA-1.5's plain format, for checkpoints that ship no template.
        text = ""
        for message in messages:
            parts = message["content"]
            body = "".join(
                processor.image_token + "\n" if p["type"] == "image" else p["text"] for p in parts
            )
            text += f"USER: {body} " if message["role"] == "user" else f"ASSISTANT: {body}</s>"
        return text + ("ASSISTANT:" if generation else "")

    def encode_hf(turns: Sequence[tuple[str, str]], n: int) -> TrainSequence:
        return encode_chat(processor, turns, n, render_hf)

    return model.eval(), processor, encode_hf


def placeholders_per_image(processor: Any) -> int:
    """How many placeholders the processor expands one image to (counted, not assumed)."""
    from PIL import Image

    token = getattr(processor, "image_token", "<image>")
    image_id = processor.tokenizer.convert_tokens_to_ids(token)
    ids = processor(images=[Image.new("RGB", (32, 32))], text=token, return_tensors="pt")
    return int((ids["input_ids"] == image_id).sum())


@torch.no_grad()
def _patch_features(model: Any, processor: Any, images: list[Any]) -> torch.Tensor:
    """(I, N, C) projector inputs: the selected vision layer's patch tokens, [CLS] dropped."""
    tower = model.model.vision_tower
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    hidden = tower(pixels.to(tower.dtype), output_hidden_states=True).hidden_states
    return hidden[model.config.vision_feature_layer][:, 1:].float()


class Trainables:
    """What a run trains, put into the model for the run: the projector (standardised for
    the default model), the prompt embeddings and LoRA adapters."""

    def __init__(self, cfg: TrainConfig, model: Any, processor: Any, items: list[Any]) -> None:
        from prumerge.train.modules import PromptEmbedding, StandardizedProjector

        self.cfg = cfg
        self.model = model
        lm = model.model.language_model
        for p in model.parameters():
            p.requires_grad_(False)
        self.original_projector = model.model.multi_modal_projector
        self.projector: Any = self.original_projector
        if cfg.uses_default_model:
            count = min(cfg.stats_images, len(items))
            sample = _patch_features(model, processor, [items[i][0]() for i in range(count)])
            sample = sample.flatten(0, 1)  # (count * N, C)
            self.projector = StandardizedProjector(
                self.original_projector, sample.mean(0), sample.std(0).clamp_min(1e-6)
            )
            model.model.multi_modal_projector = self.projector
        if cfg.init_projector is not None:
            from prumerge.models.default import load_projector_state, split_projector_state

            state, prompt = split_projector_state(load_projector_state(cfg.init_projector))
            try:
                if isinstance(self.projector, StandardizedProjector):
                    self.projector.load_folded(state)
                else:
                    self.projector.load_state_dict(state)
            except (RuntimeError, KeyError) as exc:
                raise PrumergeError(
                    f"--init-projector {cfg.init_projector} does not fit this projector: "
                    f"{str(exc).splitlines()[0]}"
                ) from None
            self.init_prompt = prompt
        else:
            self.init_prompt = None
        for p in self.original_projector.parameters():
            p.requires_grad_(cfg.train_projector)

        self.prompt: PromptEmbedding | None = None
        self.original_embedding = lm.embed_tokens
        if cfg.prompt_tokens:
            from prumerge.models.default import prompt_token_names

            ids = torch.tensor(
                processor.tokenizer.convert_tokens_to_ids(prompt_token_names(cfg.prompt_tokens))
            )
            rows = self.original_embedding.weight[ids]
            if self.init_prompt is not None:
                if self.init_prompt.shape != rows.shape:
                    raise PrumergeError(
                        f"{cfg.init_projector} holds {self.init_prompt.shape[0]} prompt "
                        f"embeddings; pass --prompt-tokens {self.init_prompt.shape[0]}"
                    )
                rows = self.init_prompt
            self.prompt = PromptEmbedding(self.original_embedding, ids, rows)
            lm.embed_tokens = self.prompt

        train_dtype = getattr(torch, cfg.train_dtype)
        lm.to(train_dtype)
        model.lm_head.to(train_dtype)
        if self.prompt is not None:
            self.prompt.rows.data = self.prompt.rows.data.float()
        self.peft: Any = None
        if cfg.lora_rank:
            from prumerge.train.lora import add_lora, load_lora_state

            targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
            self.peft = add_lora(lm, cfg.lora_rank, alpha=cfg.lora_alpha, targets=targets)
            if cfg.init_lora is not None:
                from safetensors.torch import load_file

                load_lora_state(
                    self.peft, load_file(str(Path(cfg.init_lora) / "adapter_model.safetensors"))
                )

    def groups(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        groups = []
        if cfg.train_projector:
            groups.append(
                {
                    "params": list(self.original_projector.parameters()),
                    "peak": cfg.lr,
                    "name": "projector",
                }
            )
        if self.prompt is not None:
            groups.append(
                {
                    "params": [self.prompt.rows],
                    "peak": cfg.prompt_lr,
                    "weight_decay": 0.0,
                    "name": "prompt",
                }
            )
        if self.peft is not None:
            params = [p for n, p in self.peft.named_parameters() if "lora_" in n]
            groups.append({"params": params, "peak": cfg.lora_lr, "name": "lora"})
        return groups

    def state(self) -> dict[str, Any]:
        from prumerge.train.lora import lora_state

        return {
            "projector": {k: v.clone() for k, v in self.original_projector.state_dict().items()},
            "prompt": None if self.prompt is None else self.prompt.rows.detach().clone(),
            "lora": None if self.peft is None else lora_state(self.peft),
        }

    def load(self, state: dict[str, Any]) -> None:
        from prumerge.train.lora import load_lora_state

        self.original_projector.load_state_dict(state["projector"])
        if self.prompt is not None:
            with torch.no_grad():
                self.prompt.rows.copy_(state["prompt"])
        if self.peft is not None:
            load_lora_state(self.peft, state["lora"])

    def shipped_projector(self) -> dict[str, torch.Tensor]:
        """The projector as it ships: folded onto raw features, prompt rows alongside."""
        from prumerge.models.default import PROMPT_KEY
        from prumerge.train.modules import StandardizedProjector

        if isinstance(self.projector, StandardizedProjector):
            state = self.projector.fold()
        else:
            state = {
                k: v.detach().clone().contiguous()
                for k, v in self.original_projector.state_dict().items()
            }
        if self.prompt is not None:
            state[PROMPT_KEY] = self.prompt.rows.detach().clone().contiguous()
        return state

    def restore(self) -> None:
        """Put the model's own projector and embedding back (the adapters stay injected)."""
        self.model.model.multi_modal_projector = self.original_projector
        self.model.model.language_model.embed_tokens = self.original_embedding
