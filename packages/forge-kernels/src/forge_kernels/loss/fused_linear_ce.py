"""Fused linear + cross-entropy loss that never materializes the ``[tokens, vocab]`` logits.

For a language-model head, ``F.cross_entropy(hidden @ weight.T, labels)`` stores logits and
their gradient for every token: at 8192 tokens and a 128k vocabulary that is gigabytes, more
than the rest of the model's activations. Following Liger-Kernel's FusedLinearCrossEntropy
(Hsu et al. 2024, "Liger Kernel: Efficient Triton Kernels for LLM Training", arXiv:2410.10989)
and Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models"
(arXiv:2411.09009), the tokens are processed in chunks. For each chunk:

1. ``logits = hidden_chunk @ weight.T (+ bias)`` in the input dtype (fp32 GEMM accumulation);
2. one kernel computes each row's loss (online logsumexp over vocabulary blocks, label
   smoothing, z-loss) and overwrites the logits buffer with d(loss)/d(logits), already scaled
   for the reduction (see :mod:`forge_kernels.loss.cross_entropy_kernels`);
3. ``grad_hidden_chunk = dlogits @ weight``, ``grad_weight += dlogits.T @ hidden_chunk`` and
   ``grad_bias += dlogits.sum(0)``.

The gradients are therefore computed during the forward pass and stored; peak extra memory is
one chunk of logits plus the gradients themselves. Backward only multiplies the stored
gradients by the (scalar) incoming gradient.

``reduction="none"`` is different: each row's loss can have its own incoming gradient, and a
summed ``grad_weight`` cannot be re-weighted per row after the fact. In that mode the forward
pass computes the loss only (one GEMM per chunk) and backward re-runs the chunk loop, scaling
each row of d(loss)/d(logits) by its own incoming gradient (three GEMMs per chunk): 4 GEMMs in
all instead of 3, still without materializing the full logits.

Semantics match ``torch.nn.functional.cross_entropy`` on fp32 logits: ``ignore_index`` rows have
zero loss and zero gradient and are left out of the mean's denominator; label smoothing is
torch's ``(1 - ε) nll + ε mean_c(-log p_c)``; a mean over a batch in which every row is ignored
is ``nan`` (0/0) with zero gradients, exactly as torch. The optional z-loss adds
``z_loss_weight * lse²`` per non-ignored row (PaLM, Chowdhery et al. 2022, arXiv:2204.02311),
reduced like the loss, so with ``reduction="mean"`` it is ``z * mean(lse²)`` over non-ignored
tokens. The optional soft cap replaces logits by ``cap * tanh(logits / cap)`` before everything
else (Gemma 2, arXiv:2408.00118).

Precision: logits and their gradient are held in the input dtype (as an unfused bf16 model
would hold them); every loss computation is fp32. ``grad_weight`` is accumulated across chunks
in the weight's dtype, like Liger-Kernel (an fp32 accumulator would cost another ``V x H x 4``
bytes): in bf16 each of the ~V/H chunks adds one rounding of the running sum.

Without a usable Triton (CPU without ``TRITON_INTERPRET=1``, other devices) the same chunked
algorithm runs with the per-chunk loss and gradient in plain torch ops, so those users also
keep the memory saving.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from forge_kernels import registry
from forge_kernels._autocast import autocast_inputs
from forge_kernels._triton_support import can_use_triton

__all__ = [
    "FusedLinearCrossEntropyLoss",
    "auto_chunk_size",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
]

Reduction = Literal["mean", "sum", "none"]
_REDUCTIONS = ("mean", "sum", "none")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _LossOptions:
    ignore_index: int
    label_smoothing: float
    z_loss_weight: float
    logit_softcap: float | None
    reduction: str


#: Shortest chunk worth taking when there are enough tokens (see :func:`auto_chunk_size`).
_MIN_CHUNK_TOKENS = 1024


def auto_chunk_size(n_tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Tokens per chunk: Liger's rule, but at least ``min(1024, n_tokens // 4)`` tokens.

    Liger's rule, ``ceil(n_tokens / ceil(vocab_size / hidden_size))``, keeps a ``[chunk, V]``
    logits buffer about as large as ``hidden``. But each chunk adds a rank-``chunk`` update to
    the whole ``[V, H]`` weight gradient (``grad_weight += dlogits.T @ hidden_chunk``), which
    reads and writes all of it: with chunks of 256 tokens that update is memory-bound and the
    loss ran slower than unfused eager (H100, 8192 x 4096 -> 128256, bf16: 64.5 ms vs 50.8 ms;
    1024-token chunks: 44.1 ms, 4096: 40.6 ms, peak memory 2.5 -> 2.7 -> 3.5 GiB against
    eager's 12 GiB). So chunks hold at least 1024 tokens (a contraction long enough to make the
    update compute-bound on current GPUs), yet never more than a quarter of the tokens, so the
    logits are never held whole. Rounded up to a power of two.
    """
    if n_tokens <= 0:
        return 1
    inc_factor = -(-vocab_size // max(hidden_size, 1))
    rows = max(-(-n_tokens // max(inc_factor, 1)), min(_MIN_CHUNK_TOKENS, n_tokens // 4))
    return 1 << (rows - 1).bit_length()


# ---------------------------------------------------------------------------------------------
# Per-chunk loss + in-place logits gradient: Triton kernel or the eager torch equivalent.
# ---------------------------------------------------------------------------------------------


def _loss_and_grad_chunk_torch(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_out: torch.Tensor,
    z_loss_out: torch.Tensor,
    grad_scale: torch.Tensor | None,
    *,
    opts: _LossOptions,
    compute_grad: bool,
) -> None:
    """Eager twin of ``cross_entropy_kernels.cross_entropy_loss_and_grad_`` (same contract).

    Temporaries are fp32 copies of the chunk, so memory stays bounded by the chunk size.
    """
    n_cols = logits.shape[1]
    eps = opts.label_smoothing
    x = logits.float()
    if opts.logit_softcap is not None:
        t = torch.tanh(x / opts.logit_softcap)
        x = t * opts.logit_softcap
    valid = labels != opts.ignore_index
    safe_labels = labels.masked_fill(~valid, 0).long().unsqueeze(1)
    lse = torch.logsumexp(x, dim=1)
    loss = lse - (1.0 - eps) * x.gather(1, safe_labels).squeeze(1)
    if eps:
        loss = loss - (eps / n_cols) * x.sum(dim=1)
    z_term = opts.z_loss_weight * lse * lse
    loss_out.copy_(torch.where(valid, loss + z_term, 0.0))
    z_loss_out.copy_(torch.where(valid, z_term, 0.0))
    if not compute_grad:
        return
    # where(), not a product: a mean over zero valid rows has an infinite scale.
    scale = torch.where(valid, grad_scale.float().expand_as(lse), 0.0)
    grad = (x - lse.unsqueeze(1)).exp_()  # softmax
    grad.mul_((scale * (1.0 + 2.0 * opts.z_loss_weight * lse)).unsqueeze(1))
    if eps:
        grad.sub_((scale * (eps / n_cols)).unsqueeze(1))
    grad.scatter_add_(1, safe_labels, (-(1.0 - eps) * scale).unsqueeze(1))
    if opts.logit_softcap is not None:
        grad.mul_(1.0 - t * t)
    logits.copy_(grad)


def _loss_and_grad_chunk_triton(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_out: torch.Tensor,
    z_loss_out: torch.Tensor,
    grad_scale: torch.Tensor | None,
    *,
    opts: _LossOptions,
    compute_grad: bool,
) -> None:
    from forge_kernels.loss import cross_entropy_kernels  # lazy: imports triton

    cross_entropy_kernels.cross_entropy_loss_and_grad_(
        logits,
        labels,
        loss_out,
        z_loss_out,
        grad_scale,
        ignore_index=opts.ignore_index,
        label_smoothing=opts.label_smoothing,
        z_loss_weight=opts.z_loss_weight,
        logit_softcap=opts.logit_softcap,
        compute_grad=compute_grad,
    )


# ---------------------------------------------------------------------------------------------
# The chunk loop shared by forward (mean/sum), forward (none, loss only) and backward (none).
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class _ChunkResult:
    loss_rows: torch.Tensor  # fp32 [N], z-loss included
    z_loss_rows: torch.Tensor  # fp32 [N]
    grad_hidden: torch.Tensor | None = None
    grad_weight: torch.Tensor | None = None
    grad_bias: torch.Tensor | None = None


def _run_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    opts: _LossOptions,
    chunk_size: int,
    use_triton: bool,
    grad_scale: torch.Tensor | None,
    need_grads: tuple[bool, bool, bool],
) -> _ChunkResult:
    """Loss per row and, where ``need_grads`` (hidden, weight, bias) asks, the gradients.

    ``grad_scale`` (fp32, one element or ``[N]``) scales each row's d(loss)/d(logits); it is
    only read when some gradient is needed.
    """
    n_tokens = hidden.shape[0]
    need_h, need_w, need_b = need_grads
    compute_grad = need_h or need_w or need_b
    chunk_fn = _loss_and_grad_chunk_triton if use_triton else _loss_and_grad_chunk_torch
    f32 = torch.float32
    result = _ChunkResult(
        loss_rows=torch.empty(n_tokens, dtype=f32, device=hidden.device),
        z_loss_rows=torch.empty(n_tokens, dtype=f32, device=hidden.device),
    )
    # Contiguous whatever the inputs' strides, so row slices are valid mm(out=) targets.
    if need_h:
        result.grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    if need_w:
        result.grad_weight = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
    grad_bias_f32 = (
        torch.zeros(weight.shape[0], dtype=f32, device=hidden.device) if need_b else None
    )
    if compute_grad:
        assert grad_scale is not None

    weight_t = weight.t()
    for start in range(0, n_tokens, chunk_size):
        end = min(start + chunk_size, n_tokens)
        hidden_chunk = hidden[start:end]
        if bias is None:
            logits = torch.mm(hidden_chunk, weight_t)
        else:
            logits = torch.addmm(bias, hidden_chunk, weight_t)
        scale_chunk = None
        if compute_grad:
            scale_chunk = grad_scale if grad_scale.numel() == 1 else grad_scale[start:end]
        chunk_fn(
            logits,
            labels[start:end],
            result.loss_rows[start:end],
            result.z_loss_rows[start:end],
            scale_chunk,
            opts=opts,
            compute_grad=compute_grad,
        )
        if not compute_grad:
            continue
        grad_logits = logits  # overwritten in place by chunk_fn
        if need_h:
            torch.mm(grad_logits, weight, out=result.grad_hidden[start:end])
        if need_w:
            result.grad_weight.addmm_(grad_logits.t(), hidden_chunk)
        if need_b:
            grad_bias_f32 += grad_logits.sum(dim=0, dtype=f32)
        del logits, grad_logits
    if need_b:
        result.grad_bias = grad_bias_f32.to(bias.dtype)
    return result


def _reduce(rows: torch.Tensor, n_valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    return total / n_valid if reduction == "mean" else total


class _FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper: gradients computed in forward (mean/sum) or recomputed (none)."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        opts: _LossOptions,
        chunk_size: int,
        use_triton: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        need_grads = tuple(ctx.needs_input_grad[:3])
        valid = labels != opts.ignore_index
        n_valid = valid.sum().to(torch.float32)  # a tensor: no device sync
        ctx.opts, ctx.chunk_size, ctx.use_triton = opts, chunk_size, use_triton
        ctx.need_grads = need_grads
        ctx.consumed = False
        if opts.reduction == "none":
            result = _run_chunks(
                hidden,
                weight,
                bias,
                labels,
                opts=opts,
                chunk_size=chunk_size,
                use_triton=use_triton,
                grad_scale=None,
                need_grads=(False, False, False),
            )
            ctx.save_for_backward(hidden, weight, bias, labels)
            ctx.stored_grads = None
        else:
            if opts.reduction == "mean":
                grad_scale = (1.0 / n_valid).reshape(1)  # inf when all ignored: never applied
            else:
                grad_scale = torch.ones(1, dtype=torch.float32, device=hidden.device)
            result = _run_chunks(
                hidden,
                weight,
                bias,
                labels,
                opts=opts,
                chunk_size=chunk_size,
                use_triton=use_triton,
                grad_scale=grad_scale,
                need_grads=need_grads,
            )
            ctx.stored_grads = (result.grad_hidden, result.grad_weight, result.grad_bias)
        loss = _reduce(result.loss_rows, n_valid, opts.reduction)
        z_loss = _reduce(result.z_loss_rows, n_valid, opts.reduction)
        ctx.mark_non_differentiable(z_loss)
        return loss, z_loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor, grad_z_loss: torch.Tensor):
        del grad_z_loss  # z_loss is returned for logging only (non-differentiable)
        if ctx.consumed:
            raise RuntimeError(
                "fused_linear_cross_entropy: backward ran twice through the same forward. Its "
                "gradients are computed in forward and scaled in place; run the forward again "
                "instead of backward(retain_graph=True)."
            )
        ctx.consumed = True
        opts = ctx.opts
        if opts.reduction == "none":
            hidden, weight, bias, labels = ctx.saved_tensors
            result = _run_chunks(
                hidden,
                weight,
                bias,
                labels,
                opts=opts,
                chunk_size=ctx.chunk_size,
                use_triton=ctx.use_triton,
                grad_scale=grad_loss.to(torch.float32).contiguous(),
                need_grads=ctx.need_grads,
            )
            grads = (result.grad_hidden, result.grad_weight, result.grad_bias)
        else:
            grads = ctx.stored_grads
            ctx.stored_grads = None
            scale = grad_loss.to(torch.float32)
            # In place: no second copy of grad_weight (V x H) at the peak.
            grads = tuple(g.mul_(scale) if g is not None else None for g in grads)
        return *grads, None, None, None, None


def _validate(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    label_smoothing: float,
    reduction: str,
    logit_softcap: float | None,
    chunk_size: int | None,
) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be [vocab, hidden], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dim ({tuple(hidden.shape)}) must equal weight's hidden size "
            f"{weight.shape[1]}: pass hidden [N, H] and weight [V, H] (nn.Linear layout)"
        )
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must match hidden's leading dims "
            f"{tuple(hidden.shape[:-1])}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of class indices, got {labels.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [vocab]={weight.shape[0]}, got {tuple(bias.shape)}")
    dtypes = {hidden.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) != 1:
        raise ValueError(
            f"hidden, weight and bias must share a dtype, got {sorted(map(str, dtypes))}: cast "
            "them (or run under torch.autocast, which casts them for you)"
        )
    devices = {hidden.device, weight.device, labels.device}
    if bias is not None:
        devices.add(bias.device)
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if logit_softcap is not None and not logit_softcap > 0:
        raise ValueError(f"logit_softcap must be positive (or None), got {logit_softcap}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (or None for auto), got {chunk_size}")


def _check_labels_on_cpu(labels: torch.Tensor, ignore_index: int, vocab_size: int) -> None:
    # Free on CPU; on an accelerator it would cost a device sync, so there it is not checked.
    if labels.device.type != "cpu" or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        raise ValueError(
            f"labels must be in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
            f"found {labels[bad][:5].tolist()}"
        )


def _fused_linear_cross_entropy_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss_weight: float = 0.0,
    reduction: Reduction = "mean",
    logit_softcap: float | None = None,
    chunk_size: int | None = None,
    return_z_loss: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Default implementation: the chunked algorithm, with Triton when it can run."""
    _validate(hidden, weight, labels, bias, label_smoothing, reduction, logit_softcap, chunk_size)
    device_type = hidden.device.type
    # What F.linear would do under autocast; the cast stays visible to autograd.
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    labels_shape = labels.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if not labels.is_contiguous():
        labels = labels.contiguous()
    n_tokens, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    _check_labels_on_cpu(labels, ignore_index, vocab_size)
    if chunk_size is None:
        chunk_size = auto_chunk_size(n_tokens, hidden_size, vocab_size)
    opts = _LossOptions(
        ignore_index=int(ignore_index),
        label_smoothing=float(label_smoothing),
        z_loss_weight=float(z_loss_weight),
        logit_softcap=None if logit_softcap is None else float(logit_softcap),
        reduction=reduction,
    )
    tensors = (hidden, weight, labels) + ((bias,) if bias is not None else ())
    use_triton = can_use_triton(*tensors)

    with torch.autocast(device_type, enabled=False):
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, weight, bias)
        )
        if needs_grad:
            loss, z_loss = _FusedLinearCrossEntropyFunction.apply(
                hidden, weight, bias, labels, opts, chunk_size, use_triton
            )
        else:  # inference / evaluation: loss only, no gradient GEMMs
            result = _run_chunks(
                hidden,
                weight,
                bias,
                labels,
                opts=opts,
                chunk_size=chunk_size,
                use_triton=use_triton,
                grad_scale=None,
                need_grads=(False, False, False),
            )
            n_valid = (labels != opts.ignore_index).sum().to(torch.float32)
            loss = _reduce(result.loss_rows, n_valid, reduction)
            z_loss = _reduce(result.z_loss_rows, n_valid, reduction)
    if reduction == "none":
        loss, z_loss = loss.reshape(labels_shape), z_loss.reshape(labels_shape)
    return (loss, z_loss) if return_z_loss else loss


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss_weight: float = 0.0,
    reduction: Reduction = "mean",
    logit_softcap: float | None = None,
    chunk_size: int | None = None,
    return_z_loss: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Eager reference defining the numerics: ``F.cross_entropy`` on materialized fp32 logits.

    ``chunk_size`` is accepted for signature compatibility and ignored.
    """
    del chunk_size
    _validate(hidden, weight, labels, bias, label_smoothing, reduction, logit_softcap, None)
    logits = F.linear(hidden, weight, bias).float()
    logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1).long()  # int32 labels, as the default accepts them
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    loss = F.cross_entropy(
        logits,
        flat_labels,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    valid = flat_labels != ignore_index
    z_rows = torch.where(valid, z_loss_weight * torch.logsumexp(logits, dim=-1).square(), 0.0)
    z_loss = _reduce(z_rows, valid.sum().to(torch.float32), reduction)
    if z_loss_weight:
        loss = loss + z_loss
    if reduction == "none":
        loss, z_loss = loss.reshape(labels.shape), z_loss.reshape(labels.shape)
    return (loss, z_loss.detach()) if return_z_loss else loss


registry.define_op(
    "fused_linear_cross_entropy",
    default=_fused_linear_cross_entropy_chunked,
    reference=fused_linear_cross_entropy_reference,
    doc="Linear layer + cross-entropy without materializing [tokens, vocab] logits.",
)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss_weight: float = 0.0,
    reduction: Reduction = "mean",
    logit_softcap: float | None = None,
    chunk_size: int | None = None,
    return_z_loss: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``F.cross_entropy(F.linear(hidden, weight, bias), labels)`` without the full logits.

    Chunked as in Liger-Kernel (arXiv:2410.10989) and Wijmans et al. 2024, "Cut Your Losses in
    Large-Vocabulary Language Models" (arXiv:2411.09009); see this module's docstring.

    Args:
        hidden: ``[N, H]`` (or ``[..., H]``) final hidden states, fp32/fp16/bf16.
        weight: ``[V, H]`` output embedding (``nn.Linear`` layout), same dtype as ``hidden``.
        labels: ``[N]`` (or ``[...]``) class indices; ``ignore_index`` marks rows to skip.
        bias: optional ``[V]`` output bias.
        ignore_index: label value whose rows have no loss, no gradient, and do not count in
            the mean's denominator (torch semantics: an all-ignored mean is ``nan``).
        label_smoothing: torch's definition, ``(1 - ε) nll + ε mean_c(-log p_c)``.
        z_loss_weight: adds ``z_loss_weight * logsumexp²`` per non-ignored row (PaLM,
            arXiv:2204.02311), reduced like the loss (a mean over non-ignored tokens for
            ``"mean"``).
        reduction: ``"mean"`` (over non-ignored rows), ``"sum"`` or ``"none"`` (per row, shaped
            like ``labels``, zero for ignored rows).
        logit_softcap: if set, logits become ``cap * tanh(logits / cap)`` (Gemma 2,
            arXiv:2408.00118).
        chunk_size: tokens per chunk; ``None`` picks :func:`auto_chunk_size` (a chunk of
            logits about the size of ``hidden``).
        return_z_loss: also return the z-loss term (reduced like the loss, included in the
            loss already, detached: for logging).

    Returns:
        The fp32 loss, or ``(loss, z_loss)`` with ``return_z_loss``.

    Dispatches through ``registry.get_op("fused_linear_cross_entropy")``, so a plugin can
    override it.
    """
    return registry.get_op("fused_linear_cross_entropy")(
        hidden,
        weight,
        labels,
        bias=bias,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss_weight=z_loss_weight,
        reduction=reduction,
        logit_softcap=logit_softcap,
        chunk_size=chunk_size,
        return_z_loss=return_z_loss,
    )


class FusedLinearCrossEntropyLoss(torch.nn.Module):
    """Module form of :func:`fused_linear_cross_entropy`; ``forward(hidden, weight, labels, bias)``."""

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        z_loss_weight: float = 0.0,
        reduction: Reduction = "mean",
        logit_softcap: float | None = None,
        chunk_size: int | None = None,
        return_z_loss: bool = False,
    ) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss_weight = z_loss_weight
        self.reduction = reduction
        self.logit_softcap = logit_softcap
        self.chunk_size = chunk_size
        self.return_z_loss = return_z_loss

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return fused_linear_cross_entropy(
            hidden,
            weight,
            labels,
            bias=bias,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            z_loss_weight=self.z_loss_weight,
            reduction=self.reduction,
            logit_softcap=self.logit_softcap,
            chunk_size=self.chunk_size,
            return_z_loss=self.return_z_loss,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
            f"z_loss_weight={self.z_loss_weight}, reduction={self.reduction!r}, "
            f"logit_softcap={self.logit_softcap}, chunk_size={self.chunk_size}"
        )
