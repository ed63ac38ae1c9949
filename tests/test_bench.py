"""`prumerge bench` on a tiny random LLaVA saved with a real processor: well-formed output.

No timing assertions: the machine is shared and noisy. The tiny model has 36 patches per
image (6 x 6 at 42 px), a 2-layer Llama decoder with a 100-word vocabulary.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from prumerge.bench import MemoryMeter, parse_configs
from prumerge.cli import main
from prumerge.errors import PrumergeError
from prumerge.methods.spec import MethodSpec
from tests.adapters.conftest import IMAGE_SIZE, IMAGE_TOKEN, PATCHES, tiny_llava

WORDS = ["<pad>", "<s>", "</s>", "[UNK]", "USER:", "ASSISTANT:", "describe", "the", "image."]


def tiny_processor():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(WORDS)}
    vocab.update({f"w{i}": i for i in range(len(WORDS), 100)})
    vocab["<image>"] = IMAGE_TOKEN
    del vocab[f"w{IMAGE_TOKEN}"]
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="[UNK]",
        extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = CLIPImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=7,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llava")
    tiny_llava("dinov2").save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(50, 70), (64, 64), (30, 90)]):
        path = folder / f"photo{i}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def test_processor_expands_image_to_the_patches(tiny_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_dir)
    image = Image.new("RGB", (40, 40))
    ids = processor(images=[image], text=["USER: <image>\ndescribe ASSISTANT:"])["input_ids"][0]
    assert list(ids).count(IMAGE_TOKEN) == PATCHES


def test_json_report(tiny_dir, photos, tmp_path, capsys):
    plot = tmp_path / "bench.png"
    args = [
        "bench",
        "--model",
        str(tiny_dir),
        "--images",
        ",".join(photos),
        "--methods",
        "prumerge,prumerge+,pool@16",
        "--batch",
        "2",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--new-tokens",
        "3",
        "--json",
        "--plot",
        str(plot),
    ]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    report = json.loads(out)
    assert set(report) >= {"setup", "cost_model", "memory", "results", "plot"}
    assert report["setup"]["batches"] == 2  # 3 images, batch 2: the last batch is refilled
    assert report["cost_model"]["decoder"]["num_layers"] == 2
    assert report["cost_model"]["decoder"]["num_kv_heads"] == 2
    assert plot.stat().st_size > 0
    labels = [r["label"] for r in report["results"]]
    assert labels == ["none", "prumerge", "prumerge+", "pool@16"]
    rows = {r["label"]: r for r in report["results"]}
    for row in rows.values():
        assert len(row["tokens_in"]) == len(row["tokens_out"]) == 4
        assert row["tokens_in"] == [PATCHES] * 4
        assert all(1 <= n <= PATCHES for n in row["tokens_out"])
        for name in (
            "vision",
            "tower_projector",
            "prefill",
            "time_to_first_token",
            "decode",
            "end_to_end",
        ):
            entry = row["seconds"][name]
            assert 0 < entry["min"] <= entry["median"] <= entry["max"], name
            assert len(row["samples"][name]) == 2
        assert row["seconds"]["reduce"]["min"] >= 0
        # reduce is a part of vision, TTFT of end-to-end, in every round
        for v, r, t, e in zip(
            *(row["samples"][k] for k in ("vision", "reduce", "time_to_first_token", "end_to_end")),
            strict=True,
        ):
            assert r <= v <= t <= e
        assert row["decode_tokens_per_second"]["median"] > 0
        for name in ("prefill", "time_to_first_token", "decode", "end_to_end"):
            assert row["speedup"][name]["median"] > 0
            assert row["speedup_of_best"][name] > 0
        predicted = row["predicted"]
        assert predicted["prefill_tflops"] > 0 and predicted["prefill_seconds"] > 0
        assert len(row["prompt_tokens"]) == 2
        assert len(row["answers"]) == 4
    assert rows["pool@16"]["tokens_out"] == [16] * 4
    none, pool = rows["none"], rows["pool@16"]
    # The baseline against itself is exactly 1, measured per round and predicted.
    assert none["speedup"]["prefill"] == {"median": 1.0, "min": 1.0, "max": 1.0}
    assert none["predicted"]["speedup"]["prefill_flops"] == 1.0
    # 20 fewer visual tokens per row: the prompts are 20 shorter, and the cost model agrees.
    assert [n - p for n, p in zip(none["prompt_tokens"], pool["prompt_tokens"], strict=True)] == [
        PATCHES - 16
    ] * 2
    assert pool["predicted"]["speedup"]["prefill_flops"] > 1.0
    assert pool["predicted"]["speedup"]["decode_roofline"] >= 1.0
    assert pool["mean_tokens_out"] == 16 and none["mean_tokens_out"] == PATCHES


def test_table_report(tiny_dir, photos, capsys):
    args = [
        "bench",
        "--model",
        str(tiny_dir),
        "--images",
        photos[0],
        "--methods",
        "cls_topk",
        "--keep",
        "8,0.5",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--new-tokens",
        "1",
        "--hardware",
        "a100-80g",
    ]
    threads = torch.get_num_threads()
    try:
        code, out, err = run_cli(args, capsys)
    finally:
        torch.set_num_threads(threads)  # --threads is process-wide
    assert code == 0, err
    assert "speedup vs none" in out and "pred FLOPs" in out and "A100-80G" in out
    for label in ("none", "cls_topk@8", "cls_topk@0.5"):
        assert any(line.startswith(label + " ") for line in out.splitlines()), label
    assert any(line.startswith("bench: round 1/1") for line in err)
    # One new token: no decode steps, so no decode rate.
    assert "n/a" in out


def test_parse_configs():
    configs = parse_configs("prumerge,pool,none,cls_topk@16", "auto,0.25")
    assert [c.label for c in configs] == [
        "none",
        "prumerge",
        "prumerge@0.25",
        "pool@64",
        "pool@0.25",
        "cls_topk@16",
    ]
    assert configs[0] == MethodSpec("none")
    assert configs[1].options == {} and configs[2].options == {"keep": 0.25}
    # pool's default budget is 64: `pool` and `pool@64` are the same configuration.
    assert [c.label for c in parse_configs("pool,pool@64")] == ["none", "pool@64"]
    merged = parse_configs("prumerge,pool", options={"merge": "mean"})
    assert merged[1].options == {"merge": "mean"} and merged[2].options == {}


@pytest.mark.parametrize(
    ("methods", "keeps", "options", "message"),
    [
        ("fastest", None, {}, "unknown method 'fastest'"),
        ("none@4", None, {}, "takes no budget"),
        ("pool", "lots", {}, "--keep: not a number: 'lots'"),
        ("pool", "0", {}, "keep must be >= 1"),
        ("pool@1.5", None, {}, "ratio must be in (0, 1]"),
        ("pool,,tome", None, {}, "comma-separated"),
        ("pool", None, {"knn": 4}, "no method in --methods takes option 'knn'"),
        ("prumerge", None, {"keep": 4}, "--keep"),
        ("prumerge", None, {"attention": "bogus"}, "prumerge: attention must be"),
    ],
)
def test_parse_configs_errors(methods, keeps, options, message):
    with pytest.raises(PrumergeError) as info:
        parse_configs(methods, keeps, options)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--repeats", "0"], "--repeats must be at least 1, got 0"),
        (["--new-tokens", "x"], "--new-tokens must be an integer, got 'x'"),
        (["--batch", "0"], "--batch must be at least 1"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--hardware", "tpu"], "unknown hardware 'tpu'"),
        (["--hardware", "custom", "--bandwidth", "1e11"], "needs --peak-fp16"),
        (["--bandwidth", "1e11"], "need --hardware custom"),
        (["--device", "abacus"], "--device: unknown device 'abacus'"),
        (["--dtype", "int3"], "--dtype: unknown dtype 'int3'"),
        (["--question", " "], "--question is empty"),
        (
            ["--plot", "/no/such/folder/x.png"],
            "--plot /no/such/folder/x.png: folder /no/such/folder does not exist",
        ),
        (["--methods", "pool@many"], "--methods pool@many: not a number: 'many'"),
    ],
)
def test_bad_input_is_one_line(extra, message, photos, capsys):
    code, out, err = run_cli(["bench", "--images", photos[0], *extra], capsys)
    assert code == 2 and out == ""
    assert len(err) == 1 and err[0].startswith("prumerge: error: ") and message in err[0], err


def test_missing_image_and_cuda(capsys, tmp_path, photos):
    code, _, err = run_cli(["bench", "--images", f"{photos[0]},{tmp_path / 'x.png'}"], capsys)
    assert code == 2 and err == [f"prumerge: error: image file not found: {tmp_path / 'x.png'}"]
    if not torch.cuda.is_available():
        code, _, err = run_cli(["bench", "--images", photos[0], "--device", "cuda"], capsys)
        assert (code, err) == (2, ["prumerge: error: --device cuda: CUDA is not available here"])


def test_memory_meter_reports_or_says_not():
    meter = MemoryMeter(torch.device("cpu"))
    meter.start()
    block = torch.ones(8 * 2**20)  # 32 MiB, touched
    result = meter.stop()
    del block
    if meter.kind is None:
        assert result is None
    else:
        assert result["peak"] > 0 and result["growth"] >= 0


def test_generate_answers_split_and_forced_tokens(tiny_dir):
    """The runtime helpers bench and ask share: the split adds up, tokens are forced."""
    import prumerge
    from prumerge.generation import generate_answers
    from prumerge.loading import load_model

    model, processor, prompt = load_model(str(tiny_dir))
    images = [Image.new("RGB", (40, 30), "red"), Image.new("RGB", (30, 40), "blue")]
    with prumerge.apply(model, "prumerge") as handle:
        answer = generate_answers(
            model,
            processor,
            handle,
            images,
            [prompt("describe the image.")] * 2,
            max_new_tokens=5,
            repeats=2,
            warmup=1,
            force_new_tokens=True,
        )
    assert len(answer.timings) == 2 and len(answer.texts) == 2
    for timing in answer.timings:
        assert 0 <= timing.reduce <= timing.vision
        assert timing.steps == 5 and timing.rows == 2
        assert timing.total == pytest.approx(timing.vision + timing.prefill + timing.generate)
        assert timing.decode_tokens_per_second > 0
    # The method's own reduce is restored after the timed calls.
    assert "reduce" not in vars(handle.method)
    assert answer.tokens_in == [PATCHES] * 2


def test_dtype_reaches_the_model_and_the_cost_model(tiny_dir, photos, capsys):
    args = [
        "bench",
        "--model",
        str(tiny_dir),
        "--images",
        photos[1],
        "--methods",
        "pool@9",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--new-tokens",
        "2",
        "--dtype",
        "bfloat16",
        "--json",
    ]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["setup"]["dtype"] == "bfloat16"
    assert report["cost_model"]["precision"] == 16
    assert [r["mean_tokens_out"] for r in report["results"]] == [PATCHES, 9]
