"""The probe table of issue 29: bad input to every command gives exit 2, one line on stderr,
no traceback and no file left behind, and is refused before any model loads.

Every probe runs in-process through ``prumerge.cli.main``, with ``load_model`` replaced by a
spy that fails the test if called: a refusal must not cost a model load. Valid inputs of the
table (a 4096-px 16-bit PNG, CMYK, palette, animated) are answered by the tiny checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prumerge.cli import main

MISSING_MODEL = "/no/such/model"


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """A spy on every way a command loads a model: each call is recorded and refused."""
    import prumerge.loading

    calls: list[tuple] = []

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(prumerge.loading, "load_model", spy)
    return calls


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def check_refused(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str], calls: list[tuple]
) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("prumerge: error: "), err
    assert "Traceback" not in captured.err and needle in err[0], err
    assert captured.out == "" and calls == []
    return err[0]


# --- inputs -----------------------------------------------------------------------------


def _photo(folder: Path) -> Path:
    path = folder / "photo.png"
    pixels = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _nan_tiff(folder: Path) -> Path:
    pixels = np.ones((32, 32), np.float32)
    pixels[3, 3] = np.nan
    Image.fromarray(pixels, mode="F").save(folder / "nan.tiff")
    return folder / "nan.tiff"


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


BAD_IMAGES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "zero-byte": (lambda d: _written(d / "zero.png", b""), "is not an image file PIL can read"),
    "truncated": (
        lambda d: _written(d / "cut.png", _photo(d).read_bytes()[:80]),
        "image file is truncated",
    ),
    "float with NaN": (_nan_tiff, "the image holds NaN or infinite pixel values"),
    "a directory": (lambda d: _folder(d / "dir.png"), "not a file:"),
    "missing": (lambda d: d / "nowhere.png", "image file not found"),
}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
@pytest.mark.parametrize("command", ["ask", "bench"])
def test_bad_images(kind: str, command: str, tmp_path: Path, capsys, no_model_load) -> None:
    make, needle = BAD_IMAGES[kind]
    image = str(make(tmp_path))
    argv = (["ask", image, "what color"] if command == "ask" else ["bench", "--images", image]) + [
        "--model",
        MISSING_MODEL,
    ]
    before = files_under(tmp_path)
    check_refused(argv, needle, capsys, no_model_load)
    assert files_under(tmp_path) == before


QUESTIONS = {
    "non-UTF-8 bytes": ("\udcff\udcfe", "is not valid UTF-8 text"),  # what Python makes of them
    "empty": ("", "is empty"),
    "blank": ("  \t ", "is empty"),
    "a NUL": ("what\x00color", "holds the control character U+0000"),
    "an escape": ("what \x1b[31mcolor", "holds the control character U+001B"),
    "a C1 control": ("what\x85color", "holds the control character U+0085"),
}


@pytest.mark.parametrize("kind", sorted(QUESTIONS))
@pytest.mark.parametrize("command", ["ask", "bench"])
def test_bad_questions(kind: str, command: str, tmp_path: Path, capsys, no_model_load) -> None:
    question, needle = QUESTIONS[kind]
    photo = str(_photo(tmp_path))
    argv = (
        ["ask", photo, question]
        if command == "ask"
        else ["bench", "--images", photo, "--question", question]
    )
    check_refused([*argv, "--model", MISSING_MODEL], needle, capsys, no_model_load)


BUDGETS = {
    "0": "keep must be >= 1",
    "-1": "keep must be >= 1",
    "1.5": "ratio must be in (0, 1]",
    "nan": "ratio must be in (0, 1]",
    "inf": "ratio must be in (0, 1]",
    "-inf": "ratio must be in (0, 1]",
    "1e400": "ratio must be in (0, 1]",
    "abc": "not a number: 'abc'",
    "1,abc": "not a number: '",
}


@pytest.mark.parametrize("budget", sorted(BUDGETS))
@pytest.mark.parametrize("command", ["ask", "bench", "eval"])
def test_every_budget_form(budget: str, command: str, tmp_path: Path, capsys, no_model_load):
    photo = str(_photo(tmp_path))
    argv = {
        "ask": ["ask", photo, "what", f"--keep={budget}"],
        "bench": ["bench", "--images", photo, f"--keep={budget}"],
        "eval": ["eval", "--benchmark", "synth", f"--keep={budget}", "--out", str(tmp_path / "o")],
    }[command]
    before = files_under(tmp_path)
    check_refused([*argv, "--model", MISSING_MODEL], BUDGETS[budget], capsys, no_model_load)
    assert files_under(tmp_path) == before


def test_train_refuses_a_picture_as_projector_weights_before_building(
    tmp_path: Path, capsys, no_model_load, monkeypatch: pytest.MonkeyPatch
) -> None:
    import prumerge.models.default

    def no_build(*args, **kwargs):
        raise AssertionError("the model was built before --init-projector was checked")

    monkeypatch.setattr(prumerge.models.default, "build_default_model", no_build)
    out = tmp_path / "run"
    argv = ["train", "--init-projector", str(_photo(tmp_path)), "--output-dir", str(out)]
    check_refused(argv, "not a safetensors file of projector weights", capsys, no_model_load)
    assert not out.exists()


def test_eval_refuses_another_configurations_directory_before_loading(
    tiny_checkpoint: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, one_thread
) -> None:
    import prumerge.loading

    out = tmp_path / "out"
    argv = ["eval", "--benchmark", "synth", "--model", str(tiny_checkpoint), "--methods", "pool"]
    argv += ["--keep", "9", "--out", str(out), "--no-plot", "--no-progress"]
    assert main([*argv, "--limit", "4"]) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    calls: list[tuple] = []
    real = prumerge.loading.load_model

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(prumerge.loading, "load_model", spy)
    err = check_refused(
        [*argv, "--limit", "3"], "holds results of a different configuration", capsys, calls
    )
    assert "n_samples: 4 != 3" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # the same configuration resumes (and loads the model once)
    assert main([*argv, "--limit", "4"]) == 0 and len(calls) == 1


def test_the_default_models_id_is_known_before_it_loads(default_model) -> None:
    from prumerge.models.default import default_entry_name

    model, _ = default_model
    assert Path(model.name_or_path).name == default_entry_name()


OPTIONS = {
    "unknown method": (["--method", "nosuch"], "unknown method 'nosuch'"),
    "non-UTF-8 method": (["--method", "\udcff"], "unknown method"),
    "unknown option": (["--option", "nosuch=1"], "does not take option(s) nosuch"),
    "option without =": (["--option", "noequals"], "is not KEY=VALUE"),
    "bad JSON as an option": (["--option", "keep={bad"], "not a number: '{bad'"),
    "non-UTF-8 option": (["--option", "merge=\udcff"], "merge must be one of"),
    "device map: bad JSON": (["--device-map", '{"a": }'], "--device-map: not a JSON object"),
    "device map: a list": (["--device-map", "[1,2]"], "is not auto, balanced"),
    "device map: empty": (["--device-map", "{}"], "must map module names to devices"),
    "device map: null device": (["--device-map", '{"a": null}'], "None is not a device"),
    "device map: negative GPU": (["--device-map", '{"a": -1}'], "-1 is not a device"),
    "unknown flag": (["--kepp", "3"], "unrecognized arguments: --kepp 3"),
}
if not __import__("torch").cuda.is_available():
    OPTIONS["device map: a GPU index"] = (["--device-map", '{"": 5}'], "CUDA is not available")


@pytest.mark.parametrize("kind", sorted(OPTIONS))
def test_bad_methods_options_and_device_maps(kind: str, tmp_path: Path, capsys, no_model_load):
    extra, needle = OPTIONS[kind]
    argv = ["ask", str(_photo(tmp_path)), "what", "--model", MISSING_MODEL, *extra]
    check_refused(argv, needle, capsys, no_model_load)


def test_eval_refuses_unknown_methods_and_options(tmp_path: Path, capsys, no_model_load):
    base = ["eval", "--benchmark", "synth", "--model", MISSING_MODEL, "--out", str(tmp_path / "o")]
    check_refused([*base, "--methods", "nosuch"], "unknown method 'nosuch'", capsys, no_model_load)
    check_refused([*base, "--option", "nosuch=3"], "no option 'nosuch'", capsys, no_model_load)
    check_refused([*base, "--benchmark", "\udcff"], "unknown benchmark", capsys, no_model_load)
    assert not (tmp_path / "o").exists()


def test_unwritable_outputs_are_refused_before_loading(tmp_path: Path, capsys, no_model_load):
    # A regular file where a folder should be: refused for root too (chmod is not).
    blocker = _written(tmp_path / "a-file", b"x")
    photo = str(_photo(tmp_path))
    probes = [
        (["ask", photo, "q", "--show", f"{blocker}/kept.png"], "does not exist"),
        (["bench", "--images", photo, "--plot", f"{blocker}/plot.png"], "does not exist"),
        (["eval", "--benchmark", "synth", "--out", f"{blocker}/out"], "is a file"),
        (["eval", "--benchmark", "synth", "--out", str(blocker)], "is a file; give a folder"),
        (["train", "--output-dir", str(blocker), "--steps", "1"], "is not a directory"),
    ]
    before = files_under(tmp_path)
    for argv, needle in probes:
        model = [] if argv[0] == "train" else ["--model", MISSING_MODEL]
        check_refused([*argv, *model], needle, capsys, no_model_load)
    assert files_under(tmp_path) == before and blocker.read_bytes() == b"x"


def test_an_unusable_cache_is_one_line(tmp_path: Path, capsys) -> None:
    blocker = _written(tmp_path / "a-file", b"x")
    code = main(["ask", str(_photo(tmp_path)), "q", "--cache-dir", f"{blocker}/cache"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"prumerge: error: cannot create the model cache {blocker}/cache")


def _sixteen_bit(folder: Path) -> Path:
    ramp = np.linspace(0, 65535, 4096).astype(np.uint16)
    Image.fromarray(np.broadcast_to(ramp, (4096, 4096)).copy()).save(folder / "deep.png")
    return folder / "deep.png"


def _animated(folder: Path) -> Path:
    frames = [Image.new("RGB", (30, 30), colour) for colour in ("red", "blue")]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    return folder / "anim.gif"


def _saved(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


VALID_IMAGES: dict[str, Callable[[Path], Path]] = {
    "16-bit at 4096 px": _sixteen_bit,
    "CMYK": lambda d: _saved(Image.new("CMYK", (40, 40), (0, 90, 200, 0)), d / "cmyk.jpg"),
    "palette at 3000 px": lambda d: _saved(Image.new("P", (3000, 2000), 3), d / "pal.png"),
    "1-bit at 3000 px": lambda d: _saved(Image.new("1", (3000, 2000), 1), d / "bw.png"),
    "animated": _animated,
    "RGBA": lambda d: _saved(Image.new("RGBA", (40, 40), (9, 9, 9, 0)), d / "rgba.png"),
}


@pytest.mark.parametrize("kind", sorted(VALID_IMAGES))
def test_valid_images_are_answered(
    kind: str, tiny_checkpoint: Path, tmp_path: Path, capsys, one_thread
) -> None:
    image = VALID_IMAGES[kind](tmp_path)
    argv = ["ask", str(image), "what color", "--model", str(tiny_checkpoint)]
    assert main([*argv, "--max-new-tokens", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.startswith("answer: ")
    assert "visual tokens: 36 -> " in captured.out


def test_long_questions_get_one_line(tiny_checkpoint: Path, tmp_path: Path, capsys, one_thread):
    argv = ["ask", str(_photo(tmp_path)), "what " * 2000, "--model", str(tiny_checkpoint)]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [err[0]] and "takes at most 2048 positions" in err[0], err
