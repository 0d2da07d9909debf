"""Attention backends behind one small protocol, chosen by name.

A backend is a module (``<name>_backend.py``, or ``eager.py``) with two functions:

* ``unsupported_reason(problem) -> str | None``: why it cannot run this call (``None``: it can);
* ``run(problem) -> (out, lse | None)``: the attention, in the caller's layout.

and optionally ``require()``, which raises ``ImportError`` naming the extra to install when a
package it needs is missing. :class:`AttentionProblem` is the validated call every backend sees.
The modules are small and import nothing optional at import time (flash-attn and FlexAttention
are imported when a call uses them), so the dispatcher imports all four up front, which keeps
``torch.compile`` free of import statements when it traces a call. Built-ins: ``flash_attn``
(FlashAttention 2, Dao et al. 2022/2023), ``sdpa`` (PyTorch ``scaled_dot_product_attention``),
``flex`` (FlexAttention, Dong et al. 2024) and ``eager`` (the reference in plain PyTorch).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch

from forge_kernels.attention.masks import AttentionMask, document_mask, normalize_window

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

__all__ = ["BACKENDS", "AttentionProblem"]

#: The built-in backends, in the order the docs list them (modules of the same names here).
BACKENDS: tuple[str, ...] = ("flash_attn", "sdpa", "flex", "eager")


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class AttentionProblem:
    """One validated attention call: tensors, layout and masking, as every backend sees it.

    ``q``/``k``/``v`` are as given: ``[B, S, H, D]`` (BSHD), or packed ``[T, H, D]``
    (``packed=True``), in which case backends that need a batch treat it as a batch of one.
    ``mask`` is the user's arbitrary mask (a forge :class:`AttentionMask` with per-token
    tensors, or a FlexAttention ``BlockMask``); ``causal``, ``window`` and ``cu_seqlens_*``
    hold the structured part that flash-attn takes natively.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    packed: bool
    causal: bool
    window: tuple[int, int] | None
    scale: float
    cu_seqlens_q: torch.Tensor | None
    cu_seqlens_k: torch.Tensor | None
    max_seqlen_q: int | None
    max_seqlen_k: int | None
    mask: AttentionMask | BlockMask | None
    dropout_p: float
    return_lse: bool

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_args(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool = False,
        softmax_scale: float | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cu_seqlens_q: torch.Tensor | None = None,
        cu_seqlens_k: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        max_seqlen_q: int | None = None,
        max_seqlen_k: int | None = None,
        window: tuple[int, int] | None = None,
        block_mask: AttentionMask | BlockMask | None = None,
        dropout_p: float = 0.0,
        return_lse: bool = False,
    ) -> AttentionProblem:
        """Validate the public arguments of ``attention`` (``ValueError`` with a fix on misuse)."""
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if not (q.dtype == k.dtype == v.dtype):
            raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        if not q.dtype.is_floating_point:
            raise ValueError(f"attention needs floating-point q, k, v, got {q.dtype}")
        if not (q.device == k.device == v.device):
            raise ValueError(
                f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}"
            )
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")

        # Packed documents: one cu_seqlens for both, or a pair.
        if cu_seqlens is not None and (cu_seqlens_q is not None or cu_seqlens_k is not None):
            raise ValueError("pass either cu_seqlens, or cu_seqlens_q and cu_seqlens_k, not both")
        if (cu_seqlens_q is None) != (cu_seqlens_k is None):
            raise ValueError("cu_seqlens_q and cu_seqlens_k go together (or pass cu_seqlens)")
        if cu_seqlens is not None:
            cu_seqlens_q = cu_seqlens_k = cu_seqlens
        varlen = cu_seqlens_q is not None
        if max_seqlen is not None:
            max_seqlen_q = max_seqlen if max_seqlen_q is None else max_seqlen_q
            max_seqlen_k = max_seqlen if max_seqlen_k is None else max_seqlen_k

        window = normalize_window(window)
        if window is not None and causal:
            window = normalize_window((window[0], -1))  # causal already bounds the right side

        packed = q.dim() == 3
        if packed:
            if not varlen and block_mask is None:
                raise ValueError(
                    f"q of shape {tuple(q.shape)} is packed [tokens, heads, head_dim]: pass "
                    "cu_seqlens (document boundaries) or a block_mask; for one unpacked sequence "
                    "use q[None] ([batch, seq, heads, head_dim])"
                )
        elif q.dim() != 4:
            raise ValueError(
                f"q must be [batch, seq, heads, head_dim] or packed [tokens, heads, head_dim], "
                f"got shape {tuple(q.shape)}"
            )
        elif varlen:
            raise ValueError(
                f"cu_seqlens describes packed q/k/v [tokens, heads, head_dim], got q of shape "
                f"{tuple(q.shape)}; flatten the batch (q.flatten(0, 1)) or drop cu_seqlens"
            )
        if k.dim() != q.dim() or v.dim() != q.dim():
            raise ValueError(
                f"q, k, v must have the same rank, got {q.dim()}, {k.dim()}, {v.dim()}"
            )
        if k.shape != v.shape[:-1] + k.shape[-1:]:
            raise ValueError(
                f"k and v must agree on all but the head dim, got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        if not packed and k.shape[0] != q.shape[0]:
            raise ValueError(f"q and k batch sizes differ: {q.shape[0]} vs {k.shape[0]}")
        if q.shape[-1] != k.shape[-1]:
            raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
        heads_q, heads_kv = q.shape[-2], k.shape[-2]
        if heads_kv == 0 or heads_q % heads_kv:
            raise ValueError(
                f"grouped-query attention needs heads_q divisible by heads_kv, got {heads_q} and "
                f"{heads_kv}"
            )
        if varlen and cu_seqlens_q is cu_seqlens_k and q.shape[0] != k.shape[0]:
            raise ValueError(
                f"one cu_seqlens needs as many query as key tokens, got {q.shape[0]} and "
                f"{k.shape[0]}; pass cu_seqlens_q and cu_seqlens_k"
            )

        if block_mask is not None:
            block_mask = cls._check_mask(block_mask, causal, window, cu_seqlens_q, cu_seqlens_k)
            if (
                isinstance(block_mask, AttentionMask)
                and block_mask.is_structural
                and (varlen or not packed)
            ):
                # Only causal/window: the structured path, which flash-attn runs too.
                causal, window, block_mask = block_mask.causal, block_mask.window, None
            elif isinstance(block_mask, AttentionMask) and varlen:
                # Documents from cu_seqlens become the mask's segment ids.
                documents = document_mask(cu_seqlens_q, total_q=q.shape[0])
                block_mask = dataclasses.replace(
                    block_mask,
                    segment_ids=documents.segment_ids,
                    kv_segment_ids=documents.kv_segment_ids,
                )
                cu_seqlens_q = cu_seqlens_k = None
            if isinstance(block_mask, AttentionMask):
                q_len = q.shape[0] if packed else q.shape[1]
                kv_len = k.shape[0] if packed else k.shape[1]
                block_mask.check_lengths(q_len, kv_len)
                if not packed and block_mask.batch_size not in (1, q.shape[0]):
                    raise ValueError(
                        f"the mask's per-token tensors have batch {block_mask.batch_size} but q "
                        f"has batch {q.shape[0]}"
                    )

        scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
        return cls(
            q=q,
            k=k,
            v=v,
            packed=packed,
            causal=bool(causal),
            window=window,
            scale=scale,
            cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k,
            mask=block_mask,
            dropout_p=float(dropout_p),
            return_lse=bool(return_lse),
        )

    @staticmethod
    def _check_mask(mask, causal, window, cu_seqlens_q, cu_seqlens_k):
        from torch.nn.attention.flex_attention import BlockMask

        if not isinstance(mask, AttentionMask | BlockMask):
            raise TypeError(
                f"block_mask must be a forge AttentionMask (forge_kernels.attention.masks) or a "
                f"FlexAttention BlockMask, got {type(mask).__name__}"
            )
        if causal or window is not None:
            raise ValueError(
                "block_mask already says which keys each query sees: put causal/window into the "
                "mask (e.g. AttentionMask(causal=True, window=...)) instead of passing them too"
            )
        if cu_seqlens_q is not None and isinstance(mask, BlockMask):
            raise ValueError(
                "a FlexAttention BlockMask cannot be combined with cu_seqlens: build the document "
                "boundaries into its mask_mod (see forge_kernels.attention.masks.document_mask)"
            )
        if cu_seqlens_q is not None and cu_seqlens_q is not cu_seqlens_k:
            raise ValueError(
                "a block_mask combines with one cu_seqlens (self-attention), not a "
                "cu_seqlens_q/cu_seqlens_k pair"
            )
        if (
            cu_seqlens_q is not None
            and isinstance(mask, AttentionMask)
            and (mask.segment_ids is not None or mask.q_positions is not None)
        ):
            raise ValueError(
                "the mask already has segment ids: pass the documents either as cu_seqlens or "
                "in the mask, not both"
            )
        return mask

    # ----------------------------------------------------------------------------------------
    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def heads_q(self) -> int:
        return self.q.shape[-2]

    @property
    def heads_kv(self) -> int:
        return self.k.shape[-2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    @property
    def q_len(self) -> int:
        return self.q.shape[-3]

    @property
    def kv_len(self) -> int:
        return self.k.shape[-3]

    @property
    def batch(self) -> int:
        return 1 if self.packed else self.q.shape[0]

    @property
    def device(self) -> torch.device:
        return self.q.device

    def needs_grad(self) -> bool:
        """True if autograd will record this call (some input requires grad)."""
        return torch.is_grad_enabled() and any(t.requires_grad for t in (self.q, self.k, self.v))

    def bshd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as ``[B, S, H, D]`` (packed tensors as a batch of one)."""
        if self.packed:
            return self.q[None], self.k[None], self.v[None]
        return self.q, self.k, self.v

    def effective_mask(self) -> AttentionMask | BlockMask | None:
        """The whole mask of this call (documents, causal, window, arbitrary), or ``None``."""
        if self.mask is not None:
            return self.mask
        if self.varlen:
            return document_mask(
                self.cu_seqlens_q,
                cu_seqlens_k=self.cu_seqlens_k,
                causal=self.causal,
                window=self.window,
                total_q=self.q.shape[0],
                total_k=self.k.shape[0],
            )
        if self.causal or self.window is not None:
            return AttentionMask(causal=self.causal, window=self.window)
        return None

    def finish(
        self, out_BSHD: torch.Tensor, lse_BHS: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Back to the caller's layout: packed output ``[T, H, D]`` and lse ``[H, T]``."""
        if self.packed:
            out_BSHD = out_BSHD[0]
            lse_BHS = None if lse_BHS is None else lse_BHS[0]
        return out_BSHD, lse_BHS
