"""load_image on the images of issue 29: 16-bit and palette images past 2048 px are read,
a float image with NaN is refused with one line, and no PIL warning escapes."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prumerge.errors import PrumergeError
from prumerge.images import load_image


@pytest.mark.parametrize("side", [64, 2048, 4096])
def test_sixteen_bit_images_of_any_size_are_read(side: int, tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, side, dtype=np.float64)
    pixels = np.broadcast_to(ramp, (side // 2, side)).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(pixels).save(path)
    assert Image.open(path).mode.startswith("I;16")
    image = load_image(path)
    assert image.mode == "RGB" and max(image.size) == min(side, 1024)
    row = np.asarray(image)[0, :, 0]
    assert row[0] < 10 and row[-1] > 245  # the range is stretched, not clipped to black


@pytest.mark.parametrize("mode", ["P", "1"])
def test_palette_and_one_bit_images_past_the_reduce_limit_are_read(
    mode: str, tmp_path: Path
) -> None:
    path = tmp_path / "big.png"
    Image.new(mode, (3000, 2100), 1).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (1024, 717)


def test_a_float_image_with_nan_is_refused_with_one_line(tmp_path: Path) -> None:
    pixels = np.ones((32, 32), np.float32)
    pixels[3, 3] = np.nan
    path = tmp_path / "nan.tiff"
    Image.fromarray(pixels, mode="F").save(path)
    with pytest.raises(PrumergeError) as caught:
        load_image(path)
    assert (
        str(caught.value)
        == f"cannot read image {path}: the image holds NaN or infinite pixel values"
    )
    pixels[3, 3] = 0.5  # the same image without NaN is read
    Image.fromarray(pixels, mode="F").save(path)
    assert load_image(path).size == (32, 32)


def test_no_decompression_bomb_warning_escapes(tmp_path: Path, monkeypatch) -> None:
    import prumerge.images

    # a 2000x1000 image against a limit of 1.5 Mpx: PIL would warn (between 1x and 2x the
    # limit); load_image refuses it itself, with no warning
    monkeypatch.setattr(prumerge.images, "_MAX_PIXELS", 1_500_000)
    path = tmp_path / "large.png"
    Image.new("L", (2000, 1000)).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(PrumergeError, match="too large"):
            load_image(path)
