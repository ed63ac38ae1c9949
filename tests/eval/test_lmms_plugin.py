"""The lmms-eval plugin: registration through lmms-eval's registry and entry points, and its
requests answered by the same predictor as `prumerge eval`, on the tiny checkpoint.

lmms-eval's tasks download their datasets, so nothing here runs a stock task: the requests are
built by hand (as lmms-eval's evaluator builds them), and the end-to-end test runs the
lmms-eval command on a local task written into a temporary directory.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "lmms_eval.models",
    reason="lmms-eval is not installed (pip install lmms-eval==0.7.3; its model API needs "
    "only loguru and pytz besides what prumerge has)",
)

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

    from prumerge.runtime import load_model

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


# --- the lmms-eval command, end to end on a local task ----------------------------------------

FULL_STACK = ("datasets", "evaluate", "sacrebleu", "pytablewriter", "filelock._api")


def _missing(modules: tuple[str, ...]) -> list[str]:
    missing = []
    for name in modules:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except ModuleNotFoundError:
            missing.append(name)
    return missing


TASK = """\
task: prumerge_local_shapes
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
  max_new_tokens: 4
  until: ["\\n"]
process_results: !function task_utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

TASK_UTILS = """\
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"] + "\\nAnswer the question using a single word or phrase."


def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"])}
"""


@pytest.mark.skipif(
    bool(_missing(FULL_STACK)),
    reason=f"the lmms-eval command needs its full install; missing: {_missing(FULL_STACK)} "
    "(filelock._api: lmms-eval 0.7.3 needs filelock<4)",
)
def test_lmms_eval_command_on_a_local_task(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from prumerge.data import synth

    data = tmp_path / "data"
    data.mkdir()
    lines = []
    for scene in synth.generate(2, split="test", seed=0):
        path = data / f"{scene.id}.png"
        scene.image.save(path)
        lines += [
            {"question": q.question, "answer": q.answer, "image": str(path)}
            for q in scene.questions[:3]
        ]
    (data / "test.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "prumerge_local_shapes.yaml").write_text(TASK.format(data=data / "test.jsonl"))
    (tasks / "task_utils.py").write_text(TASK_UTILS)

    command = [sys.executable, "-m", "lmms_eval", "--model", MODEL_NAME]
    command += ["--model_args", f"pretrained={tiny_checkpoint},method=prumerge+,keep=0.25"]
    command += ["--tasks", "prumerge_local_shapes", "--include_path", str(tasks)]
    command += ["--batch_size", "4", "--device", "cpu", "--output_path", str(tmp_path / "out")]
    env = env_with(fake_distribution(tmp_path / "entry"), tasks)
    env["HF_HOME"] = str(tmp_path / "hf")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "prumerge_local_shapes" in result.stdout and "exact_match" in result.stdout
    (results_file,) = (tmp_path / "out").rglob("*_results.json")
    results = json.loads(results_file.read_text())["results"]["prumerge_local_shapes"]
    assert 0.0 <= results["exact_match,none"] <= 1.0
