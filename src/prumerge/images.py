"""Reading user images robustly: any mode, any size, with clear errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from prumerge.errors import PrumergeError

# Images are shrunk to the model's input size anyway; decoding a huge one at full size
# would only waste memory. JPEG decoders can reduce while decoding (draft mode); others are
# decoded and then shrunk at once.
_WORKING_SIZE = 1024
# Refuse only absurd sizes (PIL's own limit of ~89 Mpx would refuse a 20000x20000 photo).
_MAX_PIXELS = 1_000_000_000


def load_image(path: str | Path, *, working_size: int = _WORKING_SIZE) -> Image.Image:
    """Open an image file as RGB, at most ``working_size`` on its longer side.

    Grayscale, palette, RGBA (composited on white) and 16-bit images are converted; a
    missing, unreadable, truncated or absurdly large file raises ``PrumergeError`` naming the
    file. Images within ``working_size`` come back at their own size.
    """
    path = Path(path)
    if not path.exists():
        raise PrumergeError(f"image file not found: {path}")
    if not path.is_file():
        raise PrumergeError(f"not a file: {path}")
    previous_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = _MAX_PIXELS
    try:
        with warnings.catch_warnings():
            # PIL warns between MAX_IMAGE_PIXELS and twice that; we refuse those ourselves.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return _load(path, working_size)
    except Image.DecompressionBombError:
        # PIL refuses at open time images over twice MAX_IMAGE_PIXELS, before our own check.
        raise PrumergeError(
            f"{path}: the image is too large (over {_MAX_PIXELS:,} pixels)"
        ) from None
    except UnidentifiedImageError:
        raise PrumergeError(f"{path} is not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise PrumergeError(f"cannot read image {path}: {exc}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit


# Modes that Image.reduce takes; others are converted to one of these first.
_REDUCIBLE = {"L", "LA", "La", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr", "I", "F", "PA"}


def _load(path: Path, working_size: int) -> Image.Image:
    with Image.open(path) as image:
        if image.width * image.height > _MAX_PIXELS:
            raise PrumergeError(
                f"{path}: {image.width}x{image.height} is too large (over {_MAX_PIXELS:,} pixels)"
            )
        if max(image.width, image.height) > working_size:
            image.draft("RGB", (working_size, working_size))
        image.load()
        factor = max(image.width, image.height) // working_size
        if factor > 1:  # shrink in the native mode first: converting is per pixel
            if image.mode.startswith("I;16"):
                image = image.convert("I")  # reduce takes 32-bit, not 16-bit, integers
            elif image.mode not in _REDUCIBLE:  # palette, 1-bit
                image = _to_rgb(image)
            image = image.reduce(factor)
        image = _to_rgb(image)
        image.thumbnail((working_size, working_size), Image.Resampling.BICUBIC)
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # 16-bit and float images: stretch their actual range to 8 bits.
        array = np.asarray(image, dtype=np.float64)
        if not np.isfinite(array).all():
            # NaN would turn the whole stretched image black; no guess is better than that.
            raise ValueError("the image holds NaN or infinite pixel values")
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255 if high > low else np.zeros_like(array)
        return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
