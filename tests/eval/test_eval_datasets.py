"""Loaders on tiny fixture data written here, in the layouts LLaVA's evaluation uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from prumerge.errors import PrumergeError
from prumerge.eval.datasets import (
    BENCHMARKS,
    Sample,
    load_benchmark,
    scienceqa_prompt,
    textvqa_question,
)
from prumerge.eval.metrics import METRICS, score_records
from prumerge.eval.runner import EvalConfig, Prediction, run_config, summarize

SHORT = "\nAnswer the question using a single word or phrase."


def _image(path: Path, color: str = "red") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)


def _jsonl(path: Path, items: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item) + "\n" for item in items))


def _json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1))


# --- registry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_benchmark_is_described_and_scored_by_a_known_metric(name: str) -> None:
    spec = BENCHMARKS[name]
    assert spec.metric in METRICS and spec.description and spec.loader.__doc__


@pytest.mark.parametrize("name", sorted(n for n, s in BENCHMARKS.items() if s.needs_root))
def test_every_file_benchmark_explains_an_empty_directory(name: str, tmp_path: Path) -> None:
    with pytest.raises(PrumergeError, match=str(tmp_path)):
        load_benchmark(name, tmp_path)


@pytest.mark.parametrize("name", sorted(n for n, s in BENCHMARKS.items() if not s.needs_root))
def test_builtin_benchmarks_load(name: str) -> None:
    bench = load_benchmark(name, limit=4)
    assert len(bench) == 4 and bench.options["limit"] == 4
    for sample in bench.samples:
        assert isinstance(sample, Sample) and sample.task == name and sample.answers
        assert sample.load_image().mode == "RGB"


def test_registry_errors(tmp_path: Path) -> None:
    with pytest.raises(PrumergeError, match="unknown benchmark 'vqa3'.*known benchmarks:.*pope"):
        load_benchmark("vqa3")
    with pytest.raises(PrumergeError, match="needs a data directory"):
        load_benchmark("pope")
    with pytest.raises(PrumergeError, match="does not exist"):
        load_benchmark("pope", tmp_path / "nowhere")
    with pytest.raises(PrumergeError, match="unexpected keyword"):
        load_benchmark("synth", n_scene=3)


def test_easy_vqa_matches_the_package() -> None:
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_test_questions()
    bench = load_benchmark("easy-vqa", limit=50)
    first = bench.samples[0]
    assert first.prompt == questions[0] + SHORT and first.answers == (answers[0],)
    assert first.image.path == Path(easy_vqa.get_test_image_paths()[image_ids[0]])
    kinds = {s.subtask: s.answers[0] for s in bench.samples}
    assert kinds.get("yes/no") in ("yes", "no")
    assert kinds.get("shape", "circle") in ("circle", "rectangle", "triangle")


# --- VQAv2 ------------------------------------------------------------------------------------


def _vqav2(root: Path) -> None:
    _image(root / "val2014" / "COCO_val2014_000000000042.jpg")
    _image(root / "val2014" / "COCO_val2014_000000000043.jpg")
    _jsonl(
        root / "questions.jsonl",
        [
            {
                "question_id": 420,
                "image": "COCO_val2014_000000000042.jpg",
                "text": "How many dogs?" + SHORT,
                "category": "default",
            },
            {
                "question_id": 430,
                "image": "COCO_val2014_000000000043.jpg",
                "text": "Is it sunny?" + SHORT,
                "category": "default",
            },
        ],
    )
    ten = [{"answer": a, "answer_id": i + 1} for i, a in enumerate(["2"] * 7 + ["two"] * 3)]
    _json(
        root / "annotations.json",
        {
            "annotations": [
                {"question_id": 420, "answers": ten, "answer_type": "number"},
                {"question_id": 430, "answers": [{"answer": "yes"}] * 10, "answer_type": "yes/no"},
            ]
        },
    )


def test_vqav2_llava_jsonl_with_annotations(tmp_path: Path) -> None:
    _vqav2(tmp_path)
    bench = load_benchmark(
        "vqav2",
        tmp_path,
        question_file="questions.jsonl",
        annotation_file="annotations.json",
        image_dir="val2014",
    )
    first, second = bench.samples
    assert (first.id, first.prompt, first.subtask) == ("420", "How many dogs?" + SHORT, "number")
    assert first.answers == ("2",) * 7 + ("two",) * 3
    assert first.image.path == tmp_path / "val2014" / "COCO_val2014_000000000042.jpg"
    assert second.subtask == "yes/no" and bench.metric == "vqa_accuracy"
    records = [{"prediction": "Two", "answers": list(first.answers)}]
    assert score_records("vqa_accuracy", records)["score"] == pytest.approx(100.0)


def test_vqav2_official_question_json_and_no_answers(tmp_path: Path) -> None:
    _vqav2(tmp_path)
    _json(
        tmp_path / "v2_questions.json",
        {"questions": [{"question_id": 420, "image_id": 42, "question": "How many dogs?"}]},
    )
    bench = load_benchmark(
        "vqav2", tmp_path, question_file="v2_questions.json", image_dir="val2014"
    )
    (sample,) = bench.samples
    assert sample.prompt == "How many dogs?" + SHORT and sample.answers == ()
    assert sample.image.path.name == "COCO_val2014_000000000042.jpg"


def test_vqav2_errors(tmp_path: Path) -> None:
    _vqav2(tmp_path)
    kwargs = {"question_file": "questions.jsonl", "image_dir": "val2014"}
    with pytest.raises(PrumergeError, match="question file .*missing.jsonl not found"):
        load_benchmark("vqav2", tmp_path, question_file="missing.jsonl", image_dir="val2014")
    path = tmp_path / "questions.jsonl"
    good = path.read_text()
    path.write_text(good + "{broken\n")
    with pytest.raises(PrumergeError, match=r"questions.jsonl line 3: not valid JSON"):
        load_benchmark("vqav2", tmp_path, **kwargs)
    path.write_text(good + '{"question_id": 1, "image": "x.jpg"}\n')
    with pytest.raises(PrumergeError, match=r"line 3: missing field 'text'"):
        load_benchmark("vqav2", tmp_path, **kwargs)
    path.write_text(good + '{"question_id": 1, "image": "gone.jpg", "text": "Q?"}\n')
    with pytest.raises(PrumergeError, match=r"line 3: image .*gone.jpg not found"):
        load_benchmark("vqav2", tmp_path, **kwargs)
    assert len(load_benchmark("vqav2", tmp_path, check_images=False, **kwargs)) == 3
    with pytest.raises(PrumergeError, match=r"line 3: question 1 has no annotation"):
        load_benchmark(
            "vqav2", tmp_path, annotation_file="annotations.json", check_images=False, **kwargs
        )
    (tmp_path / "annotations.json").write_text('{"annotations": [\n  {"question_id": 1,}\n]}')
    with pytest.raises(PrumergeError, match=r"annotations.json line 2 column \d+: not valid"):
        load_benchmark("vqav2", tmp_path, annotation_file="annotations.json", **kwargs)


# --- TextVQA ----------------------------------------------------------------------------------


def _textvqa(root: Path) -> None:
    _image(root / "train_images" / "abc123.jpg")
    _json(
        root / "TextVQA_0.5.1_val.json",
        {
            "data": [
                {
                    "question_id": 34602,
                    "image_id": "abc123",
                    "question": "what brand is this?",
                    "answers": ["nokia"] * 9 + ["nokla"],
                    "ocr_tokens": ["NOKIA", "5"],
                },
                {
                    "question_id": 34603,
                    "image_id": "abc123",
                    "question": "what number is it?",
                    "answers": ["5"] * 10,
                    "ocr_tokens": [],
                },
            ]
        },
    )
    _jsonl(
        root / "llava_textvqa_val_v051_ocr.jsonl",
        [
            {
                "question_id": "abc123",
                "image": "abc123.jpg",
                "text": "What number is it?\nReference OCR token: NOKIA, 5" + SHORT,
            },
            {
                "question_id": "abc123",
                "image": "abc123.jpg",
                "text": "what brand is this?\nReference OCR token: NOKIA, 5" + SHORT,
            },
        ],
    )


def test_textvqa_llava_prompts_matched_to_annotations(tmp_path: Path) -> None:
    _textvqa(tmp_path)
    bench = load_benchmark("textvqa", tmp_path)
    first, second = bench.samples
    # matched by image id and lowercased question, as LLaVA's evaluator does
    assert first.id == "34603" and first.answers == ("5",) * 10
    assert first.prompt == "What number is it?\nReference OCR token: NOKIA, 5" + SHORT
    assert second.id == "34602" and second.answers[-1] == "nokla"


def test_textvqa_prompts_built_from_ocr_tokens(tmp_path: Path) -> None:
    _textvqa(tmp_path)
    first, second = load_benchmark("textvqa", tmp_path, question_file=None).samples
    assert first.prompt == "what brand is this?\nReference OCR token: NOKIA, 5" + SHORT
    assert second.prompt == "what number is it?" + SHORT  # no tokens, no OCR line


def test_textvqa_question_extraction() -> None:
    assert textvqa_question("What?\nReference OCR token: a, b" + SHORT) == "what?"
    assert textvqa_question("Reference OCR token: a\nWhat?" + SHORT) == "what?"


def test_textvqa_unmatched_question(tmp_path: Path) -> None:
    _textvqa(tmp_path)
    path = tmp_path / "llava_textvqa_val_v051_ocr.jsonl"
    path.write_text(path.read_text() + json.dumps({"question_id": "abc123", "text": "who?"}))
    with pytest.raises(PrumergeError, match=r"line 3: no annotation .* question 'who\?'"):
        load_benchmark("textvqa", tmp_path)


# --- POPE -------------------------------------------------------------------------------------


def _pope(root: Path) -> None:
    _image(root / "val2014" / "COCO_val2014_1.jpg")
    for split in ("random", "popular", "adversarial"):
        _jsonl(
            root / "coco" / f"coco_pope_{split}.json",
            [
                {
                    "question_id": 1,
                    "image": "COCO_val2014_1.jpg",
                    "text": "Is there a dog in the image?",
                    "label": "yes",
                },
                {
                    "question_id": 2,
                    "image": "COCO_val2014_1.jpg",
                    "text": f"Is there a {split} cat in the image?",
                    "label": "no",
                },
            ],
        )


def test_pope_splits_prompts_and_scoring(tmp_path: Path) -> None:
    _pope(tmp_path)
    bench = load_benchmark("pope", tmp_path)
    assert [s.id for s in bench.samples] == [
        "random-1",
        "random-2",
        "popular-1",
        "popular-2",
        "adversarial-1",
        "adversarial-2",
    ]
    assert bench.samples[0].prompt == "Is there a dog in the image?" + SHORT
    assert bench.samples[5].subtask == "adversarial" and bench.samples[5].answers == ("no",)
    assert [s.id for s in load_benchmark("pope", tmp_path, splits=["popular"]).samples] == [
        "popular-1",
        "popular-2",
    ]

    class AlwaysYes:
        def predict(self, samples):
            return [Prediction("Yes, there is.", 576, 576) for _ in samples]

    run_config(bench, EvalConfig("none"), AlwaysYes(), tmp_path / "out", progress=False)
    scores = summarize(tmp_path / "out", write=False).results[0].scores
    # per split: TP=1 FP=1 -> precision 1/2, recall 1, F1 2/3, yes ratio 1
    assert scores["adversarial/f1"] == pytest.approx(200 / 3)
    assert scores["random/yes_ratio"] == pytest.approx(100.0)
    assert scores["score"] == pytest.approx(200 / 3)


def test_pope_errors(tmp_path: Path) -> None:
    _pope(tmp_path)
    path = tmp_path / "coco" / "coco_pope_popular.json"
    path.write_text(
        path.read_text()
        + json.dumps(
            {"question_id": 3, "image": "COCO_val2014_1.jpg", "text": "Q?", "label": "maybe"}
        )
        + "\n"
    )
    with pytest.raises(PrumergeError, match=r"coco_pope_popular.json line 3: label should be"):
        load_benchmark("pope", tmp_path)
    path.unlink()
    with pytest.raises(PrumergeError, match=r"coco_pope_popular.json not found"):
        load_benchmark("pope", tmp_path)
    with pytest.raises(PrumergeError, match="unknown splits"):
        load_benchmark("pope", tmp_path, splits=["hard"])


# --- MME --------------------------------------------------------------------------------------


def _mme(root: Path) -> None:
    # flat layout: images and their question files side by side
    _image(root / "existence" / "000000006040.jpg")
    (root / "existence" / "000000006040.txt").write_text(
        "Is there a train in this image? Please answer yes or no.\tYes\n"
        "Is there a bed in this image? Please answer yes or no.\tNo\n"
    )
    # nested layout
    _image(root / "artwork" / "images" / "10002.png")
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork by Titian? Please answer yes or no.\tYes\r\n"
        "Is this artwork by Monet? Please answer yes or no.\tNo\r\n"
    )


def test_mme_both_layouts(tmp_path: Path) -> None:
    _mme(tmp_path)
    bench = load_benchmark("mme", tmp_path)
    ids = [s.id for s in bench.samples]
    assert ids == [
        "existence/000000006040/0",
        "existence/000000006040/1",
        "artwork/10002/0",
        "artwork/10002/1",
    ]
    first = bench.samples[0]
    assert first.prompt == "Is there a train in this image? Please answer yes or no." + SHORT
    assert first.answers == ("Yes",) and first.meta["image"] == "existence/000000006040.jpg"
    assert bench.samples[3].answers == ("No",) and bench.samples[3].image.path.suffix == ".png"
    records = [
        {"prediction": p, "answers": list(s.answers), "subtask": s.subtask, "meta": s.meta}
        for s, p in zip(bench.samples, ["Yes", "No", "Yes", "Yes"], strict=True)
    ]
    scores = score_records("mme", records)
    # existence: 2/2 right, 1/1 image -> 200; artwork: 1/2, 0/1 -> 50
    assert (scores["existence"], scores["artwork"], scores["perception"]) == (200, 50, 250)


def test_mme_errors(tmp_path: Path) -> None:
    with pytest.raises(PrumergeError, match="no MME subtask folders"):
        load_benchmark("mme", tmp_path)
    _mme(tmp_path)
    with pytest.raises(PrumergeError, match="unknown subtask 'colour'"):
        load_benchmark("mme", tmp_path, subtasks=["colour"])
    text = tmp_path / "existence" / "000000006040.txt"
    good = text.read_text()
    text.write_text(good + "A question without an answer\n")
    with pytest.raises(PrumergeError, match=r"000000006040.txt line 3: expected"):
        load_benchmark("mme", tmp_path)
    text.write_text(good)
    (tmp_path / "existence" / "orphan.txt").write_text("Q?\tYes\n")
    with pytest.raises(PrumergeError, match=r"orphan.txt: no image orphan"):
        load_benchmark("mme", tmp_path, subtasks=["existence"])


# --- ScienceQA-IMG ----------------------------------------------------------------------------

PROBLEMS = {
    "5": {
        "question": "Which is farthest north?",
        "choices": ["Ohio", "Texas", "Utah"],
        "answer": 0,
        "hint": "",
        "image": "image.png",
        "subject": "social science",
    },
    "6": {
        "question": "Which is a solid?",
        "choices": ["milk", "rock"],
        "answer": 1,
        "hint": "Select the best answer.",
        "image": None,
        "subject": "natural science",
    },
    "7": {
        "question": "What is shown?",
        "choices": ["a fox", "a dog"],
        "answer": 1,
        "hint": "Look at the picture.",
        "image": "image.png",
        "subject": "natural science",
    },
}


def _scienceqa(root: Path) -> None:
    _json(root / "problems.json", PROBLEMS)
    _json(root / "pid_splits.json", {"test": ["5", "6", "7"], "train": []})
    _image(root / "images" / "test" / "5" / "image.png")
    _image(root / "images" / "test" / "7" / "image.png")


def test_scienceqa_from_problems(tmp_path: Path) -> None:
    _scienceqa(tmp_path)
    bench = load_benchmark("scienceqa-img", tmp_path)
    assert [s.id for s in bench.samples] == ["5", "7"]  # "6" has no image
    five, seven = bench.samples
    assert five.prompt == (
        "Which is farthest north?\nA. Ohio\nB. Texas\nC. Utah\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert seven.prompt.startswith("Context: Look at the picture.\nWhat is shown?\nA. a fox\n")
    assert (seven.answers, seven.meta["num_choices"], seven.subtask) == (
        ("B",),
        2,
        "natural science",
    )
    assert scienceqa_prompt(PROBLEMS["6"]).startswith("Context: Select the best answer.\n")


def test_scienceqa_from_llava_question_file(tmp_path: Path) -> None:
    _scienceqa(tmp_path)
    _json(
        tmp_path / "llava_test_CQM-A.json",
        [
            {
                "id": "5",
                "image": "5/image.png",
                "conversations": [
                    {
                        "from": "human",
                        "value": "<image>\nContext: N/A\nWhich is farthest north?\n"
                        "A. Ohio\nB. Texas\nC. Utah",
                    },
                    {"from": "gpt", "value": "A"},
                ],
            },
            {"id": "6", "conversations": [{"from": "human", "value": "Which is a solid?"}]},
        ],
    )
    (sample,) = load_benchmark("scienceqa-img", tmp_path).samples
    assert sample.prompt == (
        "Context: N/A\nWhich is farthest north?\nA. Ohio\nB. Texas\nC. Utah\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert sample.answers == ("A",) and sample.image.path == tmp_path / "images/test/5/image.png"


def test_scienceqa_errors(tmp_path: Path) -> None:
    _scienceqa(tmp_path)
    (tmp_path / "images" / "test" / "7" / "image.png").unlink()
    with pytest.raises(PrumergeError, match=r"problem 7: image .*7/image.png not found"):
        load_benchmark("scienceqa-img", tmp_path)
    _json(tmp_path / "pid_splits.json", {"test": ["5", "99"]})
    with pytest.raises(PrumergeError, match="problem 99 not in"):
        load_benchmark("scienceqa-img", tmp_path)
