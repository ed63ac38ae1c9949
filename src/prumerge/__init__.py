"""prumerge: adaptive visual-token pruning and merging for large multimodal models."""

__version__ = "0.1.0"
