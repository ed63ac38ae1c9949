"""Pure tensor operations for visual-token reduction. They import torch only."""

from prumerge.ops.attention import cls_attention
from prumerge.ops.prumerge import prumerge
from prumerge.ops.reduction import Reduction
from prumerge.ops.select import budget_count, infer_grid, iqr_keep_count, spatial_rank

__all__ = [
    "Reduction",
    "budget_count",
    "cls_attention",
    "infer_grid",
    "iqr_keep_count",
    "prumerge",
    "spatial_rank",
]
