"""Pictures of which visual tokens were kept and what was merged into them."""

from __future__ import annotations

import colorsys
from pathlib import Path

import torch
from PIL import Image, ImageDraw


def _palette(count: int) -> list[tuple[int, int, int]]:
    """``count`` well-separated colours (golden-ratio hue steps)."""
    colours = []
    for i in range(count):
        hue = (i * 0.618034) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 1.0)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return colours


def _cell_box(patch: int, cols: int, cell_w: float, cell_h: float) -> tuple[int, int, int, int]:
    """Pixel box (left, top, right, bottom) of a patch of the grid, raster-numbered."""
    r, c = divmod(patch, cols)
    return (
        round(c * cell_w),
        round(r * cell_h),
        round((c + 1) * cell_w) - 1,
        round((r + 1) * cell_h) - 1,
    )


def render_reduction(
    image: Image.Image,
    index: torch.Tensor,
    assignment: torch.Tensor,
    grid: tuple[int, int],
    *,
    size: int = 448,
    tint: float = 0.45,
) -> Image.Image:
    """Draw one image's reduction: kept patches outlined, pruned ones tinted by their owner.

    Every kept patch gets its own colour and a white outline; each pruned patch is tinted with
    the colour of the kept token it was merged into (``assignment``), so the picture shows
    both what the LLM sees and where each merged token draws its content from.

    Args:
        image: the input image (any mode; it is shown squashed to the model's square input).
        index: (K,) patch index of each output token, -1 for padding/supplement.
        assignment: (N,) output slot representing each patch.
        grid: (rows, cols) of the patch grid, rows * cols = N.
        size: side of the output picture in pixels.
        tint: opacity of the tint over pruned patches.

    Returns:
        An RGB image of ``size`` x ``size``.
    """
    rows, cols = grid
    base = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    colours = _palette(int(index.shape[0]))
    cell_w, cell_h = size / cols, size / rows
    overlay = Image.new("RGB", (size, size))
    mask = Image.new("L", (size, size), 0)
    draw_overlay, draw_mask = ImageDraw.Draw(overlay), ImageDraw.Draw(mask)
    kept = {int(p) for p in index.tolist() if p >= 0}
    for patch, slot in enumerate(assignment.tolist()):
        if patch in kept or slot < 0:
            continue
        box = _cell_box(patch, cols, cell_w, cell_h)
        draw_overlay.rectangle(box, fill=colours[slot])
        draw_mask.rectangle(box, fill=int(255 * tint))
    picture = Image.composite(overlay, base, mask)
    draw = ImageDraw.Draw(picture)
    for slot, patch in enumerate(index.tolist()):
        if patch < 0:
            continue
        box = _cell_box(patch, cols, cell_w, cell_h)
        draw.rectangle(box, outline=(255, 255, 255), width=3)
        draw.rectangle(box, outline=colours[slot], width=1)
    return picture


def save_reduction_picture(
    image: Image.Image,
    index: torch.Tensor,
    assignment: torch.Tensor,
    grid: tuple[int, int],
    path: str | Path,
    **kwargs: float | int,
) -> Path:
    """``render_reduction`` side by side with the plain image, saved to ``path``."""
    picture = render_reduction(image, index, assignment, grid, **kwargs)  # type: ignore[arg-type]
    size = picture.width
    plain = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (2 * size + 8, size), (255, 255, 255))
    canvas.paste(plain, (0, 0))
    canvas.paste(picture, (size + 8, 0))
    path = Path(path)
    canvas.save(path)
    return path
