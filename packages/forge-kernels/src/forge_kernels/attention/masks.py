"""Attention masks as data: one description, evaluated densely or as a FlexAttention ``mask_mod``.

An :class:`AttentionMask` says which keys each query may see. It is a small frozen object holding
flags (``causal``, ``window``) and optional per-token tensors (document ``segment_ids``,
bidirectional ``block_ids``, ``positions``), and it turns into

* a FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (:meth:`AttentionMask.mask_mod`)
  and a :class:`~torch.nn.attention.flex_attention.BlockMask` (:meth:`AttentionMask.to_block_mask`)
  for the block-sparse kernel of FlexAttention (Dong et al. 2024, arXiv:2412.05496);
* a dense boolean ``[B | 1, 1, Sq, Sk]`` tensor (:meth:`AttentionMask.to_dense`), ``True`` where
  attention is allowed, for PyTorch SDPA and the eager reference.

Both come from one predicate, so every backend sees the same mask. The predicate, for a query at
position ``qp`` and a key at position ``kp`` (positions along the sequence; by default the token
index, with queries aligned to the *end* of the keys when ``Sq != Sk``, as FlashAttention 2 does)::

    allowed = same_segment                                  # documents never see each other
            & (not causal or kp <= qp or same_block)        # causal, except inside a block
            & (left < 0 or kp >= qp - left)                 # sliding window (left, right),
            & (right < 0 or kp <= qp + right)               # -1 = unbounded (flash-attn's window_size)

where ``same_block`` means both tokens carry the same non-negative block id. A query with no
allowed key (a fully masked row) gets a zero output and a log-sum-exp of ``-inf``.

Builders: :func:`causal_mask` (Vaswani et al. 2017), :func:`sliding_window_mask` (Longformer,
Beltagy et al. 2020; Mistral 7B, Jiang et al. 2023), :func:`document_mask` for packed sequences
described by ``cu_seqlens`` (FlashAttention 2's varlen convention, Dao 2023), and
:func:`multimodal_mask`: causal across tokens, bidirectional inside each image / video / action
chunk, never across documents, as in interleaved vision-language and vision-language-action
models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

__all__ = [
    "AttentionMask",
    "causal_mask",
    "dense_mask",
    "document_mask",
    "multimodal_mask",
    "segment_ids_from_cu_seqlens",
    "sliding_window_mask",
]

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def normalize_window(window: tuple[int, int] | None) -> tuple[int, int] | None:
    """``(left, right)`` with ``-1`` for an unbounded side; ``None`` when both sides are unbounded."""
    if window is None:
        return None
    try:
        left, right = (int(w) for w in window)
    except (TypeError, ValueError):
        raise ValueError(
            f"window must be a (left, right) pair of ints as flash-attn's window_size, got {window!r}"
        ) from None
    if left < -1 or right < -1:
        raise ValueError(f"window sides must be >= 0, or -1 for unbounded; got {(left, right)}")
    if left == -1 and right == -1:
        return None
    return left, right


def _as_2d(name: str, ids: torch.Tensor | None) -> torch.Tensor | None:
    """Per-token ids as ``[B | 1, S]`` integer tensors."""
    if ids is None:
        return None
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {ids.dtype}")
    if ids.dim() == 1:
        return ids[None]
    if ids.dim() != 2:
        raise ValueError(f"{name} must be [seq] or [batch, seq], got shape {tuple(ids.shape)}")
    return ids


def _take(ids: torch.Tensor, b: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``ids[b, idx]`` for ``[B | 1, S]`` ids; works on 0-d indices (vmap) and broadcast grids."""
    return ids[0][idx] if ids.shape[0] == 1 else ids[b, idx]


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class AttentionMask:
    """Which keys each query may attend to, as data (see the module docstring for the predicate).

    Args:
        causal: a query sees keys at positions ``<=`` its own (except inside a bidirectional block).
        window: ``(left, right)`` sliding window in positions, ``-1`` for an unbounded side, as
            flash-attn's ``window_size``; ``(w, 0)`` is a causal sliding window of ``w + 1`` keys.
            Windows bound every pair, blocks included: use ``right = -1`` with ``causal=True`` to
            keep blocks fully bidirectional under a window.
        segment_ids: ``[S]`` or ``[B, S]`` document id of every query token; tokens only attend
            within their own document. Queries and keys share them unless ``kv_segment_ids``.
        kv_segment_ids: document ids of the keys when they differ from the queries' (``Sq != Sk``).
        block_ids: ``[S]`` or ``[B, S]``; tokens with the same non-negative id (one image, video
            or action chunk) attend to each other bidirectionally; ``-1`` marks ordinary (text)
            tokens. Only changes anything with ``causal=True``. Needs ``Sq == Sk``.
        q_positions, kv_positions: positions used by ``causal`` and ``window``, when they are not
            the token indices (for example positions within each document when queries and keys
            are packed with different document lengths, see :func:`document_mask`).

    Equality is identity (the object holds tensors), so it can key caches of built block masks.
    """

    causal: bool = False
    window: tuple[int, int] | None = None
    segment_ids: torch.Tensor | None = None
    kv_segment_ids: torch.Tensor | None = None
    block_ids: torch.Tensor | None = None
    q_positions: torch.Tensor | None = None
    kv_positions: torch.Tensor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "window", normalize_window(self.window))
        for name in (
            "segment_ids",
            "kv_segment_ids",
            "block_ids",
            "q_positions",
            "kv_positions",
        ):
            object.__setattr__(self, name, _as_2d(name, getattr(self, name)))
        if self.kv_segment_ids is not None and self.segment_ids is None:
            raise ValueError("kv_segment_ids needs segment_ids (the queries' document ids) too")
        if (self.q_positions is None) != (self.kv_positions is None):
            raise ValueError("give both q_positions and kv_positions, or neither")

    # ----------------------------------------------------------------------------------------
    @property
    def is_structural(self) -> bool:
        """True when only ``causal``/``window`` are set (no per-token tensors).

        Such a mask is what ``attention(causal=..., window=...)`` expresses, so every backend,
        flash-attn included, can run it without a materialized mask.
        """
        return all(
            t is None
            for t in (
                self.segment_ids,
                self.kv_segment_ids,
                self.block_ids,
                self.q_positions,
                self.kv_positions,
            )
        )

    @property
    def batch_size(self) -> int:
        """Batch size of the per-token tensors (1 when they broadcast over the batch)."""
        sizes = {t.shape[0] for t in self._tensors()}
        sizes.discard(1)
        if len(sizes) > 1:
            raise ValueError(f"mask tensors disagree on the batch size: {sorted(sizes)}")
        return sizes.pop() if sizes else 1

    @property
    def device(self) -> torch.device | None:
        tensors = self._tensors()
        return tensors[0].device if tensors else None

    def _tensors(self) -> list[torch.Tensor]:
        return [
            t
            for t in (
                self.segment_ids,
                self.kv_segment_ids,
                self.block_ids,
                self.q_positions,
                self.kv_positions,
            )
            if t is not None
        ]

    def version_key(self) -> tuple[int, ...]:
        """The in-place version counters of the held tensors (a cache key part)."""
        return tuple(t._version for t in self._tensors())

    def check_lengths(self, q_len: int, kv_len: int) -> None:
        """Raise ``ValueError`` unless the per-token tensors fit ``q_len`` queries, ``kv_len`` keys."""
        q_tensors = {"segment_ids": self.segment_ids, "q_positions": self.q_positions}
        kv_tensors = {
            "kv_segment_ids": self.kv_segment_ids
            if self.kv_segment_ids is not None
            else self.segment_ids,
            "kv_positions": self.kv_positions,
        }
        if self.block_ids is not None:
            if q_len != kv_len:
                raise ValueError(
                    f"block_ids need as many queries as keys (self-attention), got {q_len} and {kv_len}"
                )
            q_tensors["block_ids"] = self.block_ids
        for length, tensors in ((q_len, q_tensors), (kv_len, kv_tensors)):
            for name, t in tensors.items():
                if t is not None and t.shape[-1] != length:
                    raise ValueError(
                        f"mask {name} has {t.shape[-1]} tokens but the attention has {length}; "
                        "build the mask for this sequence length"
                    )

    # ----------------------------------------------------------------------------------------
    def mask_mod(self, q_len: int, kv_len: int) -> MaskMod:
        """The FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` of this mask for these lengths.

        It also evaluates on broadcast index grids, which is how :meth:`to_dense` uses it.
        Indices are clamped into range because FlexAttention may probe the padding of the last
        block (those entries are masked out by the kernel anyway).
        """
        self.check_lengths(q_len, kv_len)
        causal, window = self.causal, self.window
        seg_q = self.segment_ids
        seg_kv = self.kv_segment_ids if self.kv_segment_ids is not None else self.segment_ids
        blocks, q_pos, kv_pos = self.block_ids, self.q_positions, self.kv_positions
        offset = kv_len - q_len  # queries are aligned to the end of the keys

        def mask_mod(b, h, q_idx, kv_idx):
            qi = q_idx.clamp(max=q_len - 1)
            ki = kv_idx.clamp(max=kv_len - 1)
            if q_pos is not None:
                qp, kp = _take(q_pos, b, qi), _take(kv_pos, b, ki)
            else:
                qp, kp = q_idx + offset, kv_idx
            allowed = kv_idx >= 0
            if causal:
                visible = kp <= qp
                if blocks is not None:
                    bq = _take(blocks, b, qi)
                    visible = visible | ((bq == _take(blocks, b, ki)) & (bq >= 0))
                allowed = allowed & visible
            if window is not None:
                left, right = window
                if left >= 0:
                    allowed = allowed & (kp >= qp - left)
                if right >= 0:
                    allowed = allowed & (kp <= qp + right)
            if seg_q is not None:
                allowed = allowed & (_take(seg_q, b, qi) == _take(seg_kv, b, ki))
            return allowed

        return mask_mod

    def to_dense(
        self,
        q_len: int,
        kv_len: int,
        *,
        batch: int | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Boolean ``[B | 1, 1, q_len, kv_len]`` mask, ``True`` where attention is allowed.

        ``B`` is the batch size of the per-token tensors (or ``batch`` if they broadcast); the
        result is an expanded view, broadcast over heads.
        """
        bsz = self.batch_size if batch is None or self.batch_size > 1 else batch
        if device is None:
            device = self.device if self.device is not None else "cpu"
        arange = torch.arange
        b = arange(bsz, device=device).view(-1, 1, 1, 1)
        h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
        q_idx = arange(q_len, device=device).view(1, 1, -1, 1)
        kv_idx = arange(kv_len, device=device).view(1, 1, 1, -1)
        allowed = self.mask_mod(q_len, kv_len)(b, h, q_idx, kv_idx)
        return allowed.expand(bsz, 1, q_len, kv_len)

    def to_block_mask(
        self,
        q_len: int,
        kv_len: int,
        *,
        batch: int | None = None,
        device: torch.device | str | None = None,
        block_size: int | tuple[int, int] = 128,
    ) -> BlockMask:
        """A FlexAttention :class:`BlockMask` of this mask (build it once, reuse it per layer).

        On CUDA the block mask is built with a compiled kernel (``create_block_mask(_compile=True)``)
        so long sequences do not materialize the dense ``Sq x Sk`` mask.
        """
        from torch.nn.attention.flex_attention import create_block_mask

        bsz = self.batch_size
        if device is None:
            device = self.device if self.device is not None else "cpu"
        device = torch.device(device)
        compile_it = device.type == "cuda" and not torch.compiler.is_compiling()
        return create_block_mask(
            self.mask_mod(q_len, kv_len),
            bsz if bsz > 1 else None,
            None,
            q_len,
            kv_len,
            device=device,
            BLOCK_SIZE=block_size,
            _compile=compile_it,
        )


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def causal_mask() -> AttentionMask:
    """Causal (autoregressive) attention, Vaswani et al. 2017: query ``i`` sees keys ``<= i``."""
    return AttentionMask(causal=True)


def sliding_window_mask(left: int, right: int = 0) -> AttentionMask:
    """Local attention to keys in ``[i - left, i + right]`` (flash-attn's ``window_size``).

    ``right=0`` (the default) is the causal sliding window of Mistral 7B (Jiang et al. 2023);
    ``left == right`` is Longformer's symmetric window (Beltagy et al. 2020). ``-1`` leaves a
    side unbounded.
    """
    return AttentionMask(window=(left, right))


def segment_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Document index of each of ``total`` packed tokens; tokens past ``cu_seqlens[-1]`` get ``-1``.

    ``total`` defaults to ``cu_seqlens[-1]`` (which reads it back to the host).
    """
    cu = _check_cu_seqlens("cu_seqlens", cu_seqlens)
    if total is None:
        total = int(cu[-1].item())
    tokens = torch.arange(total, device=cu.device, dtype=cu.dtype)
    doc = torch.searchsorted(cu[1:], tokens, right=True)
    return torch.where(tokens < cu[-1], doc, torch.full_like(doc, -1)).long()


def _check_cu_seqlens(name: str, cu: torch.Tensor) -> torch.Tensor:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2:
        shape = tuple(cu.shape) if isinstance(cu, torch.Tensor) else type(cu).__name__
        raise ValueError(f"{name} must be a 1-D tensor [documents + 1] starting at 0, got {shape}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 (as flash-attn wants) or int64, got {cu.dtype}")
    return cu


def document_mask(
    cu_seqlens: torch.Tensor,
    *,
    cu_seqlens_k: torch.Tensor | None = None,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    total_q: int | None = None,
    total_k: int | None = None,
) -> AttentionMask:
    """Mask of packed documents: attention never crosses a ``cu_seqlens`` boundary.

    ``cu_seqlens`` (``int32 [documents + 1]``, starting at 0) delimits the documents of the packed
    queries, and of the keys too unless ``cu_seqlens_k`` differs. ``causal`` and ``window`` act
    within each document with flash-attn's varlen semantics: when a document has fewer queries
    than keys, its queries are aligned to the end of its keys. Tokens past the last boundary
    attend nothing. ``total_q`` / ``total_k`` (packed lengths) default to the last boundary.
    """
    cu_q = _check_cu_seqlens("cu_seqlens", cu_seqlens)
    cu_k = cu_q if cu_seqlens_k is None else _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k)
    if cu_k.numel() != cu_q.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of documents, got "
            f"{cu_q.numel() - 1} and {cu_k.numel() - 1}"
        )
    seg_q = segment_ids_from_cu_seqlens(cu_q, total_q)
    if cu_k is cu_q and total_k in (None, seg_q.numel()):
        seg_k = seg_q
    else:
        seg_k = segment_ids_from_cu_seqlens(cu_k, total_k)
    if cu_k is cu_q:
        # One set of boundaries: the packed index orders tokens within a document as well as a
        # position would, so no position tensors are needed. Padding tokens get distinct ids.
        seg_k = torch.where(seg_k < 0, seg_k - 1, seg_k)
        return AttentionMask(causal=causal, window=window, segment_ids=seg_q, kv_segment_ids=seg_k)
    # Different query and key lengths per document: positions within each document, queries
    # shifted to the end of their document's keys (flash-attn's bottom-right alignment).
    len_q = (cu_q[1:] - cu_q[:-1]).long()
    len_k = (cu_k[1:] - cu_k[:-1]).long()
    doc_q, doc_k = seg_q.clamp(min=0), seg_k.clamp(min=0)
    q_pos = (
        torch.arange(seg_q.numel(), device=cu_q.device)
        - cu_q.long()[doc_q]
        + (len_k - len_q)[doc_q]
    )
    kv_pos = torch.arange(seg_k.numel(), device=cu_k.device) - cu_k.long()[doc_k]
    return AttentionMask(
        causal=causal,
        window=window,
        segment_ids=seg_q,
        kv_segment_ids=torch.where(seg_k < 0, seg_k - 1, seg_k),
        q_positions=q_pos,
        kv_positions=kv_pos,
    )


def multimodal_mask(
    *,
    block_ids: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
) -> AttentionMask:
    """Causal across tokens, bidirectional within each block, never across documents.

    Args:
        block_ids: ``[S]`` or ``[B, S]``; the tokens of one image, video or action chunk share a
            non-negative id and see each other (and everything causally before the block);
            ``-1`` marks text tokens, which are causal. Ids only need to be distinct within a
            document.
        segment_ids: ``[S]`` or ``[B, S]`` document ids of packed sequences (``None``: one
            document). :func:`segment_ids_from_cu_seqlens` converts ``cu_seqlens``.
        window: optional sliding window on top (see :class:`AttentionMask`).

    For text ``t t``, an image ``i i i`` and text ``t``, ``block_ids = [-1, -1, 0, 0, 0, -1]``:
    the image tokens see the two text tokens and all three image tokens; the last text token
    sees everything.
    """
    return AttentionMask(causal=True, window=window, segment_ids=segment_ids, block_ids=block_ids)


def dense_mask(
    mask: AttentionMask | BlockMask,
    q_len: int,
    kv_len: int,
    *,
    batch: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean ``[B | 1, H | 1, q_len, kv_len]`` mask of an :class:`AttentionMask` or a BlockMask.

    A :class:`~torch.nn.attention.flex_attention.BlockMask` is evaluated as FlexAttention applies
    it: its ``mask_mod`` on every pair, restricted to the blocks it lists. (That is exact for
    block masks from ``create_block_mask``, whose full blocks agree with their ``mask_mod``.)
    """
    if isinstance(mask, AttentionMask):
        return mask.to_dense(q_len, kv_len, batch=batch, device=device)
    from torch.nn.attention.flex_attention import BlockMask, create_mask

    if not isinstance(mask, BlockMask):
        raise TypeError(
            f"block_mask must be a forge AttentionMask or a FlexAttention BlockMask, got "
            f"{type(mask).__name__}"
        )
    bm_q, bm_kv = mask.seq_lengths
    if (bm_q, bm_kv) != (q_len, kv_len):
        raise ValueError(
            f"the BlockMask was built for {bm_q} queries x {bm_kv} keys but the attention has "
            f"{q_len} x {kv_len}; build it with create_block_mask(..., Q_LEN={q_len}, KV_LEN={kv_len})"
        )
    bsz, heads = mask.shape[0], mask.shape[1]
    if device is None:
        device = mask.kv_num_blocks.device
    allowed = create_mask(mask.mask_mod, bsz, heads, q_len, kv_len, device=device)
    q_block, kv_block = mask.BLOCK_SIZE
    blocks = mask.to_dense().bool().to(device)
    blocks = blocks.repeat_interleave(q_block, dim=2)[:, :, :q_len]
    blocks = blocks.repeat_interleave(kv_block, dim=3)[:, :, :, :kv_len]
    return allowed & blocks
