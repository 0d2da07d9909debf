"""Qwen2.5-VL's 3-D multimodal RoPE position ids (M-RoPE) for a token stream with images/videos.

Qwen2-VL (Wang et al. 2024, arXiv:2409.12191) introduced M-RoPE: every token has a (temporal,
height, width) position. A text token has its running index in all three. The tokens of an
image or video item, laid out row-major over its ``(t, h / merge, w / merge)`` token grid, get
``start + (time, row, column)``; Qwen2.5-VL (Bai et al. 2025, arXiv:2502.13923) makes the
time of a video's temporal patch ``int(index * tokens_per_second * second_per_grid_t)`` so the
temporal positions follow absolute time. After an item the running index advances by
``max(h, w) / merge``.

:func:`mrope_position_ids` computes this as transformers 5.x's
``Qwen2_5_VLModel.get_rope_index`` does (one vectorized pass over all tokens instead of a loop
per item), including its two behaviours worth knowing: padding positions are 0, and the text
after a video continues from ``start + max(h, w) / merge`` even when the video's temporal
positions run higher (transformers 4.x continued from the largest position + 1). It feeds
:func:`forge_kernels.mrope_cos_sin`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

__all__ = ["mrope_position_ids"]


def _segments(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(valid [B, S] bool, segment [B, S] int64, num_segments)``: a segment is a row, or a
    document of the packed row."""
    batch, seq = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        valid = torch.ones(batch, seq, dtype=torch.bool, device=device)
    else:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"mrope_position_ids: attention_mask {tuple(attention_mask.shape)} must have the "
                f"shape of input_ids {tuple(input_ids.shape)}"
            )
        valid = attention_mask.to(device=device).bool()
    if cu_seqlens is None:
        segment = torch.arange(batch, device=device)[:, None].expand(batch, seq)
        return valid, segment, batch
    if batch != 1:
        raise ValueError(
            f"mrope_position_ids: cu_seqlens describes the documents of one packed row, but "
            f"input_ids has {batch} rows; pack them into shape [1, tokens]"
        )
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    bounds = cu.tolist()
    if cu.dim() != 1 or len(bounds) < 2 or bounds[0] != 0 or bounds[-1] > seq:
        raise ValueError(
            f"mrope_position_ids: cu_seqlens {bounds} must be [0, ..., total] with total <= "
            f"the row length {seq}"
        )
    if any(b < a for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"mrope_position_ids: cu_seqlens {bounds} must be non-decreasing")
    pos = torch.arange(seq, device=device)
    segment = torch.searchsorted(cu[1:], pos, right=True)[None]
    valid = valid & (pos < bounds[-1])[None]  # tokens after the last document: padding
    return valid, segment, len(bounds) - 1


def _item_tokens(
    is_kind: torch.Tensor,
    grid_thw: torch.Tensor | None,
    merge: int,
    kind: str,
    token_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """For the tokens of one kind (image or video), in stream order: ``(item, index in the item,
    llm grid [items, 3])``; ``None`` when there are none."""
    count = int(is_kind.sum())
    arg = f"{kind}_grid_thw"
    if grid_thw is None:
        if count:
            raise ValueError(
                f"mrope_position_ids: input_ids holds {count} {kind} tokens (id {token_id}) "
                f"but {arg} is None; pass the {arg} the processor returned"
            )
        return None
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(
            f"mrope_position_ids: {arg} must be [items, 3], got {tuple(grid_thw.shape)}"
        )
    grid = grid_thw.to(device=is_kind.device, dtype=torch.int64)
    for k, (t, h, w) in enumerate(grid.tolist()):
        if min(t, h, w) < 1 or h % merge or w % merge:
            raise ValueError(
                f"mrope_position_ids: {arg}[{k}] = {[t, h, w]} must be positive with height and "
                f"width divisible by spatial_merge_size {merge}"
            )
    llm = grid // torch.tensor([1, merge, merge], device=grid.device)
    tokens = llm.prod(1)
    if int(tokens.sum()) != count:
        raise ValueError(
            f"mrope_position_ids: {arg} {grid.tolist()} describes {int(tokens.sum())} {kind} "
            f"tokens (t * h * w / {merge}**2 each) but input_ids holds {count} (id {token_id}); "
            f"every {kind} needs exactly its number of placeholder tokens, in {arg} order"
        )
    if count == 0:
        return None
    item = torch.repeat_interleave(torch.arange(len(tokens), device=grid.device), tokens)
    index = torch.arange(count, device=grid.device) - (torch.cumsum(tokens, 0) - tokens)[item]
    return item, index, llm


def mrope_position_ids(
    input_ids: torch.Tensor,
    *,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    image_token_id: int,
    video_token_id: int | None,
    vision_start_token_id: int | None,
    spatial_merge_size: int,
    second_per_grid_ts: torch.Tensor | Sequence[float] | None = None,
    tokens_per_second: float = 2,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL M-RoPE positions of ``input_ids`` ``[B, S]`` (see the module docstring).

    Args:
        input_ids: the token stream; each image (video) is a run of ``t * h * w / merge**2``
            ``image_token_id`` (``video_token_id``) tokens right after a
            ``vision_start_token_id`` token, as the Qwen2.5-VL processor writes it.
            ``video_token_id=None``: no videos. ``vision_start_token_id=None``: skip the check
            that each item follows one.
        image_grid_thw, video_grid_thw: int ``[items, 3]`` in encoder patches, items in stream
            order across the whole batch (row after row, document after document).
        spatial_merge_size: the vision config's (2 in every release).
        second_per_grid_ts: ``[videos]`` seconds per temporal patch (the processor's
            ``second_per_grid_ts``); default 1 per video.
        tokens_per_second: the vision config's ``tokens_per_second`` (2 in every release).
        attention_mask: ``[B, S]``, 0 on padding (left or right): positions are computed over
            the unpadded tokens and padding gets position 0.
        cu_seqlens: with ``B == 1``, the boundaries ``[0, ..., total]`` of the documents packed
            in the row: positions restart in every document exactly as if it were its own row
            (tokens after ``total`` are padding). Combines with ``attention_mask``.

    Returns:
        ``position_ids`` ``[3, B, S]`` (input_ids' dtype) and ``rope_deltas`` ``[segments, 1]``:
        per row (``[B, 1]``), or per document when packed, ``max position + 1 - tokens`` (what
        generation adds to the text positions after the prompt).

    Raises ``ValueError`` when the placeholder tokens do not match the grids: counts, runs split
    by other tokens, or an item not preceded by ``vision_start_token_id``.
    """
    if input_ids.dim() != 2:
        raise ValueError(
            f"mrope_position_ids: input_ids must be [batch, seq], got {tuple(input_ids.shape)}"
        )
    if spatial_merge_size < 1:
        raise ValueError(f"spatial_merge_size must be >= 1, got {spatial_merge_size}")
    batch, seq = input_ids.shape
    device = input_ids.device
    valid, segment, num_segments = _segments(input_ids, attention_mask, cu_seqlens)
    flat_index = valid.flatten().nonzero().squeeze(1)  # stream order: row by row
    ids = input_ids.flatten()[flat_index]
    seg = segment.flatten()[flat_index]
    n = ids.numel()

    increment = torch.ones(n, dtype=torch.int64, device=device)  # running-index step per token
    # Per-token (temporal offset, row, column) inside its item: zero for text tokens.
    offsets = torch.zeros(3, n, dtype=torch.int64, device=device)
    kinds = (
        ("image", image_token_id, image_grid_thw, None),
        ("video", video_token_id, video_grid_thw, second_per_grid_ts),
    )
    for kind, token_id, grid_thw, seconds in kinds:
        if token_id is None:
            if grid_thw is not None:
                raise ValueError(
                    f"mrope_position_ids: {kind}_grid_thw is given but {kind}_token_id is None; "
                    f"pass the {kind} placeholder token id"
                )
            continue
        is_kind = ids == token_id
        found = _item_tokens(is_kind, grid_thw, spatial_merge_size, kind, token_id)
        if found is None:
            continue
        item, index, llm = found
        where = is_kind.nonzero().squeeze(1)  # stream positions of this kind's tokens
        _check_runs(
            where, item, index, ids, seg, input_ids, flat_index, kind, vision_start_token_id
        )
        lt, lh, lw = llm[item].unbind(1)
        frame = index // (lh * lw)
        if kind == "video":
            frame = _video_time(frame, item, seconds, tokens_per_second, llm.shape[0], device)
        offsets[:, where] = torch.stack([frame, (index // lw) % lh, index % lw])
        last = index == lt * lh * lw - 1
        increment[where] = torch.where(last, torch.maximum(lh, lw), 0)

    # Running index before each token, restarting per segment. A vision token's start is the
    # running index before its item, as the item's only step sits on its last token.
    running = torch.cumsum(increment, 0) - increment
    seg_total = torch.zeros(num_segments, dtype=torch.int64, device=device)
    seg_total.index_add_(0, seg, increment)
    running = running - (torch.cumsum(seg_total, 0) - seg_total)[seg]
    positions = running[None] + offsets

    position_ids = torch.zeros(3, batch * seq, dtype=input_ids.dtype, device=device)
    position_ids[:, flat_index] = positions.to(input_ids.dtype)
    seg_max = torch.full((num_segments,), -1, dtype=torch.int64, device=device)
    seg_max.scatter_reduce_(0, seg, positions.amax(0), reduce="amax")
    seg_len = torch.bincount(seg, minlength=num_segments)
    deltas = torch.where(seg_len > 0, seg_max + 1 - seg_len, 0)
    return position_ids.view(3, batch, seq), deltas[:, None]


def _video_time(
    frame: torch.Tensor,
    item: torch.Tensor,
    seconds: torch.Tensor | Sequence[float] | None,
    tokens_per_second: float,
    num_videos: int,
    device: torch.device,
) -> torch.Tensor:
    """``int(frame * tokens_per_second * second_per_grid_t)``, with transformers' dtypes (the
    step in ``second_per_grid_ts``' dtype; a Python list behaves as float32)."""
    if seconds is None:
        return (frame * tokens_per_second).long()
    if not isinstance(seconds, torch.Tensor):
        step = torch.tensor(
            [tokens_per_second * float(s) for s in seconds],
            dtype=torch.get_default_dtype(),
            device=device,
        )
    else:
        step = tokens_per_second * seconds.to(device).flatten()
    if step.numel() != num_videos:
        raise ValueError(
            f"mrope_position_ids: second_per_grid_ts has {step.numel()} values for {num_videos} "
            "videos; give one per video_grid_thw row"
        )
    return (frame * step[item]).long()


def _check_runs(
    where: torch.Tensor,
    item: torch.Tensor,
    index: torch.Tensor,
    ids: torch.Tensor,
    seg: torch.Tensor,
    input_ids: torch.Tensor,
    flat_index: torch.Tensor,
    kind: str,
    vision_start_token_id: int | None,
) -> None:
    """Each item's tokens must be one unbroken run inside one segment, right after a
    ``vision_start_token_id``."""

    def located(stream_pos: int) -> str:
        row, col = divmod(int(flat_index[stream_pos]), input_ids.shape[1])
        return f"input_ids[{row}, {col}]"

    same_item = item[1:] == item[:-1]
    broken = same_item & ((where[1:] != where[:-1] + 1) | (seg[where[1:]] != seg[where[:-1]]))
    if bool(broken.any()):
        k = int(broken.nonzero()[0])
        raise ValueError(
            f"mrope_position_ids: the tokens of {kind} {int(item[k])} are interrupted after "
            f"{located(int(where[k]))} (by other tokens or a document boundary); each {kind}'s "
            f"placeholder run must be unbroken and match its {kind}_grid_thw row"
        )
    if vision_start_token_id is None:
        return
    first = where[index == 0]
    before = (first - 1).clamp_min(0)
    ok = (first > 0) & (seg[before] == seg[first]) & (ids[before] == vision_start_token_id)
    if not bool(ok.all()):
        k = int((~ok).nonzero()[0])
        raise ValueError(
            f"mrope_position_ids: {kind} {k} starts at {located(int(first[k]))} without a "
            f"vision-start token (id {vision_start_token_id}) right before it; the "
            f"{kind}_grid_thw rows and the placeholder runs are out of step (or "
            "vision_start_token_id is wrong)"
        )
