"""SparseVLM's patch: after each pruning layer l, the attention that layer's text raters pay
the image tokens (recomputed from layer l's captured attention input for the rater rows only)
ranks them; the output of layer l is pruned, so layer l + 1 starts the stage. On the shared
mechanism of ``prumerge.adapters.pruning``."""

from __future__ import annotations

import torch
from torch import nn

from prumerge.adapters.llm import register_language_patch
from prumerge.adapters.llm_attention import attention_scores
from prumerge.adapters.pruning import (
    Rewrite,
    StagedPruning,
    StageView,
    top_per_image,
    uses_mrope,
)
from prumerge.errors import PrumergeError
from prumerge.methods import LanguageMethod
from prumerge.ops.recycle import cluster_weights, density_peak_clusters, recycle_counts


def text_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(T,) bool: the text tokens whose relevance to the image is above the mean relevance,
    relevance = softmax over the text of v @ t^T, averaged over the visual tokens.

    Args:
        visual: (N, H) the image's input embeddings.
        text: (T, H) the text after it.
    """
    relevance = (visual @ text.T).softmax(dim=-1).mean(dim=0)  # (T,)
    return relevance > relevance.mean()


@register_language_patch("sparsevlm")
class SparseVLMPatch(StagedPruning):
    needs_embeddings = True

    def __init__(self, language_model: nn.Module, method: LanguageMethod) -> None:
        layers = getattr(language_model, "layers", None)
        depth = len(layers) if isinstance(layers, nn.ModuleList) else 0
        if depth and method.layers[-1] + 1 >= depth:
            raise PrumergeError(
                f"sparsevlm pruning layers {list(method.layers)} must be below the decoder's "
                f"last layer {depth - 1}; pass layers=..."
            )
        self.method = method
        self.layer = method.layer
        self.capture_layers = tuple(method.layers)
        self.version = method.version
        self.heads = method.heads
        # M-RoPE decoders keep every token's original 3-D position, so on them no token moves:
        # the kept ones stay in their slots and each cluster takes its centre's slot.
        self.in_place = uses_mrope(language_model)
        self.compact_positions = method.version == "v1" and not self.in_place
        self.recycle = method.recycles
        self._raters: dict[int, torch.Tensor] = {}  # per image, its raters' prompt positions
        # per image, {first layer of a stage: (tokens kept by rank, cluster tokens added)}
        self._stages: dict[int, dict[int, tuple[int, int]]] = {}
        super().__init__(language_model, method)

    def arm(self, image: torch.Tensor, padding_mask: torch.Tensor) -> list[int]:
        self._raters = {}
        counts = torch.bincount(image[image >= 0]).tolist() if image.numel() else []
        self._stages = {
            i: {layer: (ranked, added) for layer, ranked, added in self.method.stages(n)}
            for i, n in enumerate(counts)
        }
        return super().arm(image, padding_mask)

    def disarm(self) -> None:
        self._raters = {}
        self._stages = {}
        super().disarm()

    def select(self, view: StageView, score: torch.Tensor) -> tuple[torch.Tensor, Rewrite | None]:
        """v1's recycling: each image keeps its best ``ranked`` tokens and, in the slots
        after them, the cluster means of the top 30 % of its dropped tokens by score
        (``prumerge.ops.recycle``): the release's order (kept, then recycled, then the
        text), positions renumbered. On M-RoPE decoders (``in_place``) the kept tokens stay
        where they are and each cluster's mean takes the slot, and so the 3-D position, of
        its centre."""
        if not self.recycle:
            return super().select(view, score)
        ranked = view.keep.clone()
        for image, stages in self._stages.items():
            if view.layer in stages:
                ranked[image] = stages[view.layer][0]
        keep = top_per_image(score, view.image, ranked)
        out = keep.clone()
        batch, target, source, weight = [], [], [], []
        for image, stages in self._stages.items():
            if view.layer not in stages:
                continue
            count, clusters = stages[view.layer]
            row = int((view.image == image).any(dim=1).nonzero()[0])
            slots = (view.image[row] == image).nonzero().flatten()  # in sequence order
            kept, dropped = slots[keep[row, slots]], slots[~keep[row, slots]]
            recycled, expected = recycle_counts(dropped.numel())
            if expected != clusters:
                raise PrumergeError(f"sparsevlm: image {image} has {slots.numel()} tokens here")
            if not clusters:
                continue
            members = dropped[score[row, dropped].topk(recycled).indices]  # by score
            assignment, centres = density_peak_clusters(view.hidden[row, members], clusters)
            positions = view.rows[row]
            if self.in_place:
                out[row, members[centres]] = True
                batch.append(torch.full((recycled,), row, device=slots.device))
                target.append(positions[members[centres][assignment]])
                source.append(positions[members])
                weight.append(cluster_weights(assignment, clusters))
                continue
            out[row, slots] = False
            out[row, slots[: count + clusters]] = True
            batch.append(torch.full((count + recycled,), row, device=slots.device))
            target += [positions[slots[:count]], positions[slots[count + assignment]]]
            source += [positions[kept], positions[members]]
            weight += [
                torch.ones(count, dtype=torch.float64, device=slots.device),
                cluster_weights(assignment, clusters),
            ]
        if not batch:
            return keep, None
        rewrite = Rewrite(torch.cat(batch), torch.cat(target), torch.cat(source), torch.cat(weight))
        return out, rewrite

    def schedule(self, count: int) -> list[tuple[int, int]]:
        return self.method.schedule(count)

    def score(self, view: StageView) -> torch.Tensor:
        source = view.layer - 1  # the pruning layer whose attention ranks
        attention = self.layers[source].self_attn
        captured = view.captured[source]
        embeddings = view.embeddings
        assert embeddings is not None
        batch, length = view.rows.shape
        hidden = captured.hidden.expand(batch, *captured.hidden.shape[1:])
        cos, sin = captured.position_embeddings
        cos, sin = cos.expand(batch, *cos.shape[1:]), sin.expand(batch, *sin.shape[1:])
        slots = torch.arange(length, device=view.rows.device)
        score = torch.zeros(batch, length, device=hidden.device)
        for image in torch.unique(view.image[view.image >= 0]).tolist():
            row = int((view.image == image).any(dim=1).nonzero()[0])
            mine = (view.image[row] == image).nonzero().flatten()
            text = ((slots > mine[-1]) & view.real[row] & (view.image[row] < 0)).nonzero().flatten()
            if text.numel() == 0:
                continue  # no rater: the image keeps its first tokens (ties to the earlier)
            if view.stage == 0:
                # The raters, once, from the decoder's input embeddings (all N image tokens),
                # kept as prompt positions for the later stages.
                prompt = embeddings[row if embeddings.shape[0] > 1 else 0]
                chosen = text_raters(prompt[view.rows[row, mine]], prompt[view.rows[row, text]])
                self._raters[image] = view.rows[row, text[chosen]]
            raters = text[torch.isin(view.rows[row, text], self._raters[image])]
            key_mask = (slots[None, :] <= raters[:, None]) & view.real[row][None, :]
            weights = attention_scores(
                attention,
                self.rotary,
                hidden[row : row + 1],
                (cos[row : row + 1], sin[row : row + 1]),
                raters[None],
                key_mask[None],
            )[0]  # (heads, R, L)
            if self.version == "v2":
                weights = weights / self._rope_logits(cos[row], sin[row], raters, attention)
                to_image = weights[:, :, mine].sum(dim=(1, 2))  # (heads,)
                top = to_image.topk(min(self.heads, weights.shape[0])).indices
                weights = weights[top]
            score[row, mine] = weights.mean(dim=0)[:, mine].mean(dim=0)
        return score

    def _rope_logits(
        self, cos: torch.Tensor, sin: torch.Tensor, raters: torch.Tensor, attention: nn.Module
    ) -> torch.Tensor:
        """(1, R, L) the logits all-ones queries and keys get from the rotary embeddings
        alone (SparseVLM+'s "gravity correction" divides the attention by them)."""
        ones = torch.ones(1, 1, cos.shape[0], cos.shape[-1], dtype=cos.dtype, device=cos.device)
        query, key = self.rotary(ones, ones, cos[None], sin[None])
        logits = query[0, 0, raters] @ key[0, 0].T / attention.head_dim**0.5
        return logits[None]
