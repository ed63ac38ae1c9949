"""Train the default model's projector on easy-vqa, LLaVA-style, on a CPU.

The vision tower and the LLM stay frozen; only LLaVA's 2-layer MLP projector learns. Because
the vision tower is frozen, its penultimate-layer patch features (what LLaVA's
`get_image_features` feeds the projector with `vision_feature_layer=-2` and the "default"
strategy) are computed once per image and cached under the output directory.

Each training sequence is one image with all of its question-answer turns packed together, as
LLaVA does, and the loss covers only the answers (and the `<|im_end|>` that ends each). The LM
head runs only at answer positions, which saves most of its 49k-wide matmul.

Packing is "isolated" by default: the image prefix is shared, and every turn is its own
single-question prompt that attends to the prefix and to itself only, at the positions it
would have on its own (a block mask and restarted position ids). A plain multi-turn chat
("chat" packing, the first recipe) lets later questions read earlier answers: easy-vqa asks
"what color is the shape?" and then "is there a red shape?" about the same image, so the model
learns to answer yes/no from the text and not from the image, and its training loss says
little about single-question accuracy.

Besides easy-vqa's training split, runs can mix in scenes of the generated multi-object
benchmark (`prumerge.data.synth`, train split), so that the model has seen more than one
large shape.

The run checkpoints atomically every few steps and resumes from the last checkpoint; its
config, per-step metrics and final evaluation are written as JSON. The final evaluation is
greedy-decoding exact match on easy-vqa's test split with all visual tokens, by question type.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from prumerge.data.easy_vqa import balanced_keep_rates, is_negated, load_easy_vqa, question_type
from prumerge.data.sample import SHORT_ANSWER
from prumerge.errors import PrumergeError
from prumerge.models.default import (
    DEFAULT_RESOLUTION,
    PROMPT_KEY,
    build_default_model,
    format_prompt,
    normalize_answer,
    prompt_token_names,
    user_message,
)

IGNORE = -100


@dataclass
class TrainConfig:
    """Hyper-parameters of a projector training run (all recorded in `config.json`)."""

    output_dir: str = "runs/projector"
    resolution: int = DEFAULT_RESOLUTION
    seed: int = 0
    batch_size: int = 8
    steps: int = 300
    lr: float = 1e-3
    warmup_steps: int = 15
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    checkpoint_every: int = 20
    log_every: int = 5
    train_images: int | None = None  # None: all 4,000
    eval_images: int | None = None  # None: all 1,000 test images (9,673 questions); 0: none
    eval_batch_images: int = 4
    stats_images: int = 64  # images whose features give the standardisation statistics
    init_projector: str | None = None  # start from these weights (a continued stage)
    # dtype of the frozen LLM during training; bfloat16 halves the step time on CPUs with
    # AVX512-BF16. The projector always trains in float32 and is evaluated in float32.
    train_dtype: str = "float32"
    time_budget_min: float | None = None  # stop training early past this many minutes
    # "isolated": each turn sees the image prefix and itself only; "chat": a plain multi-turn
    # chat in which later turns see earlier answers (the first recipe; kept for reproduction).
    packing: str = "isolated"
    # Fraction of turns whose question carries LLaVA's short-answer instruction (the eval
    # harness adds it; `prumerge ask` does not), so the model answers both prompt forms.
    instruction_rate: float = 0.0
    # Subsample easy-vqa's yes/no turns so that "yes" and "no" are equally frequent among
    # plain and among negated questions. easy-vqa's are 82% "no" for plain questions and 82%
    # "yes" for negated ones, a prior a frozen LLM learns instead of looking at the image.
    balance_yes_no: bool = False
    synth_scenes: int = 0  # generated training scenes to mix in (prumerge.data.synth)
    synth_per_batch: int = 0  # of them, per step, on top of `batch_size` easy-vqa images
    # Learned prompt embeddings placed before the image (`prompt_token_names`), trained with
    # the projector at their own peak learning rate; 0: none (the LLaVA-1.5 prompt).
    prompt_tokens: int = 0
    prompt_lr: float = 1e-2
    install: bool = False  # copy the final projector into the package's weights folder
    command: str = field(default="", compare=False)


# --------------------------------------------------------------------------------------------
# Data


@torch.no_grad()
def compute_patch_features(
    model, processor, paths: Sequence[Any], batch_size: int = 16, desc: str = "features"
) -> torch.Tensor:
    """Projector inputs for a list of images, exactly as LLaVA's forward computes them.

    Args:
        model: the default `LlavaForConditionalGeneration`.
        processor: its processor.
        paths: image files, or PIL images.
        batch_size: images per vision forward.

    Returns:
        (num_images, num_patches, vision_hidden) float32: hidden states of
        `config.vision_feature_layer` with the CLS token dropped ("default" strategy).
    """
    from PIL import Image

    layer = model.config.vision_feature_layer
    tower = model.model.vision_tower
    chunks = []
    start = time.time()
    for i in range(0, len(paths), batch_size):
        images = [
            (p if isinstance(p, Image.Image) else Image.open(p)).convert("RGB")
            for p in paths[i : i + batch_size]
        ]
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        hidden = tower(pixels.to(tower.dtype), output_hidden_states=True).hidden_states[layer]
        chunks.append(hidden[:, 1:].float())  # (B, N, C), CLS dropped
        done = min(i + batch_size, len(paths))
        if len(paths) > batch_size and (done == len(paths) or (i // batch_size) % 20 == 0):
            _log(f"{desc}: {done}/{len(paths)} images, {time.time() - start:.0f} s")
    return torch.cat(chunks)


def _conversation_text(
    processor, turns: Sequence[tuple[str, str]]
) -> tuple[str, list[tuple[int, int]]]:
    """Render a multi-turn chat and locate each answer (plus its end-of-turn token) in it.

    The first turn is rendered with `format_prompt`, so its text is exactly the inference
    prompt; later turns come from the same chat template without an image.

    Returns:
        `(text, spans)` with character spans `[start, end)` covering "answer<|im_end|>".
    """
    messages: list[dict[str, Any]] = []
    text = ""
    spans = []
    for k, (question, answer) in enumerate(turns):
        messages.append(user_message(question, with_image=k == 0))
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if k == 0:
            assert prompt == format_prompt(processor, question)
        messages.append({"role": "assistant", "content": answer})
        full = processor.apply_chat_template(messages, tokenize=False)
        if not (prompt.startswith(text) and full.startswith(prompt)):
            raise RuntimeError("the chat template does not render conversations incrementally")
        end_of_turn = full.rindex("<|im_end|>") + len("<|im_end|>")
        spans.append((len(prompt), end_of_turn))
        text = full
    return text, spans


def encode_conversation(
    processor, turns: Sequence[tuple[str, str]], num_image_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels of one packed training sequence.

    Args:
        processor: the default model's processor.
        turns: (question, answer) pairs about one image.
        num_image_tokens: placeholders the `<image>` token expands to.

    Returns:
        `(input_ids, labels)`, both (L,) int64; labels are -100 except on answer tokens.
    """
    tokenizer = processor.tokenizer
    text, spans = _conversation_text(processor, turns)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [IGNORE] * len(ids)
    for t, (start, _end) in enumerate(encoded["offset_mapping"]):
        if any(a <= start < b for a, b in spans):
            labels[t] = ids[t]
    image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    where = ids.index(image_id)
    ids = ids[:where] + [image_id] * num_image_tokens + ids[where + 1 :]
    labels = labels[:where] + [IGNORE] * num_image_tokens + labels[where + 1 :]
    return torch.tensor(ids), torch.tensor(labels)


def encode_isolated_turns(
    processor, turns: Sequence[tuple[str, str]], num_image_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One packed training sequence whose turns cannot see each other.

    Every turn is tokenised as its own single-question prompt, `format_prompt(question)`
    followed by "answer<|im_end|>". The prompts of one image share their prefix up to and
    including the `<image>` placeholders; that prefix is stored once, followed by each turn's
    remaining tokens. Turn k's tokens get segment k + 1 (the prefix has segment 0) and the
    positions they have in their own prompt, so with `isolation_mask` every answer token is
    predicted exactly as it would be for that question alone.

    Args:
        processor: the default model's processor.
        turns: (question, answer) pairs about one image.
        num_image_tokens: placeholders the `<image>` token expands to.

    Returns:
        `(input_ids, labels, position_ids, segments)`, each (L,) int64; labels are -100
        except on answer tokens.
    """
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prefix: list[int] | None = None
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    segments: list[int] = []
    for k, (question, answer) in enumerate(turns):
        prompt = format_prompt(processor, question)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(prompt + answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        if full_ids[: len(prompt_ids)] != prompt_ids or full_ids[-1] != eos:
            raise RuntimeError("the answer does not tokenise separately from its prompt")
        where = prompt_ids.index(image_id)
        if prefix is None:
            prefix = prompt_ids[:where] + [image_id] * num_image_tokens
            ids += prefix
            labels += [IGNORE] * len(prefix)
            positions += list(range(len(prefix)))
            segments += [0] * len(prefix)
        elif prompt_ids[:where] != prefix[:where]:
            raise RuntimeError("the prompts of one image do not share their prefix")
        rest = full_ids[where + 1 :]
        answer_start = len(prompt_ids) - (where + 1)
        ids += rest
        labels += [IGNORE] * answer_start + rest[answer_start:]
        positions += list(range(len(prefix), len(prefix) + len(rest)))
        segments += [k + 1] * len(rest)
    return torch.tensor(ids), torch.tensor(labels), torch.tensor(positions), torch.tensor(segments)


def isolation_mask(segments: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask (True = may attend) for sequences packed by
    `encode_isolated_turns`.

    Args:
        segments: (B, L) int64; 0 for the shared prefix, k >= 1 for turn k, -1 for padding.

    Returns:
        (B, 1, L, L) bool: query i sees key j <= i when j is in the prefix or in i's own
        turn. Padding queries see only themselves (no empty rows, so no NaN).
    """
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    query = segments.unsqueeze(2)  # (B, L, 1)
    key = segments.unsqueeze(1)  # (B, 1, L)
    allowed = causal & ((key == 0) | (key == query)) & (key >= 0) & (query >= 0)
    allowed |= torch.eye(length, dtype=torch.bool)
    return allowed.unsqueeze(1)


# --------------------------------------------------------------------------------------------
# Training


class StandardizedProjector(torch.nn.Module):
    """LLaVA's projector applied to per-channel standardised features, for training only.

    DINOv2's penultimate features share a large common component (all patches of all images
    point the same way, cosine ~0.99), so a projector trained on them raw first learns a
    constant output that helps the LM's answer prior and leaves the image-specific part tiny;
    in our first run it stayed at chance level for 50 steps. Centring and scaling each channel
    (statistics from a fixed sample of training images) conditions the problem. The affine
    map is folded into `linear_1` afterwards (`fold()`), so the shipped projector is the stock
    `LlavaMultiModalProjector` applied to raw features.
    """

    def __init__(self, projector: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.projector = projector
        self.register_buffer("mean", mean)  # (C,)
        self.register_buffer("std", std)  # (C,)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: (B, N, C) raw -> (B, N, C_text)."""
        return self.projector((features - self.mean) / self.std)

    @torch.no_grad()
    def fold(self) -> dict[str, torch.Tensor]:
        """Projector state dict that computes the same function on raw features.

        linear_1(W (x - m) / s + b) = linear_1 with W' = W / s (per input column) and
        b' = b - W' m.
        """
        state = {k: v.detach().clone() for k, v in self.projector.state_dict().items()}
        weight = state["linear_1.weight"] / self.std  # (H, C) / (C,)
        state["linear_1.weight"] = weight
        state["linear_1.bias"] = state["linear_1.bias"] - weight @ self.mean
        return {k: v.contiguous() for k, v in state.items()}

    @torch.no_grad()
    def load_folded(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `fold()`: start from a stock projector state (e.g. a shipped one)."""
        state = {k: v.clone() for k, v in state.items()}
        folded_weight = state["linear_1.weight"]
        state["linear_1.bias"] = state["linear_1.bias"] + folded_weight @ self.mean
        state["linear_1.weight"] = folded_weight * self.std
        self.projector.load_state_dict(state)


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero over `cfg.steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batch_order(num_items: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Item indices of a step's batch: a fresh seeded permutation each epoch, so any step's
    batch is known without replaying earlier ones (needed for exact resumption)."""
    per_epoch = num_items // batch_size
    epoch, offset = divmod(step, per_epoch)
    perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return perm[offset * batch_size : (offset + 1) * batch_size].tolist()


def projector_loss(
    model,
    projector: torch.nn.Module,
    features: torch.Tensor,
    input_ids: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    position_ids: Sequence[torch.Tensor] | None = None,
    segments: Sequence[torch.Tensor] | None = None,
    prompt: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over answer tokens for a batch of packed sequences.

    Args:
        model: `LlavaForConditionalGeneration` (LLM frozen).
        projector: maps (B, N, C_vision) features to (B, N, C_text) embeddings.
        features: (B, N, C_vision) projector inputs.
        input_ids: B tensors of shape (L_b,), each with N image placeholders.
        labels: B tensors (L_b,), -100 outside answers.
        position_ids, segments: for "isolated" packing, B tensors (L_b,) from
            `encode_isolated_turns`; None for a plain causal chat.
        prompt: `(token_ids (K,), embeddings (K, C_text))`: the trainable embeddings that
            replace the frozen ones of the prompt tokens; None when there are none.

    Returns:
        `(loss, num_answer_tokens)`.
    """
    lm = model.model.language_model
    pad_id = model.config.text_config.pad_token_id or 0
    max_len = max(len(x) for x in input_ids)
    batch = len(input_ids)
    ids = torch.full((batch, max_len), pad_id, dtype=torch.long)
    lab = torch.full((batch, max_len), IGNORE, dtype=torch.long)
    mask = torch.zeros((batch, max_len), dtype=torch.long)
    for b, (x, y) in enumerate(zip(input_ids, labels, strict=True)):
        ids[b, : len(x)] = x
        lab[b, : len(y)] = y
        mask[b, : len(x)] = 1
    extra: dict[str, torch.Tensor] = {}
    if segments is not None:
        if position_ids is None:
            raise ValueError("isolated packing needs position_ids with its segments")
        seg = torch.full((batch, max_len), -1, dtype=torch.long)
        pos = torch.zeros((batch, max_len), dtype=torch.long)
        for b, (p, g) in enumerate(zip(position_ids, segments, strict=True)):
            pos[b, : len(p)] = p
            seg[b, : len(g)] = g
        extra = {"position_ids": pos}
        mask = isolation_mask(seg)
    image_features = projector(features)  # (B, N, C_text)
    embeds = lm.embed_tokens(ids)  # (B, L, C_text)
    if prompt is not None:
        prompt_ids, prompt_embeddings = prompt
        slot = torch.full((embeds.shape[0], max_len), -1, dtype=torch.long)
        for k, token in enumerate(prompt_ids.tolist()):
            slot[ids == token] = k
        learned = prompt_embeddings.to(embeds.dtype)[slot.clamp_min(0)]  # (B, L, C_text)
        embeds = torch.where((slot >= 0).unsqueeze(-1), learned, embeds)
    image_mask = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(image_mask, image_features.to(embeds.dtype))
    hidden = lm(inputs_embeds=embeds, attention_mask=mask, **extra).last_hidden_state  # (B, L, C)
    # Position t predicts token t+1; run the LM head only where that token is an answer token.
    target = lab[:, 1:]
    keep = target != IGNORE
    logits = model.lm_head(hidden[:, :-1][keep])  # (T, V)
    loss = F.cross_entropy(logits.float(), target[keep])
    return loss, int(keep.sum())


def train_projector(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a projector training, evaluate it and write its artefacts.

    Writes into `cfg.output_dir`: `config.json`, `checkpoint.pt` (every
    `cfg.checkpoint_every` steps), `metrics.jsonl` (one line per step),
    `projector-<res>.safetensors` and `projector-<res>.json` (config, seed, wall time,
    metrics) at the end; with `cfg.install`, also copies the last two into the package.

    Returns:
        The final report (the content of `projector-<res>.json`).
    """
    from safetensors.torch import save_file

    if cfg.packing not in ("isolated", "chat"):
        raise PrumergeError(f"unknown packing {cfg.packing!r}; choose 'isolated' or 'chat'")
    if not 0.0 <= cfg.instruction_rate <= 1.0:
        raise PrumergeError("--instruction-rate must be between 0 and 1")
    if cfg.synth_scenes < 0 or cfg.synth_per_batch < 0:
        raise PrumergeError("--synth-scenes and --synth-per-batch must not be negative")
    if (cfg.synth_scenes > 0) != (cfg.synth_per_batch > 0):
        raise PrumergeError("give both --synth-scenes and --synth-per-batch, or neither")
    if cfg.prompt_tokens < 0 or cfg.prompt_lr <= 0:
        raise PrumergeError("--prompt-tokens must not be negative and --prompt-lr positive")

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.json"
    cfg_dict = dataclasses.asdict(cfg)
    comparable = {
        k: v
        for k, v in cfg_dict.items()
        if k not in ("command", "install", "eval_images", "eval_batch_images", "time_budget_min")
    }
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.is_file() and config_path.is_file():
        old = json.loads(config_path.read_text())
        # Options added since an old run started take their defaults there.
        defaults = dataclasses.asdict(TrainConfig())
        old_comparable = {k: old.get(k, defaults[k]) for k in comparable}
        if old_comparable != comparable:
            raise PrumergeError(
                f"{out} holds a checkpoint of a different configuration; use another --output-dir"
            )
    _atomic_write_json(cfg_dict, config_path)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    _log(f"building the default model ({cfg.resolution} px, seed {cfg.seed})")
    model, processor = build_default_model(
        cfg.resolution, projector=None, seed=cfg.seed, num_prompt_tokens=cfg.prompt_tokens
    )
    for p in model.parameters():
        p.requires_grad_(False)
    projector = model.model.multi_modal_projector
    for p in projector.parameters():
        p.requires_grad_(True)
    prompt: tuple[torch.Tensor, torch.nn.Parameter] | None = None
    if cfg.prompt_tokens:
        prompt_ids = torch.tensor(
            processor.tokenizer.convert_tokens_to_ids(prompt_token_names(cfg.prompt_tokens))
        )
        rows = model.get_input_embeddings().weight[prompt_ids].detach().float().clone()
        prompt = (prompt_ids, torch.nn.Parameter(rows))
    num_image_tokens = model.config.image_seq_length
    train_dtype = getattr(torch, cfg.train_dtype)
    model.model.language_model.to(train_dtype)
    model.lm_head.to(train_dtype)

    train_ids, train_turns, train_paths = load_easy_vqa("train")
    if cfg.train_images is not None:
        train_ids = train_ids[: cfg.train_images]
    # Training items: (image, turns), easy-vqa first, then generated scenes. An image is a
    # file path or a zero-argument callable that draws it.
    items: list[tuple[Any, list[tuple[str, str]]]] = [
        (train_paths[i], list(train_turns[i])) for i in train_ids
    ]
    num_easy = len(items)
    if cfg.synth_scenes > 0:
        from prumerge.data import synth

        for scene in synth.generate(cfg.synth_scenes, split="train", seed=cfg.seed):
            draw = functools.partial(synth.render, scene.objects, scene.config)
            items.append((draw, [(q.question, q.answer) for q in scene.questions]))
    # Projector inputs are computed when a batch first needs them and kept in memory: a short
    # run sees only part of the images, and the vision tower costs little next to the LLM.
    feature_memo: dict[int, torch.Tensor] = {}

    def features_for(index: Sequence[int]) -> torch.Tensor:
        missing = [i for i in index if i not in feature_memo]
        if missing:
            images = [
                items[i][0] if isinstance(items[i][0], str) else items[i][0]() for i in missing
            ]
            computed = compute_patch_features(model, processor, images, desc="features")
            feature_memo.update(zip(missing, computed, strict=True))
        return torch.stack([feature_memo[i] for i in index])

    # Per-channel statistics from a fixed sample (the first images by id) for standardisation.
    stats_images = min(cfg.stats_images, num_easy)
    sample = features_for(list(range(stats_images))).flatten(0, 1)  # (n * N, C)
    trainable = StandardizedProjector(projector, sample.mean(0), sample.std(0).clamp_min(1e-6))
    _log(f"feature statistics from {stats_images} images")
    if cfg.init_projector is not None:
        from prumerge.models.default import load_projector_state, split_projector_state

        init_state, init_prompt = split_projector_state(load_projector_state(cfg.init_projector))
        trainable.load_folded(init_state)
        if init_prompt is not None:
            if prompt is None or init_prompt.shape != prompt[1].shape:
                raise PrumergeError(
                    f"{cfg.init_projector} holds {init_prompt.shape[0]} prompt embeddings; "
                    f"pass --prompt-tokens {init_prompt.shape[0]}"
                )
            with torch.no_grad():
                prompt[1].copy_(init_prompt)
        _log(f"projector initialised from {cfg.init_projector}")

    # Each image's turns in a fixed shuffled order (for "chat" packing, so that "is there a red
    # shape?" is not always the turn right after the image); each question carries the
    # short-answer instruction with probability `instruction_rate`.
    rng = random.Random(cfg.seed)
    rates: dict[tuple[bool, str], float] = {}
    if cfg.balance_yes_no:
        all_turns = [t for _image, item_turns in items[:num_easy] for t in item_turns]
        rates = balanced_keep_rates([q for q, _ in all_turns], [a for _, a in all_turns])
        _log("yes/no keep rates: " + ", ".join(f"{k}: {v:.3f}" for k, v in rates.items()))
    sequences: list[tuple[torch.Tensor, ...]] = []
    for position, (_image, item_turns) in enumerate(items):
        turns = list(item_turns)
        if rates and position < num_easy:
            turns = [
                (q, a)
                for q, a in turns
                if a not in ("yes", "no") or rng.random() < rates[(is_negated(q), a)]
            ]
        rng.shuffle(turns)
        turns = [
            (q + SHORT_ANSWER if rng.random() < cfg.instruction_rate else q, a) for q, a in turns
        ]
        if cfg.packing == "isolated":
            sequences.append(encode_isolated_turns(processor, turns, num_image_tokens))
        else:
            sequences.append(encode_conversation(processor, turns, num_image_tokens))
    lengths = [len(x[0]) for x in sequences]
    _log(
        f"{num_easy} easy-vqa + {len(items) - num_easy} synth sequences ({cfg.packing} packing), "
        f"mean length {sum(lengths) / len(lengths):.0f} tokens"
    )

    def batch_at(step: int) -> list[int]:
        index = batch_order(num_easy, cfg.batch_size, step, cfg.seed)
        if cfg.synth_per_batch > 0:
            synth_index = batch_order(
                len(items) - num_easy, cfg.synth_per_batch, step, cfg.seed + 1
            )
            index += [num_easy + i for i in synth_index]
        return index

    groups: list[dict[str, Any]] = [{"params": list(projector.parameters()), "peak": cfg.lr}]
    if prompt is not None:
        groups.append({"params": [prompt[1]], "peak": cfg.prompt_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    train_seconds = 0.0
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, weights_only=False)
        projector.load_state_dict(ckpt["projector"])
        if prompt is not None:
            with torch.no_grad():
                prompt[1].copy_(ckpt["prompt"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        train_seconds = ckpt["train_seconds"]
        torch.set_rng_state(ckpt["torch_rng"])
        _log(f"resumed from step {step}")

    def checkpoint() -> None:
        _atomic_save(
            {
                "projector": projector.state_dict(),
                "prompt": None if prompt is None else prompt[1].detach().clone(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "train_seconds": train_seconds,
                "torch_rng": torch.get_rng_state(),
            },
            ckpt_path,
        )

    metrics_file = open(out / "metrics.jsonl", "a")  # noqa: SIM115 - kept open for the loop
    model.train(False)  # no dropout anywhere; the LLM is frozen
    stopped_early = False
    running: list[float] = []
    while step < cfg.steps:
        if cfg.time_budget_min is not None and train_seconds > cfg.time_budget_min * 60:
            _log(f"time budget of {cfg.time_budget_min} min reached at step {step}; stopping")
            stopped_early = True
            break
        t0 = time.time()
        index = batch_at(step)
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("peak", cfg.lr) / cfg.lr
        loss, tokens = projector_loss(
            model,
            trainable,
            features_for(index),
            # ids and labels, plus position ids and segments for isolated packing
            *(list(column) for column in zip(*(sequences[i] for i in index), strict=True)),
            prompt=prompt,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(projector.parameters(), cfg.grad_clip)
        if prompt is not None:
            torch.nn.utils.clip_grad_norm_([prompt[1]], cfg.grad_clip)
        optimizer.step()
        step += 1
        dt = time.time() - t0
        train_seconds += dt
        running.append(loss.item())
        record = {
            "step": step,
            "loss": round(loss.item(), 5),
            "lr": lr,
            "grad_norm": round(float(grad_norm), 4),
            "tokens": tokens,
            "step_s": round(dt, 3),
        }
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        if step % cfg.log_every == 0 or step == cfg.steps:
            eta = (cfg.steps - step) * train_seconds / max(1, step)
            _log(
                f"step {step}/{cfg.steps} loss {sum(running) / len(running):.4f} lr {lr:.2e} "
                f"{dt:.1f} s/step, eta {eta / 60:.1f} min"
            )
            running = []
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            checkpoint()
    checkpoint()
    metrics_file.close()

    weights_name = f"projector-{cfg.resolution}.safetensors"
    state = trainable.fold()
    if prompt is not None:
        state[PROMPT_KEY] = prompt[1].detach().clone().contiguous()
    save_file(state, str(out / weights_name), metadata={"resolution": str(cfg.resolution)})
    _log(f"trained {step} steps in {train_seconds / 60:.1f} min; wrote {out / weights_name}")

    # Evaluate the model as it ships: rebuilt in float32 with the trained projector.
    evaluation: dict[str, Any] | None = None
    eval_seconds = 0.0
    if cfg.eval_images != 0:
        feature_memo.clear()
        optimizer.state.clear()
        model, processor = build_default_model(cfg.resolution, projector=state)
        eval_start = time.time()
        evaluation = evaluate_easy_vqa(
            model, processor, max_images=cfg.eval_images, batch_images=cfg.eval_batch_images
        )
        eval_seconds = time.time() - eval_start
        _log(f"evaluation: {json.dumps(evaluation['accuracy'])} in {eval_seconds / 60:.1f} min")
    report = {
        "command": cfg.command,
        "config": cfg_dict,
        "seed": cfg.seed,
        "steps_done": step,
        "stopped_early": stopped_early,
        "train_wall_s": round(train_seconds, 1),
        "eval_wall_s": round(eval_seconds, 1),
        "final_loss_mean_last_50": _mean_recent_loss(out / "metrics.jsonl", 50),
        "eval": evaluation,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    _atomic_write_json(report, out / f"projector-{cfg.resolution}.json")
    if cfg.install:
        install_projector(out, cfg.resolution)
    return report


def _mean_recent_loss(path: Path, count: int) -> float | None:
    """Mean training loss over the last `count` steps recorded in `metrics.jsonl`."""
    if not path.is_file():
        return None
    losses = [json.loads(line)["loss"] for line in path.read_text().splitlines() if line.strip()]
    return round(sum(losses[-count:]) / len(losses[-count:]), 5) if losses else None


def install_projector(run_dir: str | Path, resolution: int = DEFAULT_RESOLUTION) -> Path:
    """Copy a run's projector weights and report into the package's weights folder."""
    import shutil

    from prumerge.models.default import WEIGHTS_DIR

    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    for suffix in ("safetensors", "json"):
        src = Path(run_dir) / f"projector-{resolution}.{suffix}"
        if not src.is_file():
            raise PrumergeError(f"{src} does not exist; has the run finished?")
        tmp = WEIGHTS_DIR / f".projector-{resolution}.{suffix}.tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, WEIGHTS_DIR / src.name)
    _log(f"installed projector-{resolution} into {WEIGHTS_DIR}")
    return WEIGHTS_DIR / f"projector-{resolution}.safetensors"


# --------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def answer_questions(
    model,
    processor,
    images: Sequence[Any],
    questions: Sequence[Sequence[str]],
    max_new_tokens: int = 4,
) -> list[list[str]]:
    """Greedy answers to several questions per image, sharing each image's prompt prefix.

    Equivalent to running `model.generate(**processor(images=img, text=format_prompt(q)))` per
    question with all visual tokens, but each image's common prefix (up to and including its
    visual tokens) goes through the LLM once and its KV cache is reused for all its questions.

    Args:
        model: the default `LlavaForConditionalGeneration`.
        processor: its processor.
        images: PIL images.
        questions: for each image, its questions.
        max_new_tokens: generation length limit (answers are one word plus `<|im_end|>`).

    Returns:
        For each image, the raw decoded answer to each question.
    """
    from transformers import DynamicCache

    tokenizer = processor.tokenizer
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    image_id = model.config.image_token_id
    lm = model.model.language_model
    suppressed = list(getattr(model.generation_config, "suppress_tokens", None) or [])
    # transformers 5.x renamed the decoder's `past_key_values` argument to `cache`.
    cache_arg = (
        "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    )
    pixels = processor.image_processor(list(images), return_tensors="pt")["pixel_values"]
    image_features = model.model.get_image_features(
        pixel_values=pixels.to(model.dtype),
        vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
    )
    if not torch.is_tensor(image_features):
        image_features = getattr(image_features, "pooler_output", image_features)
        if isinstance(image_features, (list, tuple)):
            image_features = torch.stack(list(image_features))
    results = []
    for b, qs in enumerate(questions):
        prompts = [format_prompt(processor, q) for q in qs]
        expanded = [
            p.replace(processor.image_token, processor.image_token * image_features.shape[1])
            for p in prompts
        ]
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in expanded]
        last_image = max(i for i, t in enumerate(ids[0]) if t == image_id)
        prefix = ids[0][: last_image + 1]
        if any(x[: len(prefix)] != prefix for x in ids):
            raise RuntimeError("prompts of one image do not share their image prefix")
        prefix_ids = torch.tensor([prefix])
        embeds = lm.embed_tokens(prefix_ids)
        embeds[prefix_ids == image_id] = image_features[b].to(embeds.dtype)
        cache = DynamicCache()
        lm(inputs_embeds=embeds, **{cache_arg: cache}, use_cache=True)
        n = len(qs)
        cache.batch_repeat_interleave(n)
        suffixes = [x[len(prefix) :] for x in ids]
        width = max(len(s) for s in suffixes)
        suffix_ids = torch.full((n, width), tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.ones((n, len(prefix) + width), dtype=torch.long)
        for i, s in enumerate(suffixes):
            suffix_ids[i, : len(s)] = torch.tensor(s)
            mask[i, len(prefix) + len(s) :] = 0
        lengths = torch.tensor([len(prefix) + len(s) for s in suffixes])  # next position
        positions = len(prefix) + torch.arange(width).unsqueeze(0).expand(n, -1)
        out = lm(
            input_ids=suffix_ids,
            attention_mask=mask,
            position_ids=positions,
            **{cache_arg: cache},
            use_cache=True,
        )
        last = out.last_hidden_state[torch.arange(n), lengths - len(prefix) - 1]  # (n, C)
        generated: list[list[int]] = [[] for _ in range(n)]
        done = torch.zeros(n, dtype=torch.bool)
        for _ in range(max_new_tokens):
            logits = model.lm_head(last)  # (n, V)
            if suppressed:
                logits[:, suppressed] = float("-inf")
            token = logits.argmax(-1)  # (n,)
            for i in range(n):
                if not done[i]:
                    if token[i].item() == eos:
                        done[i] = True
                    else:
                        generated[i].append(int(token[i]))
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long)], dim=1)
            out = lm(
                input_ids=token.unsqueeze(1),
                attention_mask=mask,
                position_ids=lengths.unsqueeze(1),
                **{cache_arg: cache},
                use_cache=True,
            )
            lengths = lengths + 1
            last = out.last_hidden_state[:, -1]
        results.append([tokenizer.decode(g, skip_special_tokens=True) for g in generated])
    return results


def evaluate_easy_vqa(
    model,
    processor,
    max_images: int | None = None,
    batch_images: int = 4,
    log_every: int = 50,
) -> dict[str, Any]:
    """Exact-match accuracy on easy-vqa's test split with all visual tokens.

    Args:
        model: the default model.
        processor: its processor.
        max_images: evaluate only the questions of the first `max_images` test images (by
            ascending image id); None for all 1,000 images (9,673 questions).
        batch_images: images per vision forward.

    Returns:
        `{"accuracy": {"all", "yes/no", "color", "shape"}, "counts": {...}, "yes_no_cells":
        {"plain/no": [right, total], "plain/yes": ..., "negated/no": ..., "negated/yes": ...},
        "images": n, "questions": n}`. The cells separate vision from easy-vqa's answer prior
        (plain questions are mostly "no", negated ones mostly "yes").
    """
    from PIL import Image

    ids, turns, paths = load_easy_vqa("test")
    if max_images is not None:
        ids = ids[:max_images]
    correct: dict[str, int] = {}
    total: dict[str, int] = {}
    cells = {
        f"{form}/{answer}": [0, 0] for form in ("plain", "negated") for answer in ("no", "yes")
    }
    start = time.time()
    for i in range(0, len(ids), batch_images):
        chunk = ids[i : i + batch_images]
        images = [Image.open(paths[j]).convert("RGB") for j in chunk]
        answers = answer_questions(
            model, processor, images, [[q for q, _ in turns[j]] for j in chunk]
        )
        for j, predicted in zip(chunk, answers, strict=True):
            for (question, truth), guess in zip(turns[j], predicted, strict=True):
                kind = question_type(truth)
                right = int(normalize_answer(guess) == truth)
                total[kind] = total.get(kind, 0) + 1
                correct[kind] = correct.get(kind, 0) + right
                if kind == "yes/no":
                    cell = cells[f"{'negated' if is_negated(question) else 'plain'}/{truth}"]
                    cell[0] += right
                    cell[1] += 1
        done = min(i + batch_images, len(ids))
        if (i // batch_images) % log_every == 0 or done == len(ids):
            acc = sum(correct.values()) / max(1, sum(total.values()))
            _log(
                f"eval {done}/{len(ids)} images, accuracy so far {acc:.4f}, {time.time() - start:.0f} s"
            )
    accuracy = {k: round(correct[k] / total[k], 5) for k in sorted(total)}
    accuracy["all"] = round(sum(correct.values()) / max(1, sum(total.values())), 5)
    return {
        "accuracy": accuracy,
        "counts": dict(sorted(total.items())),
        "yes_no_cells": cells,
        "images": len(ids),
        "questions": sum(total.values()),
        "subset": "all test images"
        if max_images is None
        else f"first {max_images} test images by id",
    }
