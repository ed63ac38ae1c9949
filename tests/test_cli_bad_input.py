"""Bad input to `ask` and `bench`, as a new user would give it: one line on stderr, exit 2, no
traceback, nothing half-written, and everything the user gave checked before the model loads.

"Before the model loads" is shown by giving a model path that does not exist: the model is the
last thing loaded, so any other error must win over "model path does not exist".
"""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prumerge.cli import main


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    pixels = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


def one_line_error(code: int, err: list[str], needle: str) -> None:
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("prumerge: error: "), err
    assert needle in err[0], err


def last_line_error(code: int, err: list[str], needle: str) -> None:
    """After the model loaded: its loading bar may precede the one error line."""
    assert code == 2, err
    assert err and err[-1].startswith("prumerge: error: ") and needle in err[-1], err
    assert not any("Traceback" in line for line in err), err


def bomb_png(path: Path, side: int = 45_000) -> Path:
    """A PNG whose header claims side x side pixels (2 gigapixels for 45000): a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    row = b"\0" + bytes((side + 7) // 8)
    data = zlib.compress(row * 4)  # only the first rows: PIL refuses at open anyway
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data)
    path.write_bytes(png + chunk(b"IEND", b""))
    return path


MISSING_MODEL = "/no/such/model"


# --- ask ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--repeats", "-1"], "--repeats must be at least 1, got -1"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--repeats", "abc"], "--repeats must be an integer"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (
            ["--method", "prumerge", "--option", "merge=maybe"],
            "merge must be one of 'sum', 'mean', 'none'; got 'maybe'",
        ),
        (["--method", "prumerge", "--option", "knn=abc"], "option knn takes an integer"),
        (["--method", "prumerge", "--option", "supplement=maybe"], "takes true or false"),
        (["--keep", "1", "--option", "keep=2"], "not both"),
        (["--show", "kept"], "--show kept: the name must end in the suffix of an image format"),
        (["--show", "kept.txt"], "the name must end in the suffix of an image format"),
        (["--show", "/no/such/folder/kept.png"], "folder /no/such/folder does not exist"),
        (["--dtype", "int3"], "--dtype: unknown dtype 'int3'"),
        (["--device", "tpu"], "--device: unknown device 'tpu'"),
        (["--device-map", "everywhere"], "--device-map: 'everywhere' is not auto"),
        (["--device-map", "{bad json"], "--device-map: not a JSON object"),
        (["--device", "cpu", "--device-map", "auto"], "give --device or --device-map, not both"),
    ],
)
def test_ask_rejects_bad_input_before_loading(
    extra: list[str], needle: str, photo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err, out = run(["ask", str(photo), "what?", "--model", MISSING_MODEL, *extra], capsys)
    one_line_error(code, err, needle)
    assert out == ""


def test_show_into_a_folder_is_refused_before_loading(
    photo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["ask", str(photo), "q", "--model", MISSING_MODEL, "--show", str(tmp_path)]
    code, err, _ = run(argv, capsys)
    one_line_error(code, err, "is a folder")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("command", ["ask", "bench", "eval"])
def test_cuda_on_a_cpu_only_torch(
    command: str, photo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = {
        "ask": ["ask", str(photo), "what?"],
        "bench": ["bench", "--images", str(photo)],
        "eval": ["eval", "--benchmark", "synth", "--out", str(tmp_path / "out")],
    }[command]
    code, err, _ = run([*argv, "--model", MISSING_MODEL, "--device", "cuda"], capsys)
    one_line_error(code, err, "CUDA is not available here")


def test_merge_none_reaches_the_method(photo: Path) -> None:
    from prumerge.methods.spec import coerce_options, make_method

    # "none" is merge's own mode, not Python None; keep and ToMe's r do take None
    assert make_method("prumerge", {"merge": "none"}).merge == "none"
    assert coerce_options("prumerge", {"keep": "none"}) == {"keep": None}
    assert coerce_options("tome", {"r": "none", "keep": "64"}) == {"r": None, "keep": 64}
    # an int-or-float option keeps what was written: a count stays a count
    assert coerce_options("visionzip", {"contextual": "4"}) == {"contextual": 4}
    assert coerce_options("visionzip", {"contextual": "0.1"}) == {"contextual": 0.1}


@pytest.mark.parametrize(
    ("text", "value"), [("1", 1), ("1.0", 1.0), ("0.25", 0.25), ("64", 64), ("adaptive", None)]
)
def test_one_budget_parser(text: str, value: int | float | None) -> None:
    from prumerge.methods.spec import parse_budget

    parsed = parse_budget(text, adaptive=True)
    assert parsed == value and type(parsed) is type(value)


def test_budget_parser_errors() -> None:
    from prumerge.errors import PrumergeError
    from prumerge.methods.spec import parse_budget

    for text, needle in [
        ("0", "keep must be >= 1"),
        ("1.5", r"ratio must be in \(0, 1\]"),
        ("1e2", r"ratio must be in \(0, 1\]"),  # only integer text is a count
        ("nan", r"ratio must be in \(0, 1\]"),
        ("lots", "not a number: 'lots'"),
        ("adaptive", "give a count"),  # where no adaptive budget is allowed
    ]:
        with pytest.raises(PrumergeError, match=needle):
            parse_budget(text, what="--keep")


def test_decompression_bomb_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bomb = bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 100_000
    code, err, _ = run(["ask", str(bomb), "q", "--model", MISSING_MODEL], capsys)
    one_line_error(code, err, "the image is too large")
    code, err, _ = run(["bench", "--images", str(bomb), "--model", MISSING_MODEL], capsys)
    one_line_error(code, err, "the image is too large")


def test_too_long_a_prompt_is_refused(
    tiny_checkpoint: Path, photo: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    question = " ".join(["what"] * 2100)  # the tiny LLM has 2048 positions
    code, err, out = run(["ask", str(photo), question, "--model", str(tiny_checkpoint)], capsys)
    last_line_error(code, err, "the language model takes at most 2048 positions")
    assert out == ""


def test_answer_is_printed_before_a_failing_picture(
    tiny_checkpoint: Path,
    photo: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    one_thread: None,
) -> None:
    import prumerge.viz

    target = tmp_path / "kept.png"

    def broken_save(*args, **kwargs):
        target.write_bytes(b"\x89PNG half")  # a partial file, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prumerge.viz, "save_reduction_picture", broken_save)
    argv = ["ask", str(photo), "what color", "--model", str(tiny_checkpoint), "--show", str(target)]
    code, err, out = run(argv, capsys)
    last_line_error(code, err, "No space left on device")
    assert out.startswith("answer: ") and "visual tokens: 36 -> " in out
    assert not target.exists()


def test_ask_writes_its_picture(
    tiny_checkpoint: Path, photo: Path, tmp_path: Path, one_thread: None, capsys
) -> None:
    target = tmp_path / "kept.webp"
    argv = ["ask", str(photo), "what color", "--model", str(tiny_checkpoint), "--show", str(target)]
    assert main([*argv, "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["picture"] == str(target) and Image.open(target).format == "WEBP"


# --- bench ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--plot", "out.txt"], "--plot out.txt: the name must end in the suffix of a plot format"),
        (["--plot", "plot"], "the name must end in the suffix of a plot format"),
        (["--option", "merge=maybe"], "merge must be one of 'sum', 'mean', 'none'; got 'maybe'"),
        (["--option", "knn=-3"], "knn"),
        (["--option", "knn=abc"], "option knn takes an integer"),
        (["--dtype", "float8"], "--dtype: unknown dtype"),
    ],
)
def test_bench_rejects_bad_input_before_loading(
    extra: list[str], needle: str, photo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "--images", str(photo), "--model", MISSING_MODEL, *extra]
    code, err, out = run(argv, capsys)
    one_line_error(code, err, needle)
    assert out == ""


def test_bench_keeps_a_count_of_one_apart_from_a_ratio_of_one() -> None:
    from prumerge.bench import parse_configs

    labels = [c.label for c in parse_configs("pool,prumerge", "1,1.0,adaptive")]
    assert labels == ["none", "pool@1", "pool@1.0", "pool@64", "prumerge@1", "prumerge@1.0",
                      "prumerge"]  # fmt: skip
    # "auto" is a synonym of "adaptive", as in eval
    assert [c.label for c in parse_configs("prumerge", "auto")] == ["none", "prumerge"]


def test_bench_prints_its_table_before_a_failing_plot(
    tiny_checkpoint: Path,
    photo: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    one_thread: None,
) -> None:
    import prumerge.bench

    target = tmp_path / "plot.png"

    def broken_plot(report, path):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prumerge.bench, "save_plot", broken_plot)
    argv = ["bench", "--images", str(photo), "--model", str(tiny_checkpoint), "--methods", "pool"]
    argv += ["--keep", "9", "--repeats", "1", "--warmup", "0", "--new-tokens", "2"]
    code, err, out = run([*argv, "--plot", str(target)], capsys)
    assert code == 2 and err[-1].startswith("prumerge: error: cannot write")
    assert "pool@9" in out and not target.exists()


# --- the command itself ---------------------------------------------------------------------


def test_python_dash_m_prumerge_is_the_command(tmp_path: Path) -> None:
    version = subprocess.run(
        [sys.executable, "-m", "prumerge", "--version"], capture_output=True, text=True
    )
    assert version.returncode == 0 and version.stdout.strip().startswith("prumerge 0.")
    bad = subprocess.run(
        [sys.executable, "-m", "prumerge", "ask", str(tmp_path / "x.png"), "q"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == [
        f"prumerge: error: image file not found: {tmp_path / 'x.png'}"
    ]


def test_library_messages_reach_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from prumerge.cli import _show_library_messages

    logger = logging.getLogger("prumerge")
    before = list(logger.handlers), logger.level, logger.propagate
    try:
        _show_library_messages()
        _show_library_messages()  # once per process, not once per call
        logging.getLogger("prumerge.models.default").info("building the default model into X")
        assert capsys.readouterr().err == "prumerge: building the default model into X\n"
        assert len([h for h in logger.handlers if type(h).__name__ == "_StderrHandler"]) == 1
    finally:
        logger.handlers[:] = before[0]
        logger.setLevel(before[1])
        logger.propagate = before[2]
