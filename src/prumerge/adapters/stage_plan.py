"""Which query rows and key columns of one forward pass survive a stage of
:class:`~prumerge.adapters.pruning.StagedPruning`: the rows kept, the mask, rotary
embeddings and position ids cut to them, and the front padding that keeps every batch
row's result independent of the others."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def pass_full(dropped: torch.Tensor, total: int) -> torch.Tensor:
    """(B, total) the pass's dropped columns: the prompt's, then nothing new."""
    batch = dropped.shape[0]
    full = torch.zeros(batch, total, dtype=torch.bool, device=dropped.device)
    length = min(dropped.shape[1], total)
    full[:, :length] = dropped[:, :length]
    return full


def pass_dropped(dropped: torch.Tensor, plan: StagePlan) -> torch.Tensor:
    """(B, q_len) which of the pass's query rows are dropped."""
    full = pass_full(dropped.to(plan.keep_columns.device), plan.kv_len)
    return full[:, plan.kv_len - plan.q_len :]


@dataclass
class StagePlan:
    """Which query rows and key columns of one forward pass survive in one stage's layers.

    Rows that keep fewer tokens than the longest are padded at the front: their extra query
    rows copy the row's last real token, and their extra key columns point at column
    ``kv_len``, a column appended to the mask that no query may attend to.
    """

    keep_rows: torch.Tensor | None  # (B, q') indices into the pass's q_len rows; None: all
    keep_columns: torch.Tensor  # (B, kv') indices into the kv_len columns (kv_len: blocked)
    q_len: int
    kv_len: int
    padded: bool  # some row has blocked columns

    def take_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.keep_rows is None:
            return tensor
        batch = self.keep_rows.shape[0]
        tensor = tensor.expand(batch, *tensor.shape[1:])
        index = self.keep_rows.to(tensor.device)[..., None].expand(-1, -1, tensor.shape[-1])
        return tensor.gather(1, index)

    def apply(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(kwargs)
        if self.keep_rows is not None:
            cos, sin = kwargs["position_embeddings"]
            kwargs["position_embeddings"] = (self.take_rows(cos), self.take_rows(sin))
            position_ids = kwargs.get("position_ids")
            if position_ids is not None and position_ids.shape[-1] == self.q_len:
                rows = self.keep_rows.to(position_ids.device)
                kwargs["position_ids"] = position_ids.expand(rows.shape[0], -1).gather(1, rows)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 4:
            kwargs["attention_mask"] = self._mask_4d(mask)
        elif isinstance(mask, torch.Tensor) and mask.ndim == 2 and mask.shape[-1] == self.kv_len:
            # (B, kv) padding mask (flash attention): keep the surviving columns.
            columns = self.keep_columns.to(mask.device)
            blocked = torch.zeros_like(mask[:, :1])
            kwargs["attention_mask"] = torch.cat([mask, blocked], dim=1).gather(1, columns)
        elif mask is None and self.padded:
            kwargs["attention_mask"] = self._causal_mask()
        return kwargs

    def _mask_4d(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, 1, q, kv): keep the surviving query rows and key columns."""
        batch = self.keep_columns.shape[0]
        mask = mask.expand(batch, -1, -1, -1)
        if mask.shape[-1] == self.kv_len:
            blocked = torch.finfo(mask.dtype).min if mask.is_floating_point() else False
            mask = torch.cat([mask, torch.full_like(mask[..., :1], blocked)], dim=-1)
            cols = self.keep_columns.to(mask.device)[:, None, None, :]
            mask = mask.gather(3, cols.expand(-1, mask.shape[1], mask.shape[2], -1))
        if self.keep_rows is not None and mask.shape[2] == self.q_len:
            rows = self.keep_rows.to(mask.device)[:, None, :, None]
            mask = mask.gather(2, rows.expand(-1, mask.shape[1], -1, mask.shape[3]))
        return mask

    def _causal_mask(self) -> torch.Tensor:
        """A boolean (B, 1, q', kv') causal mask over the original columns, for passes that
        had no mask (sdpa without padding) but now pad some rows."""
        columns = self.keep_columns  # (B, kv')
        start = self.kv_len - self.q_len
        rows = (
            self.keep_rows
            if self.keep_rows is not None
            else torch.arange(self.q_len, device=columns.device).expand(columns.shape[0], -1)
        )
        query_position = (rows + start)[:, :, None]  # (B, q', 1)
        allowed = (columns[:, None, :] <= query_position) & (columns[:, None, :] < self.kv_len)
        return allowed[:, None]


def plan_stage(
    hidden: torch.Tensor,
    kwargs: dict[str, Any],
    dropped: torch.Tensor,
    padding_mask: torch.Tensor,
    q_len: int | None = None,
) -> StagePlan:
    """Plan the layers of one stage in a forward pass of ``q_len`` tokens (default: the
    length of ``hidden``), ``dropped`` (B, L) the prompt positions they do not see."""
    batch = hidden.shape[0]
    q_len = hidden.shape[1] if q_len is None else q_len
    device = hidden.device
    mask = kwargs.get("attention_mask")
    # transformers 5.23 passes the cache as past_key_values, later releases as cache.
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    if isinstance(mask, torch.Tensor) and mask.ndim in (2, 4):
        total = mask.shape[-1]  # (B, [1, q,] kv): kv is the whole sequence so far
    else:
        # Layer 0 has already stored this pass's keys, so its cache length is the total.
        total = cache.get_seq_length(0) if cache is not None else 0
    total = max(total, q_len)  # without a cache, the inputs are the whole sequence
    start = total - q_len
    dropped = dropped.to(device)
    prompt_len = min(dropped.shape[1], total)
    full = torch.zeros(batch, total, dtype=torch.bool, device=device)
    full[:, :prompt_len] = dropped[:, :prompt_len]

    keep_columns = _front_padded(~full, fill=torch.full((batch,), total, device=device))
    rows_kept = ~full[:, start:]
    if bool(rows_kept.all()):
        keep_rows = None
    else:
        # Front padding rows copy the row's last real token of this pass.
        padding = padding_mask.to(device)
        within = torch.arange(q_len, device=device)
        real = (
            padding[:, start:]
            if padding.shape[1] >= total
            else torch.ones(batch, q_len, dtype=torch.bool, device=device)
        )
        last = torch.where(real & rows_kept, within, -1).max(dim=1).values.clamp(min=0)
        keep_rows = _front_padded(rows_kept, fill=last)
    padded = bool(((~full).sum(dim=1) != (~full).sum(dim=1)[0]).any())
    return StagePlan(
        keep_rows=keep_rows, keep_columns=keep_columns, q_len=q_len, kv_len=total, padded=padded
    )


def _front_padded(keep: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """(B, W) indices of the True entries of each row of ``keep``, in order, right-aligned
    to the longest row; rows with fewer entries start with ``fill[b]``."""
    batch, length = keep.shape
    count = keep.sum(dim=1)
    width = int(count.max())
    positions = torch.arange(length, device=keep.device).expand(batch, length)
    order = torch.argsort(torch.where(keep, positions, positions + length), dim=1, stable=True)
    slots = torch.arange(width, device=keep.device).expand(batch, width)
    source = slots - (width - count)[:, None]  # < 0 in the front padding
    taken = order.gather(1, source.clamp(min=0))
    return torch.where(source >= 0, taken, fill[:, None].expand(batch, width))
