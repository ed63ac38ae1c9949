"""The options of a training run, and the one place where they are checked."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prumerge.errors import PrumergeError
from prumerge.train.lora import DEFAULT_TARGETS

__all__ = ["COMPARED_FIELDS", "TrainConfig", "check_config", "config_difference"]


@dataclass
class TrainConfig:
    """Hyper-parameters of a training run (all recorded in the run's ``config.json``).

    Without ``model`` it trains the embedded default model on easy-vqa (plus generated
    scenes); with ``model`` and ``data`` it fine-tunes a Hugging Face LLaVA on LLaVA's
    instruction JSON.
    """

    output_dir: str = "runs/train"
    model: str | None = None  # None: the embedded default model; else an HF id or directory
    data: str | None = None  # LLaVA instruction JSON, for `model`
    image_folder: str | None = None  # where the JSON's image paths are resolved
    resolution: int = 224  # the default model's input size
    seed: int = 0
    batch_size: int = 8  # images per step (over all processes)
    # Sequences per forward/backward within a step (None: the whole step at once). Smaller
    # micro-batches bound activation memory and leave the gradient unchanged.
    micro_batch: int | None = None
    steps: int = 300
    lr: float = 1e-3  # the projector's peak learning rate
    warmup_steps: int = 15
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    checkpoint_every: int = 20
    log_every: int = 5
    train_images: int | None = None  # None: all 4,000 easy-vqa training images
    eval_images: int | None = None  # easy-vqa test images at the end; None: all; 0: none
    eval_scenes: int = 0  # generated test scenes at the end
    eval_batch_images: int = 8
    stats_images: int = 64  # images whose features give the standardisation statistics
    init_projector: str | None = None  # start from these projector (+ prompt) weights
    init_lora: str | None = None  # start from this LoRA adapter directory
    # dtype of the frozen LLM during training; bfloat16 halves the step time on CPUs with
    # AVX512-BF16. Trained weights stay float32; evaluation runs the model in float32.
    train_dtype: str = "float32"
    time_budget_min: float | None = None  # stop training early past this many minutes
    # "isolated": each turn sees the image prefix and itself only (the default model);
    # "chat": a multi-turn chat (LLaVA's instruction data; the first recipe).
    packing: str = "isolated"
    # Fraction of turns given LLaVA's short-answer instruction (the eval harness adds it;
    # `prumerge ask` does not), so the model answers both prompt forms.
    instruction_rate: float = 0.0
    # Subsample easy-vqa's yes/no turns so that "yes" and "no" are equally frequent among
    # plain and among negated questions (easy-vqa's are 82% "no" and 82% "yes").
    balance_yes_no: bool = False
    # Repeat each easy-vqa yes/no turn of its form's minority answer (plain "yes", negated
    # "no") this many times in its image's sequence: the loss weights it that many times,
    # and no majority turn is dropped.
    minority_repeat: int = 1
    synth_scenes: int = 0  # generated training scenes to mix in (prumerge.data.synth)
    synth_per_batch: int = 0  # of them, per step, on top of `batch_size` easy-vqa images
    # Question types of the generated scenes to train on, comma-separated
    # (prumerge.data.synth.QUESTION_TYPES); "": all of them.
    synth_questions: str = ""
    # Learned prompt embeddings before the image (new vocabulary rows); 0: none.
    prompt_tokens: int = 0
    prompt_lr: float = 1e-2
    # Reductions drawn per step, "method[@budget][:weight],..." (see prumerge.train.mixture).
    reduce: str = "none"
    train_projector: bool = True
    lora_rank: int = 0  # 0: no LoRA
    lora_alpha: float | None = None  # default 2 * rank
    lora_targets: str = ",".join(DEFAULT_TARGETS)
    lora_lr: float = 2e-4
    save_merged: bool = False  # also save the whole model with the adapter merged (--model)
    install: str | None = None  # copy the result into the package as this variant
    command: str = field(default="", compare=False)

    @property
    def uses_default_model(self) -> bool:
        return self.model is None


# Fields that may change between the runs of one output directory (they do not change what
# the steps compute); every other field must match the checkpoint's.
_FREE = frozenset(
    {
        "command",
        "install",
        "eval_images",
        "eval_scenes",
        "eval_batch_images",
        "time_budget_min",
        "micro_batch",
    }
)
COMPARED_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in _FREE)


def config_difference(old: dict[str, Any], new: TrainConfig) -> list[str]:
    """Fields whose values differ between a stored config and ``new``, as "name: a -> b".

    Fields missing from an old run's file take their defaults (they were added since).
    """
    defaults = dataclasses.asdict(TrainConfig())
    current = dataclasses.asdict(new)
    return [
        f"{name}: {old.get(name, defaults[name])!r} -> {current[name]!r}"
        for name in COMPARED_FIELDS
        if old.get(name, defaults[name]) != current[name]
    ]


def _positive(value: float, flag: str) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise PrumergeError(f"{flag} must be a positive number; got {value!r}")


def _non_negative(value: float, flag: str) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise PrumergeError(f"{flag} must be a number >= 0; got {value!r}")


def check_config(cfg: TrainConfig) -> None:
    """Reject bad options with one line each, before anything is loaded or written."""
    for name in ("batch_size", "steps", "checkpoint_every", "log_every", "resolution"):
        _positive(getattr(cfg, name), f"--{name.replace('_', '-')}")
        if not isinstance(getattr(cfg, name), int):
            raise PrumergeError(f"--{name.replace('_', '-')} must be a whole number")
    for name in ("lr", "prompt_lr", "lora_lr"):
        _positive(getattr(cfg, name), f"--{name.replace('_', '-')}")
    for name in ("warmup_steps", "weight_decay", "grad_clip", "synth_scenes", "synth_per_batch"):
        _non_negative(getattr(cfg, name), f"--{name.replace('_', '-')}")
    for name in ("prompt_tokens", "lora_rank", "eval_scenes", "stats_images"):
        _non_negative(getattr(cfg, name), f"--{name.replace('_', '-')}")
    if not isinstance(cfg.minority_repeat, int) or cfg.minority_repeat < 1:
        raise PrumergeError(
            f"--minority-repeat must be a whole number >= 1; got {cfg.minority_repeat!r}"
        )
    if cfg.time_budget_min is not None:
        _positive(cfg.time_budget_min, "--time-budget-min")
    if cfg.train_images is not None:
        _positive(cfg.train_images, "--train-images")
    if cfg.micro_batch is not None:
        _positive(cfg.micro_batch, "--micro-batch")
    if cfg.eval_images is not None:
        _non_negative(cfg.eval_images, "--eval-images")
    if cfg.lora_alpha is not None:
        _positive(cfg.lora_alpha, "--lora-alpha")
    if not 0.0 <= cfg.instruction_rate <= 1.0:
        raise PrumergeError("--instruction-rate must be between 0 and 1")
    if (cfg.synth_scenes > 0) != (cfg.synth_per_batch > 0):
        raise PrumergeError("give both --synth-scenes and --synth-per-batch, or neither")
    if cfg.synth_questions:
        from prumerge.data.synth import QUESTION_TYPES

        if cfg.synth_scenes == 0:
            raise PrumergeError("--synth-questions needs --synth-scenes")
        unknown = [t for t in cfg.synth_questions.split(",") if t not in QUESTION_TYPES]
        if unknown:
            raise PrumergeError(
                f"--synth-questions: unknown question type {unknown[0]!r}; choose from "
                + ", ".join(QUESTION_TYPES)
            )
    if cfg.packing not in ("isolated", "chat"):
        raise PrumergeError(f"unknown packing {cfg.packing!r}; choose 'isolated' or 'chat'")
    if cfg.train_dtype not in ("float32", "bfloat16"):
        raise PrumergeError("--train-dtype must be float32 or bfloat16")
    if not cfg.train_projector and cfg.lora_rank == 0 and cfg.prompt_tokens == 0:
        raise PrumergeError("nothing to train: give --lora-rank, or train the projector")
    if cfg.model is None:
        if cfg.data is not None:
            raise PrumergeError("--data trains a model given with --model")
    else:
        if cfg.data is None:
            raise PrumergeError("--model needs --data, a LLaVA instruction JSON file")
        if cfg.packing == "isolated":
            raise PrumergeError("--model trains on LLaVA conversations: use --packing chat")
        for name in ("prompt_tokens", "synth_scenes", "balance_yes_no", "train_images"):
            if getattr(cfg, name):
                raise PrumergeError(f"--{name.replace('_', '-')} applies to the default model only")
        if cfg.minority_repeat != 1:
            raise PrumergeError("--minority-repeat applies to the default model only")
    if cfg.install not in (None, "default", "base"):
        raise PrumergeError("--install takes a variant name: default or base")
    if cfg.install is not None and cfg.model is not None:
        raise PrumergeError("--install ships weights of the default model only")
    for name, want in (("init_projector", "file"), ("init_lora", "dir"), ("data", "file")):
        value = getattr(cfg, name)
        if value is None:
            continue
        path = Path(value)
        if want == "file" and not path.is_file():
            raise PrumergeError(f"--{name.replace('_', '-')}: no such file: {value}")
        if want == "dir" and not (path / "adapter_config.json").is_file():
            raise PrumergeError(
                f"--{name.replace('_', '-')}: {value} is not a LoRA adapter directory "
                "(no adapter_config.json)"
            )
    if cfg.init_projector is not None:
        _check_projector_file(cfg.init_projector)
    if cfg.init_lora is not None and cfg.lora_rank == 0:
        raise PrumergeError("--init-lora needs --lora-rank (the adapter's rank)")
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise PrumergeError(f"--output-dir {out} exists and is not a directory")
    from prumerge.train.mixture import parse_mixture

    parse_mixture(cfg.reduce)


def _check_projector_file(path: str) -> None:
    """Read only the header of ``--init-projector``: a picture or a torn file given there is
    refused before the model is built, not after."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            keys = list(handle.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise PrumergeError(
            f"--init-projector {path}: not a safetensors file of projector weights ({exc})"
        ) from None
    if not any(key.startswith("linear_") for key in keys):
        raise PrumergeError(
            f"--init-projector {path}: holds no projector weights (linear_1.*, linear_2.*)"
        )
