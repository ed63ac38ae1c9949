"""The result type shared by every token-reduction op."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Reduction:
    """Reduced visual tokens of a batch, padded to the longest row.

    Attributes:
        tokens: (B, K, C) output tokens; row b is valid up to ``lengths[b]``, zeros after.
        lengths: (B,) int64 number of valid output tokens per row.
        index: (B, K) int64 patch index each output token stands for, -1 for padding and for
            tokens that stand for no single patch (the supplement token, merged centres).
        assignment: (B, N) int64 output slot that represents each input patch: a kept patch
            maps to its own slot, a pruned patch to the slot it was merged into (or, for
            methods that only drop tokens, the most similar kept token), -1 if none.
        attention_selected: (B, N) bool, patches chosen by [CLS] attention (as opposed to
            PruMerge+'s spatial samples or other rules), for pictures and statistics.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    index: torch.Tensor
    assignment: torch.Tensor
    attention_selected: torch.Tensor

    @property
    def num_input(self) -> int:
        """N, the number of input patches per row."""
        return self.assignment.shape[1]

    @property
    def valid_mask(self) -> torch.Tensor:
        """(B, K) bool, True where ``tokens`` holds a real output token."""
        positions = torch.arange(self.tokens.shape[1], device=self.lengths.device)
        return positions[None, :] < self.lengths[:, None]

    @property
    def kept_mask(self) -> torch.Tensor:
        """(B, N) bool, True for patches that survive as their own output token."""
        mask = torch.zeros(
            self.index.shape[0], self.num_input + 1, dtype=torch.bool, device=self.index.device
        )
        # Padding (-1) lands in the extra last column, which is dropped.
        mask.scatter_(1, self.index.clamp(min=-1) % (self.num_input + 1), True)
        return mask[:, : self.num_input]

    def anchors(self) -> torch.Tensor:
        """(B, K) int64: the input patch each output token stands at, for position ids.

        A kept patch stands at itself; a merged token (index -1) at the lowest-index patch
        assigned to it (a pooled cell's top-left patch, a VisionZip centre's first member);
        a token no patch is assigned to (PruMerge's supplement) at the last patch, N - 1.
        Padding is -1.
        """
        batch, slots = self.index.shape
        num = self.num_input
        first = torch.full((batch, slots), num, dtype=torch.long, device=self.index.device)
        patches = torch.arange(num, device=self.index.device).expand(batch, num)
        assigned = self.assignment.clamp(0, max(slots - 1, 0))
        first = first.scatter_reduce(
            1, assigned, torch.where(self.assignment >= 0, patches, num), reduce="amin"
        )
        anchor = torch.where(self.index >= 0, self.index, first)
        anchor = torch.where(anchor >= num, torch.full_like(anchor, num - 1), anchor)
        return torch.where(self.valid_mask, anchor, torch.full_like(anchor, -1))

    def unpad(self) -> list[torch.Tensor]:
        """The valid tokens of each row: a list of B tensors of shape (lengths[b], C)."""
        return [row[:n] for row, n in zip(self.tokens, self.lengths.tolist(), strict=True)]
