"""Pure tensor operations for visual-token reduction. They import torch only."""

from prumerge.ops.attention import cls_attention, key_head_mean, mean_attention
from prumerge.ops.cls_topk import cls_topk
from prumerge.ops.divprune import divprune
from prumerge.ops.keep import full_reduction, kept_reduction
from prumerge.ops.pool import pooled_grid, spatial_pool
from prumerge.ops.prumerge import prumerge
from prumerge.ops.reduction import Reduction
from prumerge.ops.sampling import random_sample
from prumerge.ops.select import (
    budget_count,
    infer_grid,
    iqr_keep_count,
    spatial_rank,
    validate_keep,
)
from prumerge.ops.tome import tome
from prumerge.ops.visionzip import visionzip

__all__ = [
    "Reduction",
    "budget_count",
    "cls_attention",
    "cls_topk",
    "divprune",
    "full_reduction",
    "infer_grid",
    "key_head_mean",
    "iqr_keep_count",
    "kept_reduction",
    "mean_attention",
    "pooled_grid",
    "prumerge",
    "random_sample",
    "spatial_pool",
    "spatial_rank",
    "tome",
    "validate_keep",
    "visionzip",
]
