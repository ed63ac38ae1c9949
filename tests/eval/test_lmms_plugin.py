"""The lmms-eval plugin: registration through lmms-eval's registry and entry points, and its
requests answered by the same predictor as `prumerge eval`, on the tiny checkpoint.

lmms-eval's tasks download their datasets, so nothing here runs a stock task: the requests are
built by hand (as lmms-eval's evaluator builds them), and the end-to-end test runs the
lmms-eval command on a local task written into a temporary directory (easy-vqa images and
prompts as a JSON dataset), on the embedded default model, against `prumerge eval`.
scripts/setup.sh installs lmms-eval and its runtime dependencies, so nothing here is skipped.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402
from lmms_eval.models.registry_v2 import ModelRegistryV2  # noqa: E402
from PIL import Image  # noqa: E402

from prumerge.errors import PrumergeError  # noqa: E402
from prumerge.eval import lmms_plugin  # noqa: E402
from prumerge.eval.lmms_plugin import MODEL_NAME, PrumergeLlava  # noqa: E402
from prumerge.eval.predictor import ModelPredictor  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PATCHES = 36
ENTRY_POINT = f"{MODEL_NAME} = prumerge.eval.lmms_plugin:manifest"


def fake_distribution(root: Path) -> Path:
    """A dist-info declaring prumerge's entry point, as `pip install prumerge` will write it."""
    info = root / "prumerge_lmms_entry_point-0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: prumerge-lmms-entry-point\nVersion: 0.0\n"
    )
    (info / "entry_points.txt").write_text(f"[lmms_eval.models]\n{ENTRY_POINT}\n")
    return root


def env_with(*paths: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    parts = [*map(str, paths), str(REPO), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in parts if p)
    return env


# --- registration -----------------------------------------------------------------------------


def test_manifest_resolves_to_the_model_class() -> None:
    registry = ModelRegistryV2()
    registry.register_manifest(lmms_plugin.manifest())
    cls = registry.get_model_class(MODEL_NAME)  # imports and validates, as lmms-eval does
    assert cls is PrumergeLlava and issubclass(cls, lmms) and cls.is_simple


def test_entry_point_registers_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(fake_distribution(tmp_path)))
    found = importlib.metadata.entry_points().select(group="lmms_eval.models")
    assert MODEL_NAME in {ep.name for ep in found}
    registry = ModelRegistryV2()
    registry.load_entrypoint_manifests()  # what lmms-eval runs when lmms_eval.models loads
    assert registry.get_model_class(MODEL_NAME) is PrumergeLlava


def test_lmms_eval_finds_the_model_in_a_fresh_process(tmp_path: Path) -> None:
    code = (
        "from lmms_eval.models import get_model, list_available_models\n"
        f"assert {MODEL_NAME!r} in list_available_models()\n"
        f"print(get_model({MODEL_NAME!r}).__qualname__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env_with(fake_distribution(tmp_path)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "PrumergeLlava"


# --- requests ---------------------------------------------------------------------------------


def picture(seed: int, size: tuple[int, int] = (50, 60)) -> Image.Image:
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


DOCS = [
    {"q": "Is there a red circle?", "images": [picture(0)]},
    {"q": "<image>\nWhat color is the star?", "images": [picture(1, (30, 30))]},
    {"q": "How many objects are there?", "images": [picture(2)]},
    {"q": "Is the left one above the right one?", "images": [picture(3), picture(4)]},
    {"q": "Answer yes or no.", "images": []},
]


def requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [
        Instance(kind, args, idx=0, metadata={"task": "t", "doc_id": args[3], "repeats": 1})
        for args in arguments
    ]


def visuals(doc: dict) -> list[Image.Image]:
    return doc["images"]


@pytest.fixture
def plugin(tiny_checkpoint: Path, one_thread: None):
    def build(args: str) -> PrumergeLlava:
        model = PrumergeLlava.create_from_arg_string(
            f"pretrained={tiny_checkpoint},{args}", {"batch_size": "2"}
        )
        model.task_dict = {"t": {"test": DOCS}}
        return model

    return build


def test_generate_until_batches_like_single_predictions(plugin) -> None:
    lm = plugin("method=prumerge+,keep=0.25")
    short = {"max_new_tokens": 3, "until": ["\n\n"]}
    longer = {"max_new_tokens": 6, "do_sample": False}
    # two generation settings interleaved, so the plugin groups, batches and reorders
    arguments = [
        (doc["q"], short if i % 2 == 0 else longer, visuals, i, "t", "test")
        for i, doc in enumerate(DOCS)
    ]
    answers = lm.generate_until(requests("generate_until", arguments))

    predictor: ModelPredictor = lm.predictor
    expected = []
    for i, doc in enumerate(DOCS):
        limit = 3 if i % 2 == 0 else 6
        question = doc["q"].replace("<image>\n", "")
        (single,) = predictor.generate([question], [doc["images"]], max_new_tokens=limit)
        expected.append(single.text)
    assert answers == expected
    images = sum(len(doc["images"]) for doc in DOCS)
    assert lm.visual_tokens == {
        "images": images,
        "in": images * PATCHES,
        "out": images * PATCHES // 4,
    }


def test_until_cuts_and_max_new_tokens_caps(plugin) -> None:
    lm = plugin("method=none,max_new_tokens=2")
    (free,) = lm.generate_until(
        requests(
            "generate_until", [(DOCS[0]["q"], {"max_new_tokens": 50}, visuals, 0, "t", "test")]
        )
    )
    assert 1 <= len(free.split()) <= 2  # the model_args cap wins over the task's 50
    stop = free.split()[-1]
    (cut,) = lm.generate_until(
        requests("generate_until", [(DOCS[0]["q"], {"until": [stop]}, visuals, 0, "t", "test")])
    )
    assert stop not in cut and free.startswith(cut)


def test_loglikelihood_matches_the_unpatched_model_and_knows_its_greedy_answer(
    plugin, tiny_checkpoint: Path
) -> None:
    import torch

    from prumerge.loading import load_model

    lm = plugin("method=none")
    doc = DOCS[0]
    (answer,) = lm.generate_until(
        requests("generate_until", [(doc["q"], {"max_new_tokens": 3}, visuals, 0, "t", "test")])
    )
    target = " " + answer
    args = [
        (doc["q"], target, visuals, 0, "t", "test"),
        (doc["q"], " yes no", visuals, 0, "t", "test"),
    ]
    (greedy_logprob, is_greedy), (_, other_is_greedy) = lm.loglikelihood(
        requests("loglikelihood", args)
    )
    assert is_greedy and not other_is_greedy and greedy_logprob < 0

    # the same number from the unpatched model, computed by hand
    model, processor, prompt_fn = load_model(str(tiny_checkpoint))
    prompt = prompt_fn(doc["q"])
    full = processor(images=doc["images"], text=[prompt + target], return_tensors="pt")
    alone = processor(images=doc["images"], text=[prompt], return_tensors="pt")
    n = full["input_ids"].shape[1] - alone["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(**full).logits[0, -n - 1 : -1]
    expected = torch.log_softmax(logits, -1).gather(-1, full["input_ids"][0, -n:, None]).sum()
    assert greedy_logprob == pytest.approx(float(expected), abs=1e-4)


def test_options_and_refusals(plugin) -> None:
    lm = plugin("method=prumerge,keep=adaptive,merge=mean")
    assert lm.predictor.method.options()["merge"] == "mean"
    assert lm.predictor.method.keep is None
    lm.task_dict = {"t": {"test": [{"q": "x", "images": ["clip.mp4"]}]}}
    with pytest.raises(PrumergeError, match="images only"):
        lm.generate_until(requests("generate_until", [("x", {}, visuals, 0, "t", "test")]))
    lm.clean()
    assert not hasattr(lm.predictor.model, "_prumerge_handle")
    with pytest.raises(PrumergeError, match="takes no option 'bogus'|does not take option"):
        plugin("method=prumerge,bogus=1")


def test_budgets_options_dtype_and_device_map_through_model_args(plugin) -> None:
    import torch

    # lmms-eval's own argument parser turns "1" into 1 and "1.0" into 1.0: a count of one
    # token and a ratio of all of them, as on the command line
    assert plugin("method=pool,keep=1").predictor.method.keep == 1
    assert plugin("method=pool,keep=1.0").predictor.method.keep == 1.0
    lm = plugin("method=prumerge,merge=none,dtype=bfloat16,device_map=cpu")
    assert lm.predictor.method.merge == "none"  # a string, not Python None
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    assert str(lm.device) == "cpu"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ("method=prumerge,knn=abc", "option knn takes an integer"),
        ("method=prumerge,merge=maybe", "merge must be one of 'sum', 'mean', 'none'; got 'maybe'"),
        ("method=pool,keep=0", "keep must be >= 1"),
        ("method=pool,keep=lots", "not a number: 'lots'"),
        ("method=prumerge,dtype=int3", "unknown dtype 'int3'"),
        ("method=prumerge,device_map=nowhere", "'nowhere' is not auto"),
        ("method=prumerge,max_new_tokens=-2", "max_new_tokens must be a positive integer"),
    ],
)
def test_bad_model_args_fail_before_the_model_loads(args: str, needle: str) -> None:
    with pytest.raises(PrumergeError, match=needle):  # not "model path does not exist"
        PrumergeLlava.create_from_arg_string(f"pretrained=/no/such/model,{args}", {})


# --- the lmms-eval command, end to end on a local task ----------------------------------------

TASK = """\
task: prumerge_easy_vqa_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function task_utils.doc_to_visual
doc_to_text: !function task_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
process_results: !function task_utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

# The task reads the same images and prompts as `prumerge eval --benchmark easy-vqa`, and scores
# with the same metric function.
TASK_UTILS = """\
from PIL import Image

from prumerge.eval.metrics import exact_match


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["prompt"]


def process_results(doc, results):
    return {"exact_match": exact_match(results[0], doc["answers"])}
"""


def test_lmms_eval_scores_like_prumerge_eval(
    default_model_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`lmms_eval --model prumerge_llava` on easy-vqa images served as a local JSON dataset
    (through `datasets`) gives the same answers and score as `prumerge eval` on those samples."""
    from prumerge.cli import main
    from prumerge.eval.datasets import load_benchmark
    from prumerge.eval.predictor import max_new_tokens_for

    limit = 8
    argv = ["eval", "--benchmark", "easy-vqa", "--limit", str(limit), "--methods", "prumerge+"]
    argv += ["--cache-dir", str(default_model_cache), "--out", str(tmp_path / "ours")]
    argv += ["--batch-size", "1", "--json", "--no-progress", "--no-plot", "--device", "cpu"]
    assert main(argv) == 0
    ours = json.loads(capsys.readouterr().out)["configs"]["prumerge+"]
    predictions = [
        json.loads(line)
        for line in (tmp_path / "ours" / "prumerge+" / "predictions.jsonl").read_text().splitlines()
    ]

    bench = load_benchmark("easy-vqa", limit=limit)
    data = tmp_path / "easy-vqa.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "id": s.id,
                    "prompt": s.prompt,
                    "answer": s.answers[0],
                    "answers": list(s.answers),
                    "image": str(s.image),
                }
            )
            + "\n"
            for s in bench.samples
        )
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    task = TASK.format(data=data, max_new_tokens=max_new_tokens_for(bench.metric))
    (tasks / "prumerge_easy_vqa_local.yaml").write_text(task)
    (tasks / "task_utils.py").write_text(TASK_UTILS)

    model_args = f"method=prumerge+,keep=adaptive,cache_dir={default_model_cache}"
    command = [sys.executable, "-m", "lmms_eval", "--model", MODEL_NAME, "--model_args", model_args]
    command += ["--tasks", "prumerge_easy_vqa_local", "--include_path", str(tasks)]
    command += ["--batch_size", "1", "--device", "cpu", "--log_samples"]
    command += ["--output_path", str(tmp_path / "lmms")]
    env = env_with(fake_distribution(tmp_path / "entry"), tasks)
    env["HF_HOME"] = str(tmp_path / "hf")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

    (results_file,) = (tmp_path / "lmms").rglob("*_results.json")
    theirs = json.loads(results_file.read_text())["results"]["prumerge_easy_vqa_local"]
    (samples_file,) = (tmp_path / "lmms").rglob("*_samples_prumerge_easy_vqa_local.jsonl")
    logged = [json.loads(line) for line in samples_file.read_text().splitlines()]
    answers = [row["filtered_resps"] for row in sorted(logged, key=lambda row: row["doc_id"])]
    assert answers == [row["prediction"] for row in predictions]  # in benchmark order
    assert 100 * theirs["exact_match,none"] == pytest.approx(ours["score"], abs=1e-9)
    assert ours["n"] == len(logged) == limit
