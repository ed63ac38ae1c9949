"""Trainable stand-ins that the training loop puts into a model and takes out again."""

from __future__ import annotations

import torch


class StandardizedProjector(torch.nn.Module):
    """LLaVA's projector applied to per-channel standardised features, for training only.

    DINOv2's penultimate features share a large common component (all patches of all images
    point the same way, cosine ~0.99), so a projector trained on them raw first learns a
    constant output that helps the LM's answer prior and leaves the image-specific part tiny;
    in our first run it stayed at chance level for 50 steps. Centring and scaling each channel
    (statistics from a fixed sample of training images) conditions the problem. The affine
    map is folded into `linear_1` afterwards (`fold()`), so the shipped projector is the stock
    `LlavaMultiModalProjector` applied to raw features.
    """

    def __init__(self, projector: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.projector = projector
        self.register_buffer("mean", mean)  # (C,)
        self.register_buffer("std", std)  # (C,)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: (B, N, C) raw -> (B, N, C_text)."""
        return self.projector((features - self.mean) / self.std)

    @torch.no_grad()
    def fold(self) -> dict[str, torch.Tensor]:
        """Projector state dict that computes the same function on raw features.

        linear_1(W (x - m) / s + b) = linear_1 with W' = W / s (per input column) and
        b' = b - W' m.
        """
        state = {k: v.detach().clone() for k, v in self.projector.state_dict().items()}
        weight = state["linear_1.weight"] / self.std  # (H, C) / (C,)
        state["linear_1.weight"] = weight
        state["linear_1.bias"] = state["linear_1.bias"] - weight @ self.mean
        return {k: v.contiguous() for k, v in state.items()}

    @torch.no_grad()
    def load_folded(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `fold()`: start from a stock projector state (e.g. a shipped one)."""
        state = {k: v.clone() for k, v in state.items()}
        folded_weight = state["linear_1.weight"]
        state["linear_1.bias"] = state["linear_1.bias"] + folded_weight @ self.mean
        state["linear_1.weight"] = folded_weight * self.std
        self.projector.load_state_dict(state)


class PromptEmbedding(torch.nn.Module):
    """An input embedding whose rows for a few token ids come from a trainable parameter.

    The learned prompt tokens are new vocabulary rows; the embedding matrix itself is tied to
    the LM head and stays frozen, so their rows train as a separate (K, C) parameter that
    replaces the matrix's rows on the way in.
    """

    def __init__(self, base: torch.nn.Embedding, token_ids: torch.Tensor, rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("token_ids", token_ids)  # (K,)
        self.rows = torch.nn.Parameter(rows.detach().float().clone())  # (K, C)

    @property
    def weight(self) -> torch.Tensor:  # what callers of get_input_embeddings() read
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)  # (B, L, C)
        slot = (ids.unsqueeze(-1) == self.token_ids).int()  # (B, L, K)
        if not bool(slot.any()):
            return out
        index = slot.argmax(-1)  # (B, L): which prompt token, where any
        learned = self.rows.to(out.dtype)[index]
        return torch.where(slot.any(-1, keepdim=True), learned, out)
