"""Every family through every command: ``ask``, ``eval``, ``bench`` and the lmms-eval plugin
load the tiny checkpoint of each family (``scripts/tiny_checkpoints.py``) through the one
loader, report visual tokens in and out, and ``--method none`` answers as the unpatched model
does through plain transformers. Bad input fails in one line, exit 2, before any weights load.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from prumerge.cli import main
from prumerge.models import tiny

#: Every family of the tiny-checkpoint table, which ``scripts/tiny_checkpoints.py`` writes.
FAMILIES = list(tiny.CONFIGS)
QUESTION = "what color is the shape?"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import numpy as np

    path = tmp_path_factory.mktemp("image") / "photo.png"
    pixels = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, list[str]]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def test_every_built_in_family_has_a_tiny_checkpoint(tiny_families):
    from prumerge.adapters import FAMILIES as REGISTERED

    built_in = {name for name in REGISTERED if REGISTERED[name].__module__.startswith("prumerge.")}
    assert built_in == set(FAMILIES) == set(tiny_families)


@pytest.mark.parametrize("family", FAMILIES)
def test_ask_json_reports_tokens(family, tiny_families, image, capsys, one_thread):
    model = str(tiny_families[family])
    argv = ["ask", str(image), QUESTION, "--model", model, "--method", "prumerge", "--json"]
    code, out, _ = run([*argv, "--max-new-tokens", "4"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["visual_tokens_in"] > report["visual_tokens_out"] >= 1
    assert report["answer"].strip()
    seconds = report["seconds"]
    assert seconds["vision"] > 0 and seconds["prefill"] > 0 and seconds["generate"] > 0


def _plain_answer(directory: Path, image: Path, new_tokens: int) -> str:
    """Greedy answer of the unpatched model, loaded by its own transformers class."""
    import torch
    import transformers

    from prumerge.loading.checkpoint import load_processor

    config = json.loads((directory / "config.json").read_text())
    model = getattr(transformers, config["architectures"][0]).from_pretrained(str(directory))
    processor = load_processor(str(directory))
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[Image.open(image).convert("RGB")], text=[text], return_tensors="pt")
    with torch.inference_mode():
        out = model.eval().generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    return processor.batch_decode(new, skip_special_tokens=True)[0].strip()


@pytest.mark.parametrize("family", FAMILIES)
def test_none_answers_as_plain_transformers(family, tiny_families, image, capsys, one_thread):
    model = tiny_families[family]
    argv = ["ask", str(image), QUESTION, "--model", str(model), "--method", "none", "--json"]
    code, out, _ = run([*argv, "--max-new-tokens", "6"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["visual_tokens_in"] == report["visual_tokens_out"]
    assert report["answer"] == _plain_answer(model, image, 6)


def test_each_family_answers_in_its_own_prompt_format(tiny_families):
    from prumerge.loading import prompt_function
    from prumerge.loading.checkpoint import load_processor

    prompts = {f: prompt_function(load_processor(str(tiny_families[f])))("hi") for f in FAMILIES}
    assert prompts["llava"] == "USER: <image>\nhi ASSISTANT:"
    assert prompts["llava_next"] == "[INST] <image>\nhi [/INST]"
    assert prompts["llava_onevision"].startswith("<|im_start|>user <image>\nhi<|im_end|>")
    qwen = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n"
    assert prompts["qwen2_vl"] == prompts["qwen2_5_vl"] == qwen + "<|im_start|>assistant\n"
    assert prompts["qwen3_vl"] == prompts["qwen2_5_vl"]
    assert prompts["internvl"] == (
        "<|im_start|>user\n<IMG_CONTEXT>\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompts["gemma3"] == (
        "<start_of_turn>user\n<start_of_image>hi<end_of_turn>\n<start_of_turn>model\n"
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_bench_runs_and_reports_tokens(family, tiny_families, image, capsys, one_thread):
    argv = ["bench", "--model", str(tiny_families[family]), "--images", str(image)]
    argv += ["--methods", "prumerge", "--repeats", "1", "--warmup", "0", "--new-tokens", "2"]
    code, out, _ = run([*argv, "--json"], capsys)
    assert code == 0
    results = {r["label"]: r for r in json.loads(out)["results"]}
    assert results["none"]["tokens_in"] == results["none"]["tokens_out"]
    assert results["prumerge"]["tokens_in"] == results["none"]["tokens_in"]
    assert 1 <= results["prumerge"]["tokens_out"][0] < results["prumerge"]["tokens_in"][0]
    for result in results.values():
        assert result["seconds"]["vision"]["median"] > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_limit_4_on_a_local_benchmark(family, tiny_families, tmp_path, capsys, one_thread):
    out = tmp_path / "results"
    argv = ["eval", "--benchmark", "synth", "--benchmark-option", "n_scenes=1", "--limit", "4"]
    argv += ["--model", str(tiny_families[family]), "--out", str(out), "--no-progress"]
    code, _, err = run([*argv, "--methods", "prumerge"], capsys)
    assert code == 0, err
    from prumerge.eval.runner import read_predictions

    rows = read_predictions(out / "prumerge")
    assert len(rows) == 4
    assert all(r["tokens_in"] > r["tokens_out"] >= 1 for r in rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_lmms_plugin_loads_every_family(family, tiny_families, image, one_thread):
    pytest.importorskip("lmms_eval")
    from lmms_eval.api.instance import Instance

    from prumerge.eval.lmms_plugin import PrumergeLlava

    lm = PrumergeLlava.create_from_arg_string(
        f"pretrained={tiny_families[family]},method=prumerge", {"batch_size": "1"}
    )
    doc = {"images": [Image.open(image).convert("RGB")]}
    lm.task_dict = {"t": {"test": [doc]}}
    request = Instance(
        "generate_until",
        (QUESTION, {"max_new_tokens": 3}, lambda d: d["images"], 0, "t", "test"),
        idx=0,
        metadata={"task": "t", "doc_id": 0, "repeats": 1},
    )
    (answer,) = lm.generate_until([request])
    assert isinstance(answer, str) and answer
    assert lm.visual_tokens["images"] == 1
    assert lm.visual_tokens["in"] > lm.visual_tokens["out"] >= 1


# --- bad input: one line, exit 2, before any weights load --------------------------------------


@pytest.fixture
def no_weights(monkeypatch):
    """Make every model class's from_pretrained fail loudly: nothing may load."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("weights must not load")

    for name in ["LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration"]:
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", refuse)


def test_unsupported_architecture_fails_before_loading(tmp_path, image, capsys):
    model = tmp_path / "bert"
    model.mkdir()
    config = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": 10}
    (model / "config.json").write_text(json.dumps(config))
    code, _, err = run(["ask", str(image), "hi", "--model", str(model)], capsys)
    assert code == 2
    assert len(err) == 1
    assert "BertForMaskedLM is not supported" in err[0]
    assert "Qwen2_5_VLForConditionalGeneration" in err[0] and "LlavaNext" in err[0]


def test_a_method_the_family_cannot_run_fails_before_loading(
    tiny_families, image, capsys, no_weights
):
    model = str(tiny_families["llava_next"])
    code, _, err = run(
        ["ask", str(image), "hi", "--model", model, "--method", "downsample"], capsys
    )
    assert code == 2
    assert len(err) == 1 and "downsample is not supported on LLaVA-NeXT" in err[0]
    argv = ["bench", "--model", model, "--images", str(image), "--methods", "downsample"]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert len(err) == 1 and "downsample is not supported on LLaVA-NeXT" in err[0]


def test_a_bad_spec_fails_before_loading(tiny_families, image, capsys, no_weights):
    model = str(tiny_families["llava_next"])
    code, _, err = run(["ask", str(image), "hi", "--model", model, "--keep", "banana"], capsys)
    assert code == 2
    assert len(err) == 1 and "banana" in err[0]


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_shared_prefix_answers_as_generate_on_anyres(family, tiny_families, image, one_thread):
    """``ModelPredictor.predict`` shares each image's prefix (its image sizes passed to the
    adapter) and answers as ``generate`` does, question by question."""
    from prumerge.data.sample import Sample
    from prumerge.eval.predictor import ModelPredictor
    from prumerge.loading import load_model

    model, processor, prompt_fn = load_model(str(tiny_families[family]))
    picture = Image.open(image).convert("RGB")
    questions = [QUESTION, "how many objects are there?"]
    samples = [
        Sample(id=str(i), image=picture, prompt=q, answers=("x",)) for i, q in enumerate(questions)
    ]
    with ModelPredictor(model, processor, prompt_fn, "prumerge", max_new_tokens=5) as predictor:
        shared = predictor.predict(samples)
        single = predictor.generate(questions, [[picture]] * 2, max_new_tokens=5)
    assert [p.text for p in shared] == [g.text for g in single]
    assert [p.tokens_out for p in shared] == [g.tokens_out for g in single]


@pytest.mark.parametrize("family", FAMILIES)
def test_demo_compares_on_every_family(family, tiny_families, image, one_thread):
    """The demo's model (``DemoModel.load``, what ``prumerge demo --model`` runs) answers with
    ``none`` and a method, each with its tokens in and out."""
    from prumerge.demo.compare import DemoModel, choose_configs, compare

    demo = DemoModel.load(str(tiny_families[family]))
    picture = Image.open(image).convert("RGB")
    result = compare(
        demo, picture, QUESTION, choose_configs(["prumerge"]), max_new_tokens=2, pictures=False
    )
    assert [r.label for r in result.results] == ["none", "prumerge"]
    none, pruned = result.results
    assert none.tokens_in == none.tokens_out == pruned.tokens_in
    assert 1 <= pruned.tokens_out < pruned.tokens_in
