"""Drawing a scene: coloured shapes and photo patches on a plain background."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache

from PIL import Image, ImageDraw

from prumerge.data.synth.objects import COLORS, PHOTOS, SceneObject, SynthConfig


@cache
def _photo_patch(name: str) -> Image.Image:
    import skimage.data

    loader, (top, left, bottom, right) = PHOTOS[name]
    pixels = getattr(skimage.data, loader)()
    return Image.fromarray(pixels[top:bottom, left:right]).convert("RGB")


def _shape_polygon(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]]:
    half = side / 2
    if shape == "triangle":
        return [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = half if k % 2 == 0 else half * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape == "cross":
        arm = side * 0.17  # half the bar width
        return [
            (cx - arm, cy - half),
            (cx + arm, cy - half),
            (cx + arm, cy - arm),
            (cx + half, cy - arm),
            (cx + half, cy + arm),
            (cx + arm, cy + arm),
            (cx + arm, cy + half),
            (cx - arm, cy + half),
            (cx - arm, cy + arm),
            (cx - half, cy + arm),
            (cx - half, cy - arm),
            (cx - arm, cy - arm),
        ]
    raise ValueError(f"no polygon for shape {shape!r}")


def _draw_object(image: Image.Image, obj: SceneObject) -> None:
    left, top, right, bottom = obj.box
    if obj.shape is None:
        patch = _photo_patch(obj.name).resize(
            (right - left, bottom - top), Image.Resampling.BILINEAR
        )
        image.paste(patch, (left, top))
        return
    draw = ImageDraw.Draw(image)
    fill = COLORS[obj.color or ""]
    if obj.shape == "circle":
        draw.ellipse((left, top, right - 1, bottom - 1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((left, top, right - 1, bottom - 1), fill=fill)
    else:
        side = right - left
        draw.polygon(
            _shape_polygon(obj.shape, left + side / 2, top + side / 2, side - 1), fill=fill
        )


def render(objects: Sequence[SceneObject], config: SynthConfig | None = None) -> Image.Image:
    """Draw objects on a plain background.

    Args:
        objects: The objects, drawn in order.
        config: Image size and background colour.

    Returns:
        A new RGB image.
    """
    config = config or SynthConfig()
    image = Image.new("RGB", (config.size, config.size), config.background)
    for obj in objects:
        _draw_object(image, obj)
    return image
