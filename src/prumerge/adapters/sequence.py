"""Shrinking the runs of image placeholder tokens to the reduced per-image token counts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prumerge.errors import PrumergeError


@dataclass
class Packed:
    """Placeholder-shrunk, re-padded text inputs.

    Attributes:
        input_ids: (B, L') ids with each image's run of N placeholders cut to its length.
        attention_mask: (B, L') 1 for real tokens, 0 for padding.
        labels: (B, L') labels moved along with the ids (-100 on padding), or None.
        source: (B, L') the input position each output slot was taken from (any position
            for a padding slot).
        valid: (B, L') True where a slot holds a token, False where it is new padding.
        dropped: (B, L) True at the input's placeholders that were cut.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    source: torch.Tensor
    valid: torch.Tensor
    dropped: torch.Tensor

    def position_ids(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Carry caller-given position ids through the cut, closing the gaps it leaves.

        A kept token at position p moves to p minus the number of cut placeholders whose
        position was below p, so text after an image continues right after its last kept
        token. Comparing position values (not slots) also handles packed rows whose
        positions restart, such as several single-question blocks sharing one image prefix.

        Args:
            position_ids: (B, L) positions of the input tokens.

        Returns:
            (B, L') positions of the output slots (0 on padding slots).
        """
        big = torch.iinfo(position_ids.dtype).max
        cut = torch.where(self.dropped, position_ids, big).sort(dim=1).values  # (B, L)
        taken = position_ids.gather(1, self.source)  # (B, L')
        shift = torch.searchsorted(cut, taken.contiguous())  # cut positions below each
        return torch.where(self.valid, taken - shift, torch.zeros_like(taken))

    def carry(self, position_ids: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """Carry positions through the cut without closing its gaps (``positions="original"``,
        and Qwen's M-RoPE): text after an image continues as it would without reduction.

        Args:
            position_ids: (..., B, L) positions of the input tokens (leading dims, such as
                M-RoPE's 3 axes, are carried alike).
            source: (B, L') the input position whose position id each output slot takes;
                default ``self.source``. ``anchored_source`` gives every image token the
                position of the patch it stands for.

        Returns:
            (..., B, L') positions of the output slots (0 on padding slots).
        """
        lead = position_ids.shape[:-2]
        source = self.source if source is None else source
        source = source.expand(*lead, *source.shape)
        taken = position_ids.expand(*lead, *self.source.shape[:1], -1).gather(-1, source)
        return torch.where(self.valid, taken, torch.zeros_like(taken))

    def anchored_source(
        self, image_token_id: int, lengths: torch.Tensor, anchors: torch.Tensor
    ) -> torch.Tensor:
        """(B, L') like ``source``, but every image token points at the placeholder of the
        patch it stands for rather than at the k-th placeholder of its image's run.

        Args:
            image_token_id: the placeholder id.
            lengths: (I,) reduced token count of every image.
            anchors: (sum lengths,) for every reduced token, in order, the index within its
                image's unreduced run of the placeholder it stands at.
        """
        image, within = assign_placeholders(self.input_ids, image_token_id, lengths)
        is_image = (self.input_ids == image_token_id) & self.valid
        offsets = lengths.cumsum(0) - lengths
        flat = (offsets.to(image.device)[image] + within).clamp(max=max(anchors.shape[0] - 1, 0))
        anchor = anchors.to(image.device)[flat] if anchors.numel() else torch.zeros_like(flat)
        # Runs are contiguous in the input: the run starts at source - within.
        return torch.where(is_image, self.source - within + anchor, self.source)

    def attention_mask_4d(self, mask: torch.Tensor) -> torch.Tensor:
        """Carry a caller-given (B, 1 or heads, L, L) mask through the cut.

        Rows and columns follow their tokens; new padding slots are masked as keys and, as
        queries, see only themselves (so no row of the softmax is empty).

        Args:
            mask: boolean (True = may attend) or additive float mask over the input.

        Returns:
            The mask over the output slots, of the same kind and dtype.
        """
        batch, heads, _, _ = mask.shape
        width = self.source.shape[1]
        rows = self.source[:, None, :, None].expand(batch, heads, width, mask.shape[3])
        taken = mask.gather(2, rows)
        cols = self.source[:, None, None, :].expand(batch, heads, width, width)
        taken = taken.gather(3, cols)  # (B, h, L', L')
        pair = self.valid[:, None, :, None] & self.valid[:, None, None, :]
        eye = torch.eye(width, dtype=torch.bool, device=mask.device)
        alone = (~self.valid)[:, None, :, None] & eye  # padding queries see themselves
        if mask.dtype == torch.bool:
            return (taken & pair) | alone
        blocked = torch.finfo(mask.dtype).min
        return torch.where(pair, taken, torch.where(alone, 0.0, blocked).to(mask.dtype))


def images_per_row(
    input_ids: torch.Tensor, image_token_id: int, tokens_per_image: int
) -> torch.Tensor:
    """(B,) number of images each row's placeholders stand for; raises if they do not divide."""
    placeholders = (input_ids == image_token_id).sum(dim=1)
    if bool((placeholders % tokens_per_image).any()):
        raise PrumergeError(
            f"the prompt has {placeholders.tolist()} image placeholder tokens per row, which is "
            f"not a multiple of the {tokens_per_image} tokens per image the vision tower "
            f"produces; build the inputs with the model's processor"
        )
    return placeholders // tokens_per_image


def assign_placeholders(
    input_ids: torch.Tensor, image_token_id: int, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which image, and which of its tokens, every placeholder stands for.

    Images are numbered in order across rows, as the processor and ``pixel_values`` order
    them; image i owns ``counts[i]`` consecutive placeholders and never straddles two rows.

    Args:
        input_ids: (B, L) token ids.
        image_token_id: the placeholder id.
        counts: (I,) placeholders of every image.

    Returns:
        ``(image, within)``, both (B, L) int64: the image of each placeholder and its index
        within that image's run (0 where the token is no placeholder).
    """
    is_image = input_ids == image_token_id
    counts = counts.to(input_ids.device)
    total = int(is_image.sum())
    if total != int(counts.sum()):
        raise PrumergeError(
            f"the prompts hold {total} image placeholder tokens but the {counts.shape[0]} "
            f"image(s) given stand for {int(counts.sum())} ({counts.tolist()}); build the inputs "
            f"with the model's processor"
        )
    ends = counts.cumsum(0)  # (I,)
    row_ends = is_image.sum(dim=1).cumsum(0)  # (B,)
    on_boundary = (row_ends[:, None] == ends[None, :]).any(dim=1) | (row_ends == 0)
    if not bool(on_boundary.all()):
        raise PrumergeError(
            f"the placeholders of row(s) {(~on_boundary).nonzero().flatten().tolist()} end inside "
            f"an image's run ({counts.tolist()} tokens per image); build the inputs with the "
            f"model's processor"
        )
    ordinal = (is_image.flatten().long().cumsum(0) - 1).view_as(input_ids).clamp(min=0)
    image = torch.searchsorted(ends, ordinal, right=True).clamp(max=max(counts.shape[0] - 1, 0))
    within = ordinal - (ends - counts)[image]
    zero = torch.zeros_like(image)
    return torch.where(is_image, image, zero), torch.where(is_image, within, zero)


def shrink_placeholders(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    *,
    image_token_id: int,
    tokens_per_image: int | torch.Tensor,
    lengths: torch.Tensor,
    pad_token_id: int,
    left_pad: bool,
) -> Packed:
    """Cut each image's run of placeholders to ``lengths[i]`` and re-pad the batch.

    Image i owns ``tokens_per_image`` (or ``tokens_per_image[i]``) consecutive placeholders,
    numbered in order across rows (see ``assign_placeholders``); the first ``lengths[i]`` of
    them are kept. Padding of the input is dropped and the rows are padded again, on the
    left for generation.

    Args:
        input_ids: (B, L) token ids.
        attention_mask: (B, L) or None.
        labels: (B, L) or None.
        image_token_id: the placeholder id.
        tokens_per_image: N, the placeholders per image the processor inserted, or (I,)
            counts for models whose images differ (LLaVA-NeXT anyres, Qwen2-VL).
        lengths: (I,) reduced token count of every image in the batch.
        pad_token_id: id written into new padding.
        left_pad: pad on the left (generation) or on the right.

    Returns:
        The shrunk ``Packed`` inputs.
    """
    batch, length = input_ids.shape
    device = input_ids.device
    lengths = lengths.to(device)
    is_image = input_ids == image_token_id
    if isinstance(tokens_per_image, int):
        per_row = images_per_row(input_ids, image_token_id, tokens_per_image)
        if int(per_row.sum()) != lengths.shape[0]:
            raise PrumergeError(
                f"the prompts hold placeholders for {int(per_row.sum())} image(s) but "
                f"{lengths.shape[0]} image(s) were given"
            )
        counts = torch.full_like(lengths, tokens_per_image)
    else:
        counts = tokens_per_image.to(device)
    image, within = assign_placeholders(input_ids, image_token_id, counts)
    keep = ~is_image | (within < lengths[image])
    if attention_mask is not None:
        keep &= attention_mask.bool()

    new_length = keep.sum(dim=1)  # (B,)
    width = int(new_length.max())
    positions = torch.arange(length, device=device).expand(batch, length)
    # Kept positions first, in their original order.
    order = torch.argsort(torch.where(keep, positions, positions + length), dim=1, stable=True)
    slots = torch.arange(width, device=device).expand(batch, width)
    offset = (width - new_length)[:, None] if left_pad else torch.zeros_like(new_length)[:, None]
    valid = (slots >= offset) & (slots < offset + new_length[:, None])
    source = order.gather(1, (slots - offset).clamp(0, length - 1))

    def take(tensor: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.where(valid, tensor.gather(1, source), torch.full_like(source, fill))

    return Packed(
        input_ids=take(input_ids, pad_token_id),
        attention_mask=valid.long(),
        labels=None if labels is None else take(labels, -100),
        source=source,
        valid=valid,
        dropped=is_image & ~keep,
    )
