"""Triton kernel: cross-entropy loss and its logits gradient for one chunk of rows, in place.

One program handles one row of a ``[rows, V]`` logits buffer. Pass 1 streams over the vocabulary
in blocks of ``BLOCK_V`` and keeps an online max and sum of exponentials (Milakov & Gimelshein
2018, "Online normalizer calculation for softmax", arXiv:1805.02867), so a row of any width is
read once to get its logsumexp. Pass 2 (when gradients are wanted) re-reads the row and
overwrites it with d(loss)/d(logits). This is the per-chunk half of the fused linear
cross-entropy of Liger-Kernel (Hsu et al. 2024, arXiv:2410.10989) and of Wijmans et al. 2024,
"Cut Your Losses in Large-Vocabulary Language Models" (arXiv:2411.09009).

Per non-ignored row, with ``x`` the (optionally soft-capped) logits, ``y`` the label, ``C`` the
vocabulary size, ``ε`` the label smoothing and ``z`` the z-loss weight::

    lse  = logsumexp(x)
    loss = lse - (1 - ε) x_y - (ε / C) Σ_c x_c + z lse²          (torch's label smoothing)
    dx_c = s [ softmax(x)_c (1 + 2 z lse) - ε / C - (1 - ε) [c = y] ]

where ``s`` is the row's gradient scale (``1 / n_valid`` for a mean, ``1`` for a sum, the
incoming per-row gradient for ``reduction="none"``). With a soft cap ``x = cap tanh(l / cap)``
(Gemma 2, arXiv:2408.00118) the gradient is chained through ``1 - (x / cap)²``. Rows whose label
is ``ignore_index`` get zero loss and a zero gradient row.

Every load is converted to fp32 immediately: the loss math runs in fp32 whatever the logits
dtype (and the Triton CPU interpreter computes bf16 arithmetic wrongly otherwise).

This module imports Triton at the top: import it lazily, only once :func:`can_use_triton` said
yes (see ``forge_kernels._triton_support``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["cross_entropy_loss_and_grad_"]

#: Widest vocabulary block one program holds in registers (Liger-Kernel uses the same bound).
MAX_BLOCK_V = 32768


@triton.jit
def _tanh(x):
    # tanh(x) = 2 sigmoid(2x) - 1; core Triton has no tanh that also runs in the interpreter.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _cross_entropy_loss_and_grad_kernel(
    logits_ptr,
    logits_row_stride,
    labels_ptr,
    loss_ptr,
    z_loss_ptr,
    scale_ptr,
    scale_stride,
    n_cols,
    ignore_index,
    label_smoothing,
    z_loss_weight,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    label = tl.load(labels_ptr + row)
    offs = tl.arange(0, BLOCK_V)

    if label == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        tl.store(z_loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            zeros = tl.zeros([BLOCK_V], dtype=logits_ptr.dtype.element_ty)
            for start in range(0, n_cols, BLOCK_V):
                cols = start + offs
                tl.store(row_ptr + cols, zeros, mask=cols < n_cols)
    else:
        # Pass 1: online max / sum of exponentials, and the plain sum for label smoothing.
        m = float("-inf")
        d = 0.0
        x_sum = 0.0
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offs
            mask = cols < n_cols
            x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                x = softcap * _tanh(x / softcap)
            x = tl.where(mask, x, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            x_sum += tl.sum(tl.where(mask, x, 0.0), axis=0)
            m = m_new
        lse = m + tl.log(d)

        # The target logit, read before pass 2 overwrites the row. Labels outside [0, V) other
        # than ignore_index are not checked on the GPU (no device sync): the masked load keeps
        # the access in bounds and the loss is then meaningless, as in Liger-Kernel.
        in_range = (label >= 0) & (label < n_cols)
        x_y = tl.load(row_ptr + label, mask=in_range, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x_y = softcap * _tanh(x_y / softcap)

        z_term = z_loss_weight * lse * lse
        loss = lse - (1.0 - label_smoothing) * x_y - (label_smoothing / n_cols) * x_sum + z_term
        tl.store(loss_ptr + row, loss)
        tl.store(z_loss_ptr + row, z_term)

        if COMPUTE_GRAD:
            # Pass 2: overwrite the row with d(loss)/d(logits), scaled for the reduction.
            scale = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
            p_coef = scale * (1.0 + 2.0 * z_loss_weight * lse)
            smooth = scale * label_smoothing / n_cols
            target_coef = scale * (1.0 - label_smoothing)
            for start in range(0, n_cols, BLOCK_V):
                cols = start + offs
                mask = cols < n_cols
                x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    t = _tanh(x / softcap)
                    x = softcap * t
                g = tl.exp(x - lse) * p_coef - smooth
                g = tl.where(cols == label, g - target_coef, g)
                if HAS_SOFTCAP:
                    g = g * (1.0 - t * t)
                tl.store(row_ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


def cross_entropy_loss_and_grad_(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_out: torch.Tensor,
    z_loss_out: torch.Tensor,
    grad_scale: torch.Tensor | None,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss_weight: float,
    logit_softcap: float | None,
    compute_grad: bool,
    block_v: int | None = None,
) -> None:
    """Per-row loss of ``logits [rows, V]`` into ``loss_out``/``z_loss_out`` (fp32 ``[rows]``).

    If ``compute_grad``, ``logits`` is overwritten with d(loss)/d(logits) in its own dtype,
    each row scaled by ``grad_scale`` (fp32, one element for all rows, or ``[rows]``; may be
    ``None`` without ``compute_grad``).
    ``loss_out`` includes the z-loss term, ``z_loss_out`` holds that term alone.
    ``block_v`` overrides the vocabulary block width (a power of two; tests use a small one to
    exercise the online logsumexp across several blocks).
    """
    n_rows, n_cols = logits.shape
    assert logits.stride(1) == 1, "logits rows must be contiguous"
    if grad_scale is None:
        assert not compute_grad, "compute_grad needs a grad_scale"
        grad_scale = loss_out[:1]  # never read; any fp32 pointer will do
    assert grad_scale.dtype == torch.float32
    assert grad_scale.numel() in (1, n_rows)
    if n_rows == 0:
        return
    if block_v is None:
        block_v = min(triton.next_power_of_2(n_cols), MAX_BLOCK_V)
    if block_v >= 8192:
        num_warps = 32
    elif block_v >= 2048:
        num_warps = 16
    else:
        num_warps = 4
    _cross_entropy_loss_and_grad_kernel[(n_rows,)](
        logits,
        logits.stride(0),
        labels,
        loss_out,
        z_loss_out,
        grad_scale,
        0 if grad_scale.numel() == 1 else grad_scale.stride(0),
        n_cols,
        ignore_index,
        float(label_smoothing),
        float(z_loss_weight),
        float(logit_softcap) if logit_softcap is not None else 1.0,
        HAS_SOFTCAP=logit_softcap is not None,
        COMPUTE_GRAD=compute_grad,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
