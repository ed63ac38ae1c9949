"""Spatial average pooling of the patch grid down to a token budget."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from prumerge.ops.keep import full_reduction, validate_inputs, work_dtype
from prumerge.ops.reduction import Reduction
from prumerge.ops.select import budget_count, infer_grid

#: How far the pooled grid's aspect ratio may stray from the patch grid's (as a factor) before
#: a grid with fewer cells but the right shape is preferred. 24x24 at budget 192 pools to 12x16
#: (factor 4/3), but at budget 32 to 5x6 = 30 cells rather than 4x8 = 32 (factor 2).
MAX_ASPECT_FACTOR = 1.5


def pooled_grid(rows: int, cols: int, budget: int) -> tuple[int, int]:
    """The pooled grid (out_rows, out_cols) for a budget of output tokens.

    Among grids with out_rows <= rows, out_cols <= cols and at most ``budget`` cells, it takes
    the one with the most cells whose aspect ratio is within ``MAX_ASPECT_FACTOR`` of the patch
    grid's (any grid if none is), then the least distorted, then the one with fewer rows. A
    budget that is a perfect pooling factor gives the obvious grid: 144 of 24x24 is 12x12
    (2x2 pooling), 64 is 8x8 (3x3 pooling).
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1; got {budget}")
    best: tuple[tuple[bool, int, float, int], tuple[int, int]] | None = None
    for out_rows in range(1, rows + 1):
        out_cols = min(cols, budget // out_rows)
        if out_cols < 1:
            break
        # Rounded, so that a grid and its transpose tie exactly.
        distortion = round(abs(math.log((out_rows * cols) / (out_cols * rows))), 9)
        within = distortion <= round(math.log(MAX_ASPECT_FACTOR), 9)
        rank = (within, out_rows * out_cols, -distortion, -out_rows)
        if best is None or rank > best[0]:
            best = (rank, (out_rows, out_cols))
    assert best is not None
    return best[1]


def _cell_of(size: int, out: int, device: torch.device) -> torch.Tensor:
    """(size,) the pooling cell of every input position along one axis.

    Adaptive pooling's cell i spans [floor(i*size/out), ceil((i+1)*size/out)); the cells
    overlap when out does not divide size. Position p goes to the cell floor(p*out/size),
    which always contains it.
    """
    return (torch.arange(size, device=device) * out) // size


def spatial_pool(
    tokens: torch.Tensor, *, keep: int | float = 64, grid: tuple[int, int] | None = None
) -> Reduction:
    """Average-pool the patch grid to at most ``keep`` cells, one output token per cell.

    The pooled grid comes from ``pooled_grid``: 2x2 pooling for 144 of 576, 3x3 for 64 of
    576. A budget that is no perfect pooling factor uses adaptive average pooling (PyTorch's
    windows, which overlap when the sizes do not divide) to the closest grid with at most
    ``keep`` cells, so a row may get fewer tokens than ``keep`` (30 for 32 of 24x24). Output
    tokens come in raster order of the cells, all with index -1 (each averages two or more
    patches); ``assignment`` maps every patch to a cell that contains it.

    Args:
        tokens: (B, N, C) patch features in raster order.
        keep: budget of output tokens, an int count or a float ratio of N.
        grid: (rows, cols) patch grid; inferred when N is a perfect square.

    Returns:
        A ``Reduction`` with out_rows * out_cols tokens per row (all N, unchanged, if
        keep >= N).
    """
    validate_inputs(tokens)
    batch, num, width = tokens.shape
    rows, cols = infer_grid(num, grid)
    budget = budget_count(keep, num)
    if budget >= num:
        return full_reduction(tokens)
    out_rows, out_cols = pooled_grid(rows, cols, budget)
    device = tokens.device
    image = tokens.to(work_dtype(tokens)).transpose(1, 2).reshape(batch, width, rows, cols)
    pooled = F.adaptive_avg_pool2d(image, (out_rows, out_cols))  # (B, C, r, c)
    pooled = pooled.flatten(2).transpose(1, 2)  # (B, r*c, C)

    row_cell = _cell_of(rows, out_rows, device)
    col_cell = _cell_of(cols, out_cols, device)
    assignment = (row_cell[:, None] * out_cols + col_cell[None, :]).flatten()  # (N,)
    count = out_rows * out_cols
    return Reduction(
        tokens=pooled.to(tokens.dtype).clone(memory_format=torch.contiguous_format),
        lengths=torch.full((batch,), count, dtype=torch.long, device=device),
        # Below N tokens every cell spans two or more patches: none stands for a single one.
        index=torch.full((batch, count), -1, dtype=torch.long, device=device),
        assignment=assignment.expand(batch, num).clone(),
        attention_selected=torch.zeros(batch, num, dtype=torch.bool, device=device),
    )
