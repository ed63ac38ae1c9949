"""The training loop: reduction in the loop, projector, prompt embeddings and LoRA.

Every step draws one reduction from the run's mixture (``prumerge.train.mixture``), patches
the model with ``prumerge.apply`` and builds the language model's inputs with the handle's
``prepare_inputs``: the same code that ``model(**inputs, labels=...)`` and ``generate`` run
when serving. The vision tower (frozen) runs on the batch's images, the method reduces its
patch features, and the projector maps the kept and merged tokens, so gradients flow through
the merged features into the projector; the language model (frozen, or with LoRA adapters)
then sees exactly the tokens it will see at inference. The loss is the cross-entropy of the
answer tokens only, and the LM head runs only where an answer token is predicted.

Runs checkpoint atomically and resume; the same command continues an interrupted run and a
different configuration is refused, naming the fields that differ. Launched with torchrun
(``torchrun --nproc-per-node 2 -m prumerge train ...``) the global batch is split over the
processes (gloo on CPU, NCCL on GPUs), each process sums its answer tokens' losses and the
gradients are summed, so the weights equal a one-process run's with the same global batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from prumerge.errors import PrumergeError
from prumerge.train.config import TrainConfig, check_config, config_difference
from prumerge.train.packing import (
    IGNORE,
    TrainSequence,
    collate,
    encode_chat,
    encode_isolated_turns,
)

__all__ = ["batch_order", "lr_at", "train"]


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(obj: Any, path: Path) -> None:
    _atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def tune_allocator() -> bool:
    """Keep freed activation memory in the process for the next step (glibc only).

    A training step allocates and frees gigabytes of activations whose sizes change with every
    batch. glibc's default returns large blocks to the system and raises its mmap threshold as
    it goes, so every step page-faults its memory back in: on the 2-core CPU a step took 20-40
    s instead of 10-13 s, a third of it in the kernel. With a fixed 32 MB mmap threshold, no
    trimming and two arenas, blocks are reused: the same 14-step probe ran at 10.5-13 s a step
    with a flat 5.2 GB resident. (jemalloc without purging grew by 1.3 GB a step.)

    Returns:
        Whether the settings were applied.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    m_trim_threshold, m_top_pad, m_mmap_threshold, m_arena_max = -1, -2, -3, -8
    settings = (
        (m_mmap_threshold, 32 * 2**20),  # the largest glibc accepts
        (m_trim_threshold, 2**31 - 1),
        (m_top_pad, 512 * 2**20),
        (m_arena_max, 2),
    )
    return all(libc.mallopt(option, value) == 1 for option, value in settings)


def lr_at(step: int, peak: float, warmup: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to zero over ``steps``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batch_order(num_items: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Item indices of a step's batch: a fresh seeded permutation each epoch, so any step's
    batch is known without replaying earlier ones (needed for exact resumption)."""
    per_epoch = max(1, num_items // batch_size)
    epoch, offset = divmod(step, per_epoch)
    perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return perm[offset * batch_size : (offset + 1) * batch_size].tolist()


class _Dist:
    """This process's place in a torchrun launch (one process when there is none)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = torch.device("cpu")
        if self.world > 1:
            import torch.distributed as dist

            if torch.cuda.is_available():
                local = int(os.environ.get("LOCAL_RANK", "0"))
                self.device = torch.device("cuda", local)
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast_error(self, error: str | None) -> None:
        """Raise the same error on every process when any one of them failed a check."""
        if self.world == 1:
            if error:
                raise PrumergeError(error)
            return
        import torch.distributed as dist

        errors: list[str | None] = [None] * self.world
        dist.all_gather_object(errors, error)
        first = next((e for e in errors if e), None)
        if first:
            raise PrumergeError(first)


def _prepare_output(cfg: TrainConfig, out: Path) -> str | None:
    """Create the run directory, or refuse one holding a run of another configuration."""
    config_path = out / "config.json"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"--output-dir {out}: {exc.strerror or exc}"
    if (out / "checkpoint.pt").is_file() and config_path.is_file():
        recover = f"delete {out} (its checkpoint is of an unknown configuration) or use another --output-dir"  # noqa: E501
        try:
            old = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            return f"{config_path} is damaged (line {exc.lineno}: {exc.msg}); {recover}"
        except (OSError, UnicodeDecodeError):
            return f"{config_path} is unreadable; {recover}"
        if not isinstance(old, dict):
            return f"{config_path} is damaged (not a JSON object); {recover}"
        differences = config_difference(old, cfg)
        if differences:
            return (
                f"{out} holds a checkpoint of a different configuration "
                f"({'; '.join(differences)}); use another --output-dir"
            )
    atomic_write_json(dataclasses.asdict(cfg), config_path)
    return None


def _trim_metrics(path: Path, step: int) -> None:
    """Drop metric records past the checkpoint being resumed (they will be written again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a torn last line from a killed run
    _atomic_write_text("".join(line + "\n" for line in kept), path)


def _load_model(cfg: TrainConfig) -> tuple[Any, Any, Any]:
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


def _placeholders_per_image(processor: Any) -> int:
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


class _Trainables:
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


# The LLM's input width is rounded up to a multiple of this. Reduction makes every step's width
# different; CPU kernels (oneDNN) build and cache a kernel per shape, and with a new shape at
# every step that cache grew by gigabytes an hour. Padding is masked, so results are unchanged.
PAD_MULTIPLE = 64


def _pad_width(prepared: dict[str, Any], multiple: int) -> dict[str, Any]:
    """Right-pad ``prepare_inputs``' output (4-D mask) to a width that is a multiple."""
    embeds = prepared["inputs_embeds"]
    batch, width, _ = embeds.shape
    extra = -width % multiple
    if extra == 0:
        return prepared
    new = width + extra
    mask = prepared["attention_mask"]  # (B, 1, L, L) bool
    grown = torch.zeros((batch, mask.shape[1], new, new), dtype=mask.dtype)
    grown[:, :, :width, :width] = mask
    grown[:, :, torch.arange(width, new), torch.arange(width, new)] = True  # pads see themselves
    return {
        "inputs_embeds": F.pad(embeds, (0, 0, 0, extra)),
        "attention_mask": grown,
        "position_ids": F.pad(prepared["position_ids"], (0, extra)),
        "labels": F.pad(prepared["labels"], (0, extra), value=IGNORE),
    }


def step_loss(
    model: Any,
    processor: Any,
    method: str,
    options: dict[str, Any],
    images: list[Any],
    sequences: list[TrainSequence],
    normaliser: float,
) -> tuple[torch.Tensor, int]:
    """Summed answer-token cross-entropy of a batch under one reduction, over ``normaliser``.

    Returns:
        ``(loss, visual tokens the LLM saw)``.
    """
    import prumerge

    pad_id = processor.tokenizer.pad_token_id
    batch = collate(sequences, 0 if pad_id is None else pad_id)
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with prumerge.apply(model, method, **options) as handle:
        prepared = handle.prepare_inputs(
            batch.input_ids,
            pixels,
            attention_mask=batch.attention_mask,
            labels=batch.labels,
            position_ids=batch.position_ids,
        )
        visual = sum(handle.stats.tokens_out)
    prepared = _pad_width(prepared, PAD_MULTIPLE)
    lm = model.model.language_model
    hidden = lm(
        inputs_embeds=prepared["inputs_embeds"],
        attention_mask=prepared["attention_mask"],
        position_ids=prepared["position_ids"],
    ).last_hidden_state  # (B, L', C)
    # Position t predicts token t + 1; the LM head runs only where that is an answer token.
    target = prepared["labels"][:, 1:]
    keep = target != IGNORE
    logits = model.lm_head(hidden[:, :-1][keep])  # (T, V)
    loss = F.cross_entropy(logits.float(), target[keep], reduction="sum") / normaliser
    return loss, visual


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run, evaluate it and write its artefacts.

    Writes into ``cfg.output_dir``: ``config.json``; ``checkpoint.pt`` every
    ``checkpoint_every`` steps; ``metrics.jsonl`` (loss, learning rate, gradient norm,
    reduction, visual tokens and time per step); at the end ``projector-<res>.safetensors``
    (the default model; ``projector.safetensors`` for ``--model``), ``lora/`` (peft's adapter
    files) with ``--lora-rank``, and ``report.json`` (config, wall times, evaluation). With
    ``install``, the weights are copied into the package as that variant.

    Returns:
        The report.
    """
    from prumerge.train.mixture import draw, parse_mixture

    check_config(cfg)
    mixture = parse_mixture(cfg.reduce)
    tune_allocator()
    dist = _Dist()
    out = Path(cfg.output_dir)
    dist.broadcast_error(_prepare_output(cfg, out) if dist.main else None)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    started = time.time()
    if dist.main:
        _log(f"building the model ({cfg.model or 'embedded default'}), seed {cfg.seed}")
    model, processor, encode = _load_model(cfg)
    num_image_tokens = _placeholders_per_image(processor)

    from prumerge.train.items import default_model_items, llava_json_items

    if cfg.uses_default_model:
        items, num_primary = default_model_items(cfg, _log if dist.main else lambda _m: None)
    else:
        items = llava_json_items(cfg)
        num_primary = len(items)
    if num_primary < cfg.batch_size:
        raise PrumergeError(f"--batch-size {cfg.batch_size} is larger than the {num_primary} items")
    sequences = [encode(turns, num_image_tokens) for _, turns in items]
    trainables = _Trainables(cfg, model, processor, items)
    if dist.main:
        lengths = [len(s.input_ids) for s in sequences]
        _log(
            f"{num_primary} + {len(items) - num_primary} items ({cfg.packing} packing), "
            f"mean length {sum(lengths) / len(lengths):.0f} tokens; reductions: "
            + ", ".join(f"{e.label} x{e.weight:g}" for e in mixture)
        )

    def batch_at(step: int) -> list[int]:
        index = batch_order(num_primary, cfg.batch_size, step, cfg.seed)
        if cfg.synth_per_batch > 0:
            extra = batch_order(len(items) - num_primary, cfg.synth_per_batch, step, cfg.seed + 1)
            index += [num_primary + i for i in extra]
        return index

    groups = trainables.groups()
    optimizer = torch.optim.AdamW(groups, lr=groups[0]["peak"], weight_decay=cfg.weight_decay)
    parameters = [p for g in groups for p in g["params"]]
    step, train_seconds = 0, 0.0
    ckpt_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    if ckpt_path.is_file():
        try:
            ckpt = torch.load(ckpt_path, weights_only=False)
        except Exception as exc:  # a torn or foreign file: say which and stop
            raise PrumergeError(
                f"{ckpt_path} cannot be read ({type(exc).__name__}); delete it"
            ) from None
        trainables.load(ckpt["trainables"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, train_seconds = ckpt["step"], ckpt["train_seconds"]
        torch.set_rng_state(ckpt["torch_rng"])
        if dist.main:
            _trim_metrics(metrics_path, step)
            _log(f"resumed from step {step}")

    def checkpoint() -> None:
        if dist.main:
            state = {
                "trainables": trainables.state(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "train_seconds": train_seconds,
                "torch_rng": torch.get_rng_state(),
            }
            _atomic_save(state, ckpt_path)
        dist.barrier()

    from tqdm.auto import tqdm

    metrics = open(metrics_path, "a") if dist.main else None  # noqa: SIM115 - kept for the loop
    bar = tqdm(
        total=cfg.steps,
        initial=step,
        desc="train",
        unit="step",
        disable=not dist.main,
        dynamic_ncols=True,
        mininterval=5.0,
        file=sys.stderr,
    )
    model.train(False)  # no dropout anywhere; frozen weights stay frozen
    stopped_early, running = False, []
    while step < cfg.steps:
        if cfg.time_budget_min is not None and train_seconds > cfg.time_budget_min * 60:
            if dist.main:
                _log(f"time budget of {cfg.time_budget_min} min reached at step {step}; stopping")
            stopped_early = True
            break
        t0 = time.time()
        index = batch_at(step)
        mine = index[dist.rank :: dist.world]
        reduction = draw(mixture, cfg.seed, step)
        lr_scale = lr_at(step, 1.0, cfg.warmup_steps, cfg.steps)
        for group in optimizer.param_groups:
            group["lr"] = group["peak"] * lr_scale
        # Every process knows the global batch, so the normaliser needs no communication.
        answer_tokens = sum(int((sequences[i].labels != IGNORE).sum()) for i in index)
        optimizer.zero_grad(set_to_none=True)
        # Micro-batches bound the activation memory; their summed losses, each over the
        # global normaliser, give exactly the gradient of the whole batch.
        size = cfg.micro_batch or len(mine)
        loss, visual = torch.zeros(()), 0
        for start in range(0, len(mine), size):
            part = mine[start : start + size]
            part_loss, part_visual = step_loss(
                model,
                processor,
                reduction.method,
                reduction.options(),
                [items[i][0]() for i in part],
                [sequences[i] for i in part],
                float(answer_tokens),
            )
            part_loss.backward()
            loss, visual = loss + part_loss.detach(), visual + part_visual
        for p in parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if dist.world > 1:
            flat = torch.cat([p.grad.reshape(-1) for p in parameters])
            dist.sum(flat)
            offset = 0
            for p in parameters:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(parameters, cfg.grad_clip)
            if cfg.grad_clip
            else torch.tensor(0.0)
        )
        optimizer.step()
        step += 1
        dt = time.time() - t0
        train_seconds += dt
        total_loss = float(dist.sum(loss.detach().clone()))
        running.append(total_loss)
        if metrics is not None:
            record = {
                "step": step,
                "loss": round(total_loss, 5),
                "lr_scale": round(lr_scale, 6),
                "grad_norm": round(float(grad_norm), 4),
                "reduce": reduction.label,
                "visual_tokens": visual,
                "answer_tokens": answer_tokens,
                "step_s": round(dt, 3),
            }
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        bar.set_postfix(loss=f"{total_loss:.3f}", reduce=reduction.label, refresh=False)
        bar.update(1)
        if dist.main and (step % cfg.log_every == 0 or step == cfg.steps):
            eta = (cfg.steps - step) * train_seconds / max(1, step)
            _log(
                f"step {step}/{cfg.steps} loss {sum(running) / len(running):.4f} "
                f"lr x{lr_scale:.3f} {dt:.1f} s/step, eta {eta / 60:.1f} min"
            )
            running = []
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            checkpoint()
    bar.close()
    checkpoint()
    if metrics is not None:
        metrics.close()
    report: dict[str, Any] = {}
    if dist.main:
        report = _finish(cfg, out, model, trainables, step, train_seconds, stopped_early, mixture)
        report["run_wall_s"] = round(time.time() - started, 1)
        atomic_write_json(report, out / "report.json")
        if cfg.install:
            from prumerge.train.install import install_variant

            install_variant(out, cfg.install, cfg.resolution)
    dist.barrier()
    return report


def weights_name(cfg: TrainConfig) -> str:
    return (
        f"projector-{cfg.resolution}.safetensors"
        if cfg.uses_default_model
        else "projector.safetensors"
    )


def _finish(
    cfg: TrainConfig,
    out: Path,
    model: Any,
    trainables: _Trainables,
    step: int,
    train_seconds: float,
    stopped_early: bool,
    mixture: list[Any],
) -> dict[str, Any]:
    """Write the trained weights, evaluate the default model as it ships, and report."""
    from safetensors.torch import save_file

    state = trainables.shipped_projector()
    save_file(state, str(out / weights_name(cfg)), metadata={"resolution": str(cfg.resolution)})
    lora_dir = None
    if trainables.peft is not None:
        from prumerge.train.lora import save_lora

        lora_dir = save_lora(trainables.peft, out / "lora")
    _log(f"trained {step} steps in {train_seconds / 60:.1f} min; wrote {out}")
    evaluation: dict[str, Any] = {}
    eval_seconds = 0.0
    if cfg.uses_default_model and (cfg.eval_images != 0 or cfg.eval_scenes > 0):
        from prumerge.models.default import build_default_model
        from prumerge.train.evaluate import evaluate_easy_vqa, evaluate_synth

        trainables.restore()
        del model
        shipped, processor = build_default_model(cfg.resolution, projector=state, lora=lora_dir)
        start = time.time()
        for entry in [None] + [e for e in mixture if e.label != "none"]:
            method = "none" if entry is None else entry.method
            options = {} if entry is None else entry.options()
            label = "none" if entry is None else entry.label
            if cfg.eval_images != 0:
                result = evaluate_easy_vqa(
                    shipped,
                    processor,
                    cfg.eval_images,
                    method=method,
                    options=options,
                    batch_images=cfg.eval_batch_images,
                )
                evaluation.setdefault("easy-vqa", {})[label] = result
                _log(f"easy-vqa, {label}: {json.dumps(result['accuracy'])}")
            if cfg.eval_scenes > 0:
                result = evaluate_synth(
                    shipped,
                    processor,
                    cfg.eval_scenes,
                    method=method,
                    options=options,
                    batch_images=cfg.eval_batch_images,
                )
                evaluation.setdefault("synth", {})[label] = result
                _log(f"synth, {label}: {json.dumps(result['accuracy'])}")
        eval_seconds = time.time() - start
    elif cfg.save_merged and not cfg.uses_default_model:
        trainables.restore()
        if trainables.peft is not None:
            merged = trainables.peft.to(torch.float32).merge_and_unload()
            model.model.language_model = merged
        model.to(torch.float32).save_pretrained(str(out / "merged"))
        _log(f"saved the merged model into {out / 'merged'}")
    return {
        "command": cfg.command,
        "config": dataclasses.asdict(cfg),
        "steps_done": step,
        "stopped_early": stopped_early,
        "train_wall_s": round(train_seconds, 1),
        "eval_wall_s": round(eval_seconds, 1),
        "final_loss_mean_last_50": _mean_recent_loss(out / "metrics.jsonl", 50),
        "eval": evaluation or None,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }


def _mean_recent_loss(path: Path, count: int) -> float | None:
    if not path.is_file():
        return None
    losses = [json.loads(line)["loss"] for line in path.read_text().splitlines() if line.strip()]
    return round(sum(losses[-count:]) / len(losses[-count:]), 5) if losses else None
