"""A Hugging Face checkpoint of any supported family: its class, read from the config before
any weights load, and its processor, built for images where the video processor cannot be."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prumerge.errors import PrumergeError

#: ``model_type`` -> the class that loads it, for configs that name no ``architectures``.
MODEL_TYPES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
}


def supported_classes() -> dict[str, str]:
    """Every Hugging Face class an adapter serves -> its family's name."""
    from prumerge.adapters import FAMILIES

    return {name: family for family, cls in FAMILIES.items() for name in cls.model_classes}


def model_class_name(config: Any, source: str) -> str:
    """The supported class named by ``config`` (``architectures``, else ``model_type``).

    Raises:
        PrumergeError: one line naming the supported classes, for any other architecture.
    """
    from prumerge.adapters import supported_models

    supported = supported_classes()
    names = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", None)
    for name in names:
        if name in supported:
            return name
    if not names and model_type in MODEL_TYPES and MODEL_TYPES[model_type] in supported:
        return MODEL_TYPES[model_type]
    found = ", ".join(names) if names else f"model_type {model_type!r}"
    raise PrumergeError(f"{source}: {found} is not supported; supported: {supported_models()}")


def check_methods(config: Any, class_name: str, methods: list[Any]) -> None:
    """Refuse, before any weights load, a method the checkpoint's family cannot run.

    The family's adapter is built on the model's skeleton (on the meta device: no memory,
    no weights), where it checks the method as it does on the loaded model.

    Raises:
        PrumergeError: the adapter's one-line reason.
    """
    if not methods:
        return
    import torch
    import transformers

    from prumerge.adapters.base import family_for

    with torch.device("meta"):
        skeleton = getattr(transformers, class_name)._from_config(config)
    family = family_for(skeleton)
    for method in methods:
        try:
            family(skeleton, method)
        except PrumergeError:
            raise
        except Exception:  # noqa: BLE001 - a check the skeleton cannot run waits for the model
            continue


def read_config(source: str) -> Any:
    """The checkpoint's config alone (no weights).

    Raises:
        PrumergeError: a config that cannot be read.
    """
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as exc:
        raise PrumergeError(f"cannot read the config of {source!r}: {_first_line(exc)}") from None


def load_processor(source: str) -> Any:
    """The checkpoint's processor; where its video processor needs torchvision and that
    cannot be imported, the same processor class built for images only, from the image
    processor, the tokenizer, the chat template and the processor's saved settings."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source)
    except ImportError:
        return images_only_processor(source)
    except ValueError as exc:  # some video processors say so with a ValueError (InternVL)
        if "torchvision" not in str(exc):
            raise
        return images_only_processor(source)


def images_only(cls: type) -> type:
    """A subclass of the processor class ``cls`` that may be built without a video
    processor (``video_processor=None``): the base class checks the type of every part,
    and the video processors' base class does not import without torchvision. Answers for
    images are those of ``cls``."""

    def check_argument_for_proper_class(self: Any, name: str, argument: Any) -> Any:
        if argument is None:
            return None
        return cls.check_argument_for_proper_class(self, name, argument)

    return type(
        cls.__name__,
        (cls,),
        {
            "check_argument_for_proper_class": check_argument_for_proper_class,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
        },
    )


def images_only_processor(source: str) -> Any:
    """``load_processor``'s fallback: see there."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    settings = _processor_settings(source)
    name = settings.pop("processor_class", None) or _processor_class_name(source)
    cls = getattr(transformers, str(name), None) if name else None
    if cls is None:
        raise PrumergeError(f"cannot tell the processor class of {source!r}")
    image_processor = AutoImageProcessor.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    template = _chat_template(source) or getattr(tokenizer, "chat_template", None)
    accepted = _init_names(cls)
    extra = {k: v for k, v in settings.items() if k in accepted and not k.endswith("_processor")}
    extra.pop("chat_template", None)
    return images_only(cls)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=template,
        **extra,
    )


def save_images_only(processor: Any, directory: str | Path) -> None:
    """Save a processor built by ``images_only`` (no video part) so that
    ``images_only_processor`` rebuilds it: its image processor, tokenizer, chat template and
    settings (``processor_config.json``, with the class's name)."""
    import inspect

    directory = Path(directory)
    processor.image_processor.save_pretrained(str(directory))
    processor.tokenizer.save_pretrained(str(directory))
    if processor.chat_template:
        (directory / "chat_template.jinja").write_text(processor.chat_template)
    cls = type(processor)
    settings: dict[str, Any] = {"processor_class": cls.__name__}
    for name in _init_names(cls) - {"image_processor", "tokenizer", "video_processor"}:
        if name == "chat_template":
            continue
        value = getattr(processor, name, inspect.Parameter.empty)
        if isinstance(value, (str, int, float, bool)):
            settings[name] = value
    (directory / "processor_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def _init_names(cls: type) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}


def _local(source: str, name: str) -> Path | None:
    path = Path(source).expanduser() / name
    if path.is_file():
        return path
    if Path(source).expanduser().exists():
        return None
    try:  # a hub id: the file from the local cache, if there
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, name)
    except Exception:  # noqa: BLE001 - no cache, no file
        return None
    return Path(cached) if isinstance(cached, str) else None


def _processor_settings(source: str) -> dict[str, Any]:
    path = _local(source, "processor_config.json")
    if path is None:
        return {}
    data = json.loads(path.read_text())
    return data.get("processor", data) if isinstance(data, dict) else {}


def _processor_class_name(source: str) -> str | None:
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = _local(source, name)
        if path is not None:
            value = json.loads(path.read_text()).get("processor_class")
            if value:
                return str(value)
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    config = read_config(source)
    return PROCESSOR_MAPPING_NAMES.get(getattr(config, "model_type", ""))


def _chat_template(source: str) -> str | None:
    path = _local(source, "chat_template.jinja")
    if path is not None:
        return path.read_text()
    path = _local(source, "chat_template.json")
    if path is not None:
        return json.loads(path.read_text()).get("chat_template")
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = [
    "MODEL_TYPES",
    "check_methods",
    "images_only",
    "images_only_processor",
    "load_processor",
    "model_class_name",
    "read_config",
    "save_images_only",
    "supported_classes",
]
