"""The Gradio page of ``prumerge demo``: a thin layer over ``prumerge.demo.compare``.

Everything runs on this machine: analytics and Gradio's version check are off, the theme's
fonts are the ones Gradio ships, sharing is off, and the server binds to the host given
(127.0.0.1 by default). ``offline_environment`` must run before Gradio is imported.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prumerge.demo.compare import DemoModel, captions, choose_configs, compare, table
from prumerge.errors import PrumergeError

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("prumerge", "prumerge+")
DEFAULT_QUESTION = "What is in the image?"

# Sample images and a question for each: the repository's examples/ folder, present in a
# checkout (scripts/setup.sh installs prumerge editable from one), absent from a wheel.
SAMPLES = (
    ("easy-vqa-test-0.png", "what is the color of the shape?"),
    ("astronaut.jpg", "What is in the image?"),
    ("coffee.jpg", "What is in the image?"),
)

# The page's slider ranges, enforced again on the server: an API call can send any value.
MAX_NEW_TOKENS = (1, 64)
REPEATS = (1, 5)
# Questions longer than this are refused before the model sees them (the page's box is one
# line; the API is not).
MAX_QUESTION_CHARS = 2000
# Uploads: refused past this size, and deleted an hour after upload and when the server stops
# (Gradio's delete_cache: every CACHE_SWEEP_S, files older than CACHE_MAX_AGE_S).
MAX_UPLOAD = "20mb"
CACHE_SWEEP_S, CACHE_MAX_AGE_S = 600, 3600

# The gallery keeps a tall minimum height for one row of pictures; let it fit them.
CSS = "#pictures .fixed-height { min-height: 0; }"

# Gradio reads these at import time; the page must not call out to any server.
OFFLINE_ENVIRONMENT = {
    "GRADIO_ANALYTICS_ENABLED": "False",  # usage analytics and the PyPI version check
    "HF_HUB_DISABLE_TELEMETRY": "1",  # huggingface_hub's telemetry, which analytics uses
}


def offline_environment() -> None:
    """Turn off everything in Gradio that calls out (call before importing gradio)."""
    os.environ.update(OFFLINE_ENVIRONMENT)


def sample_files(folder: Path | None = None) -> list[list[str]]:
    """``[[image path, question], ...]`` for the samples that exist."""
    if folder is None:
        folder = Path(__file__).resolve().parents[3] / "examples"
    return [[str(folder / name), q] for name, q in SAMPLES if (folder / name).is_file()]


def _image_path(image: Any) -> tuple[str, str]:
    """``(path on disk, name the user knows)`` of the Image component's raw value."""
    if isinstance(image, dict):
        path = image.get("path")
        name = image.get("orig_name") or (Path(path).name if path else "")
        if path:
            return str(path), str(name)
    elif isinstance(image, (str, Path)):
        return str(image), Path(image).name
    raise PrumergeError("upload an image or pick a sample first")


def run_request(
    demo: DemoModel,
    image: Any,
    question: str | None,
    methods: Sequence[str] | None,
    budgets: str | None,
    hardware: str,
    max_new_tokens: float,
    repeats: float,
    progress: Any = None,
) -> tuple[Any, list, str]:
    """One click of "Compare": ``(table, pictures, summary)``; bad input raises PrumergeError.

    ``image`` is the Image component's raw value (a dict with the uploaded file's path; the
    event skips Gradio's own decoding so that a file that is not an image gets our message
    instead of a failed preprocessing step).
    """
    import pandas as pd

    from prumerge.cost import get_hardware
    from prumerge.images import load_image
    from prumerge.questions import check_question

    path, name = _image_path(image)
    if not isinstance(question, str) or not question.strip():
        raise PrumergeError("the question is empty")
    question = check_question(question)
    if len(question) > MAX_QUESTION_CHARS:
        raise PrumergeError(f"the question is longer than {MAX_QUESTION_CHARS} characters")
    max_new_tokens = _whole_number(max_new_tokens, "max new tokens", MAX_NEW_TOKENS)
    repeats = _whole_number(repeats, "timed runs per method", REPEATS)
    if not isinstance(hardware, str) or not hardware:
        raise PrumergeError("pick a GPU preset for the predicted speedup")
    get_hardware(hardware)  # an unknown preset is refused before any model work
    if methods is not None and (
        not isinstance(methods, (list, tuple)) or not all(isinstance(m, str) for m in methods)
    ):
        raise PrumergeError("methods must be a list of method names")
    if budgets is not None and not isinstance(budgets, str):
        raise PrumergeError("budgets must be text, such as auto or 64,0.25")
    configs = choose_configs(list(methods or []), budgets)
    try:
        picture = load_image(path)
    except PrumergeError as exc:
        raise PrumergeError(str(exc).replace(path, name)) from None

    def report(done: int, total: int, message: str) -> None:
        if progress is not None:
            progress((done, total), desc=message)

    result = compare(
        demo,
        picture,
        question or "",
        configs,
        hardware=hardware,
        max_new_tokens=max_new_tokens,
        repeats=repeats,
        progress=report,
    )
    headers, rows = table(result)
    runs = result.repeats
    times = f"the median of {runs} timed runs after a warm-up" if runs > 1 else "one run"
    summary = (
        f"**{result.question}** on {name}, {demo.name} on {demo.device}. "
        f"Times are {times} per method, on this machine. Predicted prefill speedup: the "
        f"roofline cost model (`prumerge cost`) on {result.hardware} for this model's decoder at {result.precision_bits}-bit, for the "
        f"prompt lengths that ran."
    )
    return pd.DataFrame(rows, columns=headers), captions(result), summary


def _whole_number(value: Any, what: str, bounds: tuple[int, int]) -> int:
    """A slider's value as the page allows it: a whole number within ``bounds``."""
    low, high = bounds
    refusal = PrumergeError(f"{what} must be a whole number from {low} to {high}; got {value!r}")
    if isinstance(value, bool):
        raise refusal
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise refusal from None
    if not (low <= number <= high) or number != int(number):  # NaN fails the first test
        raise refusal
    return int(number)


def build_app(demo: DemoModel, samples: list[list[str]] | None = None) -> Any:
    """The page, as a ``gradio.Blocks`` (not launched)."""
    import gradio as gr

    from prumerge.cost import HARDWARE
    from prumerge.methods import method_names

    samples = sample_files() if samples is None else samples
    methods = [m for m in method_names() if m != "none"]

    tracker = gr.Progress()  # Gradio finds the progress bar by this default value

    def on_compare(image, question, chosen, budgets, hardware, max_new, repeats, progress=tracker):
        try:
            return run_request(
                demo, image, question, chosen, budgets, hardware, max_new, repeats, progress
            )
        except PrumergeError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:  # one line on the page; the traceback goes to the console
            log.exception("the comparison failed")
            raise gr.Error(f"{type(exc).__name__}: {exc}", print_exception=False) from None

    with gr.Blocks(
        title="prumerge demo",
        analytics_enabled=False,
        delete_cache=(CACHE_SWEEP_S, CACHE_MAX_AGE_S),
    ) as app:
        gr.Markdown(
            "# prumerge: visual-token reduction, side by side\n"
            f"Ask **{demo.name}** about an image with several reduction methods and `none` "
            "(all visual tokens) for reference: each method's answer, visual tokens in and "
            "out, measured times, the cost model's predicted prefill speedup on a GPU, and "
            "which patches it kept (outlined; pruned patches tinted with the colour of the "
            "kept token they merge into)."
        )
        with gr.Row():
            with gr.Column(min_width=320):
                image = gr.Image(
                    label="image",
                    type="filepath",
                    sources=["upload", "clipboard"],
                    height=240,
                    elem_id="image",
                )
                question = gr.Textbox(
                    label="question", value=DEFAULT_QUESTION, lines=1, elem_id="question"
                )
                if samples:
                    gr.Examples(samples, inputs=[image, question], label="samples")
            with gr.Column(min_width=320):
                chosen = gr.CheckboxGroup(
                    methods,
                    value=[m for m in DEFAULT_METHODS if m in methods],
                    label="methods (none always runs)",
                    elem_id="methods",
                )
                budgets = gr.Textbox(
                    value="auto",
                    label="budgets: auto, counts (64) or ratios (0.25), comma-separated",
                    elem_id="budgets",
                )
                hardware = gr.Dropdown(
                    [(spec.name, key) for key, spec in HARDWARE.items()],
                    value="v100",
                    label="GPU preset for the predicted speedup",
                    elem_id="hardware",
                )
                with gr.Accordion("generation", open=False):
                    max_new = gr.Slider(*MAX_NEW_TOKENS, value=16, step=1, label="max new tokens")
                    repeats = gr.Slider(*REPEATS, value=1, step=1, label="timed runs per method")
                run = gr.Button("Compare", variant="primary", elem_id="compare")
        summary = gr.Markdown(elem_id="summary")
        results = gr.Dataframe(label="results", interactive=False, wrap=True, elem_id="results")
        pictures = gr.Gallery(
            label="kept tokens (outlined: kept patches; tint: the kept token a pruned patch "
            "merges into)",
            columns=4,
            rows=1,
            object_fit="contain",
            format="png",
            elem_id="pictures",
        )
        run.click(
            on_compare,
            inputs=[image, question, chosen, budgets, hardware, max_new, repeats],
            outputs=[results, pictures, summary],
            preprocess=False,
            concurrency_limit=1,
        )
    return app


def launch(app: Any, host: str, port: int, *, block: bool = True) -> None:
    """Serve the page on ``host:port`` until interrupted (or in the background, with
    ``block=False``: ``app.close()`` stops it); never shared."""
    app.queue(default_concurrency_limit=1).launch(
        prevent_thread_lock=not block,
        server_name=host,
        server_port=port,
        share=False,
        max_file_size=MAX_UPLOAD,
        quiet=True,
        inbrowser=False,
        css=CSS,
    )
