"""The Gradio layer without a browser: one "Compare" click, bad input, the offline settings."""

import os
import subprocess
import sys

import pytest
from PIL import Image

from prumerge.demo.app import (
    OFFLINE_ENVIRONMENT,
    SAMPLES,
    build_app,
    run_request,
    sample_files,
)
from prumerge.errors import PrumergeError

pytest.importorskip("gradio")


def upload(path, name=None):
    """The Image component's raw value for an uploaded file."""
    return {"path": str(path), "orig_name": name or path.name, "url": None}


@pytest.fixture
def photo_file(tmp_path, photo):
    path = tmp_path / "photo.png"
    photo.save(path)
    return path


def test_one_click_gives_a_table_pictures_and_a_summary(tiny_demo, photo_file):
    steps = []
    frame, pictures, summary = run_request(
        tiny_demo,
        upload(photo_file),
        "what color is it?",
        ["cls_topk", "pool"],
        "9",
        "l40",
        3,
        1,
        progress=lambda fraction, desc: steps.append((fraction, desc)),
    )
    assert list(frame.columns) == ["", "none", "cls_topk@9", "pool@9"]
    assert frame.iloc[1, 1:].tolist() == ["36 -> 36", "36 -> 9", "36 -> 9"]
    assert frame.iloc[6, 0] == "prefill speedup, predicted on L40"
    assert [caption for _, caption in pictures] == [
        "none: 36 -> 36 tokens",
        "cls_topk@9: 36 -> 9 tokens",
        "pool@9: 36 -> 9 tokens",
    ]
    assert all(isinstance(p, Image.Image) for p, _ in pictures)
    assert "**what color is it?** on photo.png" in summary and "on L40" in summary
    assert steps[0] == ((0, 3), "running none") and steps[-1] == ((3, 3), "done")


@pytest.mark.parametrize(
    ("image", "question", "methods", "budgets", "message"),
    [
        (None, "what?", ["pool"], "auto", "upload an image or pick a sample first"),
        ("photo", "  ", ["pool"], "auto", "the question is empty"),
        ("photo", None, ["pool"], "auto", "the question is empty"),
        ("photo", "what?", ["pool"], "many", "budget: not a number: 'many'"),
        ("notes", "what?", ["pool"], "auto", "^notes.png is not an image file PIL can read$"),
    ],
)
def test_bad_input_is_one_message(
    tiny_demo, photo_file, tmp_path, image, question, methods, budgets, message
):
    notes = tmp_path / "upload-0123" / "notes.png"
    notes.parent.mkdir()
    notes.write_text("not an image")
    value = {"photo": upload(photo_file), "notes": upload(notes), None: None}[image]
    with pytest.raises(PrumergeError, match=message):
        run_request(tiny_demo, value, question, methods, budgets, "v100", 2, 1)


def test_samples_exist_and_the_page_builds(tiny_demo):
    samples = sample_files()
    assert [os.path.basename(path) for path, _ in samples] == [name for name, _ in SAMPLES]
    app = build_app(tiny_demo, samples)
    config = app.get_config_file()
    ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    assert {"image", "question", "methods", "budgets", "hardware", "compare"} <= ids
    assert {"results", "pictures", "summary"} <= ids


def test_no_samples_without_the_examples_folder(tmp_path):
    assert sample_files(tmp_path) == []


def test_gradio_is_told_to_stay_offline():
    """Importing Gradio with these settings starts no analytics or version check thread."""
    code = (
        "import os, sys, threading\n"
        "from prumerge.demo.app import offline_environment\n"
        "offline_environment()\n"
        "import gradio as gr\n"
        "from gradio import analytics\n"
        "assert not analytics.analytics_enabled()\n"
        "calls = []\n"
        "analytics.version_check = lambda: calls.append('version check')\n"
        "with gr.Blocks() as app:\n"
        "    gr.Markdown('x')\n"
        "for thread in threading.enumerate():\n"
        "    if thread is not threading.current_thread():\n"
        "        thread.join(timeout=5)\n"
        "assert app.analytics_enabled is False and calls == [], calls\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENVIRONMENT}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
