"""M-RoPE positions of a prompt whose images were reduced, as the Hugging Face adapter keeps them.

Qwen2.5-VL's 3-D rotary positions: text advances the (t, h, w) channels together; an image of
(h, w) merged cells placed after text that ends at position s - 1 puts cell (i, j) at
(s, s + i, s + j), and the text after it starts one past the image's largest position. With
prumerge, each reduced token keeps the position of the cell it stands at (its anchor), and
the text after a reduced image keeps the position it has without reduction; decoding
continues from there (``prumerge.adapters.qwen2_5_vl``). This module imports neither vLLM nor
transformers, so the main environment tests it against the adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class ReducedImage:
    """One image in a reduced prompt.

    Attributes:
        offset: the index of its first placeholder token in the prompt.
        cells: (rows, cols) of its merged grid, unreduced.
        anchors: (K,) the cell (raster order) each of its K reduced tokens stands at.
    """

    offset: int
    cells: tuple[int, int]
    anchors: torch.Tensor


def reduced_mrope_positions(
    num_tokens: int, images: Sequence[ReducedImage]
) -> tuple[torch.Tensor, int]:
    """(3, L) positions of a prompt of L tokens with reduced images, and the decoding delta.

    Args:
        num_tokens: L, the reduced prompt's length (each image's K placeholders in it).
        images: the images, in any order; their runs must not overlap.

    Returns:
        The (3, L) int64 positions, and ``delta`` = the largest position + 1 - L: the token
        at index i >= L (decoding) takes position i + delta on every channel.
    """
    pieces: list[torch.Tensor] = []
    start = 0  # the next prompt token
    position = 0  # the next free position
    for image in sorted(images, key=lambda item: item.offset):
        text = image.offset - start
        pieces.append(torch.arange(text).expand(3, text) + position)
        position += text
        rows, cols = image.cells
        grid = torch.stack(
            torch.meshgrid(
                torch.zeros(1, dtype=torch.long),
                torch.arange(rows),
                torch.arange(cols),
                indexing="ij",
            )
        ).reshape(3, -1)  # (3, rows * cols): (0, i, j) in raster order
        pieces.append(grid[:, image.anchors.long()] + position)
        position += max(rows, cols)  # one past the unreduced image's largest position
        start = image.offset + image.anchors.numel()
    text = num_tokens - start
    pieces.append(torch.arange(text).expand(3, text) + position)
    positions = torch.cat(pieces, dim=1)
    delta = int(positions.max()) + 1 - num_tokens if num_tokens else 0
    return positions, delta
