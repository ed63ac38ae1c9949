"""Bad and unusual inputs of `prumerge ask` and the image loader (no model needed)."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from prumerge.cli import main
from prumerge.errors import PrumergeError
from prumerge.images import load_image


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(
        path
    )
    return path


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


def test_missing_file(capsys, tmp_path):
    code, err = run_cli(["ask", str(tmp_path / "nope.png"), "what?"], capsys)
    assert code == 2
    assert err == [f"prumerge: error: image file not found: {tmp_path / 'nope.png'}"]


def test_not_an_image(capsys, tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello")
    code, err = run_cli(["ask", str(path), "what?"], capsys)
    assert code == 2 and len(err) == 1 and "is not an image file" in err[0]


def test_truncated_image(capsys, tmp_path, photo):
    data = photo.read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    code, err = run_cli(["ask", str(path), "what?"], capsys)
    assert code == 2 and len(err) == 1 and "cannot read image" in err[0]


def test_empty_question(capsys, photo):
    code, err = run_cli(["ask", str(photo), "   "], capsys)
    assert (code, err) == (2, ["prumerge: error: the question is empty"])


def test_model_path_that_does_not_exist(capsys, photo, tmp_path):
    code, err = run_cli(["ask", str(photo), "what?", "--model", str(tmp_path / "no-model")], capsys)
    assert code == 2
    assert err == [f"prumerge: error: model path does not exist: {tmp_path / 'no-model'}"]


def test_unknown_method_and_bad_keep(capsys, photo):
    code, err = run_cli(["ask", str(photo), "what?", "--method", "fastest"], capsys)
    assert code == 2 and "unknown method 'fastest'" in err[0]
    code, err = run_cli(["ask", str(photo), "what?", "--keep", "lots"], capsys)
    assert code == 2 and err == ["prumerge: error: --keep: not a number: 'lots'"]
    code, err = run_cli(["ask", str(photo), "what?", "--keep", "-3"], capsys)
    assert code == 2 and "keep must be >= 1" in err[0]


def test_errors_print_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "prumerge.cli", "ask", str(tmp_path / "x.jpg"), "q"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"prumerge: error: image file not found: {tmp_path / 'x.jpg'}"
    ]
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("mode", "array"),
    [
        ("L", np.full((30, 30), 200, np.uint8)),
        ("RGBA", np.zeros((30, 30, 4), np.uint8)),
        ("I;16", (np.arange(900, dtype=np.uint16).reshape(30, 30) * 70)),
    ],
)
def test_unusual_modes_become_rgb(tmp_path, mode, array):
    path = tmp_path / f"img-{mode.replace(';', '')}.png"
    Image.fromarray(array).save(path)
    assert Image.open(path).mode == mode
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (30, 30)
    pixels = np.asarray(image)
    if mode == "RGBA":  # fully transparent: composited on white
        assert (pixels == 255).all()
    if mode == "I;16":  # 16-bit range stretched, not clipped to white
        assert pixels.min() == 0 and pixels.max() == 255


def test_tiny_and_huge_images(tmp_path):
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (3, 5), (10, 20, 30)).save(tiny)
    assert load_image(tiny).size == (3, 5)
    huge = tmp_path / "huge.jpg"
    Image.new("L", (20000, 20000), 90).save(huge, quality=30)
    image = load_image(huge)  # decoded at reduced size, not 1.2 GB of RGB
    assert max(image.size) <= 1024 and image.mode == "RGB"


def test_load_image_error_type(tmp_path):
    with pytest.raises(PrumergeError, match="not a file"):
        load_image(tmp_path)
