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

import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from prumerge.errors import PrumergeError
from prumerge.train.config import TrainConfig, check_config
from prumerge.train.finish import finish
from prumerge.train.packing import IGNORE
from prumerge.train.process import Dist, log, tune_allocator
from prumerge.train.rundir import atomic_save, atomic_write_json, prepare_output, trim_metrics
from prumerge.train.step import step_loss
from prumerge.train.trainables import Trainables, load_model, placeholders_per_image

__all__ = ["batch_order", "lr_at", "train"]


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
    dist = Dist()
    out = Path(cfg.output_dir)
    dist.broadcast_error(prepare_output(cfg, out) if dist.main else None)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    started = time.time()
    if dist.main:
        log(f"building the model ({cfg.model or 'embedded default'}), seed {cfg.seed}")
    model, processor, encode = load_model(cfg)
    num_image_tokens = placeholders_per_image(processor)

    from prumerge.train.items import default_model_items, llava_json_items

    if cfg.uses_default_model:
        items, num_primary = default_model_items(cfg, log if dist.main else lambda _m: None)
    else:
        items = llava_json_items(cfg)
        num_primary = len(items)
    if num_primary < cfg.batch_size:
        raise PrumergeError(f"--batch-size {cfg.batch_size} is larger than the {num_primary} items")
    sequences = [encode(turns, num_image_tokens) for _, turns in items]
    trainables = Trainables(cfg, model, processor, items)
    if dist.main:
        lengths = [len(s.input_ids) for s in sequences]
        log(
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
            trim_metrics(metrics_path, step)
            log(f"resumed from step {step}")

    def checkpoint() -> None:
        if dist.main:
            state = {
                "trainables": trainables.state(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "train_seconds": train_seconds,
                "torch_rng": torch.get_rng_state(),
            }
            atomic_save(state, ckpt_path)
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
                log(f"time budget of {cfg.time_budget_min} min reached at step {step}; stopping")
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
            log(
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
        report = finish(cfg, out, model, trainables, step, train_seconds, stopped_early, mixture)
        report["run_wall_s"] = round(time.time() - started, 1)
        atomic_write_json(report, out / "report.json")
        if cfg.install:
            from prumerge.train.install import install_variant

            install_variant(out, cfg.install, cfg.resolution)
    dist.barrier()
    return report
