"""lmms-eval plugin: any lmms-eval image task on a LLaVA model with visual-token reduction.

::

    python -m lmms_eval --model prumerge_llava \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=prumerge+ \\
        --tasks pope --batch_size 8

``model_args``: ``pretrained`` (an HF LLaVA id or directory; omitted or ``default``: the
embedded model), ``method`` (default ``prumerge``), ``keep`` (a count, a ratio or
``adaptive``), ``max_new_tokens`` (a cap below the task's own), ``dtype`` (float32,
float16, bfloat16 or auto; default float32 on the CPU, bfloat16 or float16 on CUDA),
``device_map`` (auto, balanced, sequential, ...: accelerate places the model instead of
``device``), ``cache_dir``, and any option of the method (``merge=mean``,
``attention=reference``, ...). Budgets and options go through the same parser and checks as
``prumerge ask``/``eval``/``bench`` (``prumerge.methods.spec.make_method``), before the model
loads.

How lmms-eval finds it: lmms-eval 0.7 resolves ``--model`` through its model registry,
which reads :class:`ModelManifest` objects from the Python entry-point group
``lmms_eval.models``; prumerge declares :func:`manifest` there. The class is also decorated
with ``lmms_eval.api.registry.register_model`` (the older registry, which some tools still
read) when that module imports.

Requests are answered in batches by :class:`prumerge.eval.predictor.ModelPredictor`, the
predictor ``prumerge eval`` uses: one :func:`prumerge.apply` handle for the model's life,
greedy decoding, each task's ``until`` strings and ``max_new_tokens``. Images only (a
request may hold none or several); video requests are refused.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from lmms_eval.api.model import lmms

from prumerge.errors import PrumergeError

try:
    from lmms_eval.api.registry import register_model
except ImportError:  # pragma: no cover - depends on the install
    # lmms_eval.api.registry imports HF `evaluate`; without it, the entry-point manifest
    # (what lmms-eval 0.7 resolves --model with) still registers the model.
    def register_model(*names: str) -> Any:
        return lambda cls: cls


__all__ = ["MODEL_NAME", "PrumergeLlava", "manifest"]

MODEL_NAME = "prumerge_llava"
DEFAULT_MAX_NEW_TOKENS = 128  # when a task sets none (LLaVA-1.5's evaluation default)

logger = logging.getLogger(__name__)


def manifest() -> Any:
    """The ``ModelManifest`` lmms-eval's registry loads from the ``lmms_eval.models`` entry
    point group: model id ``prumerge_llava`` -> :class:`PrumergeLlava`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.PrumergeLlava")


def _positive_int(value: Any, name: str) -> int:
    text = str(value).strip()
    if not text.lstrip("+").isdigit() or int(text) < 1:
        raise PrumergeError(f"{name} must be a positive integer, got {value!r}")
    return int(text)


def _batch_size(value: Any) -> int:
    try:
        size = int(value)
    except (TypeError, ValueError):
        logger.warning("batch_size=%r is not supported by %s; using 1", value, MODEL_NAME)
        return 1
    return max(size, 1)


def _rgb(image: Any) -> Any:
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise PrumergeError(
            f"{MODEL_NAME} takes images only; a request held a {type(image).__name__} "
            "(video and audio tasks are not supported)"
        )
    return image if image.mode == "RGB" else image.convert("RGB")


@register_model(MODEL_NAME)
class PrumergeLlava(lmms):
    """An HF LLaVA model (or the embedded default one) with prumerge's token reduction.

    Args:
        pretrained: HF model id or local directory; None or "default" for the embedded model.
        method: Reduction method (see ``prumerge methods``).
        keep: Budget: a count, a ratio, or "adaptive"/None (the method's own choice).
        device: "cpu", "cuda", "cuda:1", ...; default: this process's GPU if any, else CPU.
        batch_size: Requests per generate call.
        max_batch_size: Accepted for lmms-eval's interface; unused.
        cache_dir: Cache of the built default model.
        max_new_tokens: Upper bound on every task's ``max_new_tokens``.
        dtype: Weights' dtype (see ``prumerge.loading.resolve_dtype``).
        device_map: An accelerate device map, instead of ``device``.
        **options: Further method options (``merge="mean"``, ``attention="reference"``...).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        method: str = "prumerge",
        keep: Any = None,
        device: str | None = None,
        batch_size: Any = 1,
        max_batch_size: Any = None,
        cache_dir: str | None = None,
        max_new_tokens: int | None = None,
        dtype: str | None = None,
        device_map: str | None = None,
        **options: Any,
    ) -> None:
        import torch

        from prumerge.eval.predictor import ModelPredictor
        from prumerge.loading import (
            load_model,
            model_device,
            parse_device_map,
            resolve_device,
            resolve_dtype,
        )
        from prumerge.methods.spec import make_method

        super().__init__()
        self._rank = int(os.environ.get("RANK", "0"))
        self._world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        # Everything given is checked before the model loads, by the CLI's own checks.
        if keep is not None:
            options["keep"] = keep
        reducer = make_method(str(method), options)
        if max_new_tokens in (None, "", 0):
            self.max_new_tokens = None
        else:
            self.max_new_tokens = _positive_int(max_new_tokens, "max_new_tokens")
        device = resolve_device(None if device is None else str(device), local_rank=local_rank)
        device_map = parse_device_map(None if device_map is None else str(device_map))
        resolve_dtype(None if dtype is None else str(dtype), device)
        self.batch_size_per_gpu = _batch_size(batch_size)
        model_id = None if pretrained in (None, "", "default", "None") else str(pretrained)
        model, processor, prompt_fn = load_model(
            model_id,
            device=device,
            cache_dir=cache_dir,
            dtype=None if dtype is None else str(dtype),
            device_map=device_map,
            methods=[reducer],
        )
        self._device = torch.device(model_device(model))
        self.predictor = ModelPredictor(
            model,
            processor,
            prompt_fn,
            reducer,
            max_new_tokens=self.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        )
        self.pretrained = model_id or "default"
        #: Visual tokens over all requests answered so far: images, before and after reduction.
        self.visual_tokens = {"images": 0, "in": 0, "out": 0}
        self._warned: set[str] = set()

    # -- properties lmms-eval reads ----------------------------------------------------------
    @property
    def model(self) -> Any:
        return self.predictor.model

    @property
    def tokenizer(self) -> Any:
        return self.predictor.processor.tokenizer

    @property
    def device(self) -> Any:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def clean(self) -> None:
        self.predictor.close()
        super().clean()

    # -- requests ----------------------------------------------------------------------------
    def _visuals(self, doc_to_visual: Any, doc_id: Any, task: str, split: str) -> list[Any]:
        doc = self.task_dict[task][split][doc_id]
        visuals = doc_to_visual(doc) if doc_to_visual is not None else []
        if visuals is None:
            return []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        return [_rgb(v) for v in visuals if v is not None]

    def _question(self, context: str) -> str:
        # Some tasks write the image placeholder into the text; the prompt places the images
        # before the question itself.
        token = getattr(self.predictor.processor, "image_token", "<image>")
        return context.replace(f"{token}\n", "").replace(token, "").strip()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    def _generation_settings(self, gen_kwargs: dict[str, Any]) -> tuple[int, list[str]]:
        until = gen_kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0:
            self._warn_once("sample", f"{MODEL_NAME} decodes greedily; sampling was asked for")
        if int(gen_kwargs.get("num_beams") or 1) > 1:
            self._warn_once("beams", f"{MODEL_NAME} decodes greedily; beam search was asked for")
        limit = int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        if self.max_new_tokens:
            limit = min(limit, self.max_new_tokens)
        return limit, list(until)

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Greedy answers, batched over requests with the same generation settings."""
        from tqdm import tqdm

        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            gen_kwargs = request.args[1] or {}
            key = json.dumps(gen_kwargs, sort_keys=True, default=str)
            groups.setdefault(key, []).append(index)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc=MODEL_NAME)
        for indices in groups.values():
            limit, until = self._generation_settings(dict(requests[indices[0]].args[1] or {}))
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                questions, images = [], []
                for index in batch:
                    context, _, doc_to_visual, doc_id, task, split = requests[index].args
                    questions.append(self._question(context))
                    images.append(self._visuals(doc_to_visual, doc_id, task, split))
                answers = self.predictor.generate(
                    questions, images, max_new_tokens=limit, stop=until
                )
                for index, answer, pictures in zip(batch, answers, images, strict=True):
                    results[index] = answer.text
                    self.visual_tokens["images"] += len(pictures)
                    self.visual_tokens["in"] += answer.tokens_in
                    self.visual_tokens["out"] += answer.tokens_out
                    context, gen_kwargs = requests[index].args[:2]
                    self.cache_hook.add_partial(
                        "generate_until", (context, gen_kwargs), answer.text
                    )
                bar.update(len(batch))
        bar.close()
        if self.visual_tokens["images"]:
            images_seen = self.visual_tokens["images"]
            logger.info(
                "%s (%s): %.1f visual tokens in, %.1f out per image over %d images",
                MODEL_NAME,
                self.predictor.method.name,
                self.visual_tokens["in"] / images_seen,
                self.visual_tokens["out"] / images_seen,
                images_seen,
            )
        return [text or "" for text in results]

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """Log-probability of each continuation (and whether it is the greedy one)."""
        from tqdm import tqdm

        out = []
        for request in tqdm(requests, disable=self.rank != 0, desc=MODEL_NAME):
            context, target, doc_to_visual, doc_id, task, split = request.args
            if not isinstance(target, str):
                target = target(self.task_dict[task][split][doc_id])
            images = self._visuals(doc_to_visual, doc_id, task, split)
            out.append(self.predictor.score_continuation(self._question(context), target, images))
        return out

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NotImplementedError(f"{MODEL_NAME} does not support multi-round generation")
