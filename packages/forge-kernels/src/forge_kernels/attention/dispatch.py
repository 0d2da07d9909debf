"""``attention``: one entry point for scaled dot-product attention, dispatched to the best backend.

The call is validated once into an :class:`~forge_kernels.attention.backends.AttentionProblem`;
then ``backend="auto"`` (the default) takes the first backend that can run it:

* on CUDA: ``flash_attn`` (flash-attn installed, fp16/bf16, head dim <= 256, no arbitrary block
  mask), then ``sdpa`` when SDPA needs no materialized mask (full attention, or causal with
  ``Sq == Sk``), then ``flex`` (compiled FlexAttention: block-sparse for packed documents,
  windows and block masks), then ``sdpa`` with a dense mask, then ``eager``;
* elsewhere (CPU, where FlexAttention has no backward): ``sdpa`` (a dense mask for anything
  beyond plain causal), then ``eager`` (for ``return_lse=True``, which SDPA cannot return).

A named backend runs or raises: ``ImportError`` naming the extra if its package is missing,
``ValueError`` saying why it cannot run this call. Which backend ran is observable:
:func:`last_attention_backend`, :func:`record_attention_backends` and a debug log line on the
``forge_kernels.attention.dispatch`` logger (all skipped while ``torch.compile`` traces). A call
served without this dispatch, by the reference (``FORGE_KERNELS_IMPL=reference``) or by a plugin
override that does not call it, is recorded under ``"reference"`` or the override's source.

The op is registered as ``"attention"`` in :mod:`forge_kernels.registry` with
:func:`~forge_kernels.attention.backends.eager.attention_reference` as its reference, and
:func:`attention` calls ``registry.get_op("attention")`` every time, so a plugin can replace it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from forge_kernels import registry
from forge_kernels._autocast import autocast_inputs
from forge_kernels.attention.backends import (
    BACKENDS,
    AttentionProblem,
    eager,
    flash_attn_backend,
    flex_backend,
    sdpa_backend,
)
from forge_kernels.attention.backends.eager import attention_reference
from forge_kernels.attention.masks import AttentionMask

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

__all__ = [
    "AttentionBackendLog",
    "BackendChoice",
    "attention",
    "choose_backend",
    "last_attention_backend",
    "record_attention_backends",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Recording which backend ran
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BackendChoice:
    """One dispatch decision: the backend that ran, what was asked, and why others were skipped."""

    backend: str
    requested: str
    skipped: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        text = f"attention backend {self.backend!r} (requested {self.requested!r})"
        if self.skipped:
            text += "; skipped " + "; ".join(f"{name}: {why}" for name, why in self.skipped)
        return text


class AttentionBackendLog(list):
    """The :class:`BackendChoice` of every ``attention`` call inside :func:`record_attention_backends`."""

    @property
    def backends(self) -> list[str]:
        """The backend names, in call order."""
        return [choice.backend for choice in self]


_last_choice: BackendChoice | None = None
_records = 0  # calls recorded so far: tells attention() whether the implementation recorded one
_active_logs: list[AttentionBackendLog] = []


def last_attention_backend() -> BackendChoice | None:
    """The decision of the most recent eager ``attention`` call (``None`` before any)."""
    return _last_choice


@contextlib.contextmanager
def record_attention_backends() -> Iterator[AttentionBackendLog]:
    """Collect the backends chosen by ``attention`` calls inside the block::

        with record_attention_backends() as log:
            model(batch)
        assert set(log.backends) == {"flash_attn"}

    Calls traced by ``torch.compile`` are not recorded (the decision is made at trace time).
    """
    log = AttentionBackendLog()
    _active_logs.append(log)
    try:
        yield log
    finally:
        _active_logs.remove(log)


def _record(choice: BackendChoice) -> None:
    global _last_choice, _records
    if torch.compiler.is_compiling():
        return
    _last_choice = choice
    _records += 1
    for log in _active_logs:
        log.append(choice)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("%s", choice)


# --------------------------------------------------------------------------------------------
# Choosing a backend
# --------------------------------------------------------------------------------------------

#: Backend name -> module implementing the protocol of :mod:`forge_kernels.attention.backends`.
_MODULES: dict[str, ModuleType] = {
    "flash_attn": flash_attn_backend,
    "sdpa": sdpa_backend,
    "flex": flex_backend,
    "eager": eager,
}
assert tuple(_MODULES) == BACKENDS

#: Backends whose package failed to import during an auto dispatch, with the error (not retried).
_broken: dict[str, str] = {}


def _sdpa_needs_no_mask(problem: AttentionProblem) -> bool:
    """SDPA runs this with its fused kernels: no mask, or ``is_causal`` with ``Sq == Sk``."""
    return (
        problem.mask is None
        and not problem.varlen
        and problem.window is None
        and (not problem.causal or problem.q_len == problem.kv_len)
    )


def _auto_order(problem: AttentionProblem) -> tuple[str, ...]:
    if problem.device.type == "cuda":
        if _sdpa_needs_no_mask(problem):
            return ("flash_attn", "sdpa", "flex", "eager")
        return ("flash_attn", "flex", "sdpa", "eager")
    return ("sdpa", "eager")


def choose_backend(
    problem: AttentionProblem, backend: str | None = None
) -> tuple[str, ModuleType, tuple[tuple[str, str], ...]]:
    """``(name, module, skipped)`` of the backend that runs ``problem``; see the module docstring."""
    requested = "auto" if backend is None else backend
    if requested == "auto":
        skipped: list[tuple[str, str]] = []
        for name in _auto_order(problem):
            if name in _broken:
                skipped.append((name, _broken[name]))
                continue
            module = _MODULES[name]
            reason = module.unsupported_reason(problem)
            if reason is None and hasattr(module, "require"):
                try:
                    module.require()
                except ImportError as exc:
                    reason = _broken[name] = f"import failed: {exc}"
            if reason is None:
                return name, module, tuple(skipped)
            skipped.append((name, reason))
        raise AssertionError(f"no attention backend ran this call: {skipped}")  # eager runs all

    if requested not in BACKENDS:
        raise ValueError(
            f"unknown attention backend {requested!r}; choose one of: "
            + ", ".join(["auto", *BACKENDS])
        )
    module = _MODULES[requested]
    if hasattr(module, "require"):
        module.require()  # ImportError naming the extra
    reason = module.unsupported_reason(problem)
    if reason is not None:
        raise ValueError(f"backend={requested!r} cannot run this attention call: {reason}")
    return requested, module, ()


# --------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------


def _attention_default(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str | None = None,
    **kwargs,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    problem = AttentionProblem.from_args(q, k, v, **kwargs)
    name, module, skipped = choose_backend(problem, backend)
    out, lse = module.run(problem)
    _record(BackendChoice(backend=name, requested=backend or "auto", skipped=skipped))
    return (out, lse) if problem.return_lse else out


registry.define_op(
    "attention",
    default=_attention_default,
    reference=attention_reference,
    doc=(
        "Scaled dot-product attention (Vaswani et al. 2017) with GQA, causal/sliding-window, "
        "packed documents and block masks, dispatched to flash-attn, SDPA, FlexAttention or eager."
    ),
)


def attention(
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
    backend: str | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention ``softmax(scale * q kᵀ + mask) v`` (Vaswani et al. 2017).

    Args:
        q: ``[batch, seq_q, heads_q, head_dim]`` (BSHD, the flash-attn / transformers layout), or
            packed ``[tokens, heads_q, head_dim]`` with ``cu_seqlens`` (or a ``block_mask``
            whose segment ids describe the documents).
        k, v: ``[batch, seq_k, heads_kv, head_dim]`` (or packed ``[tokens, heads_kv, head_dim]``);
            ``heads_q % heads_kv == 0``: grouped-query / multi-query attention (GQA, Ainslie et
            al. 2023), query head ``h`` reading key/value head ``h // (heads_q // heads_kv)``.
        causal: a query sees only keys at or before its position. With ``seq_q != seq_k`` the
            queries are aligned to the end of the keys (FlashAttention 2's convention).
        softmax_scale: multiplies ``q kᵀ``; default ``1 / sqrt(head_dim)``.
        cu_seqlens: ``int32 [documents + 1]`` boundaries of the documents packed in q/k/v
            (FlashAttention's varlen convention); attention never crosses a document.
        cu_seqlens_q, cu_seqlens_k: separate boundaries for queries and keys instead.
        max_seqlen, max_seqlen_q, max_seqlen_k: longest document (flash-attn needs it; computed
            with one host sync when omitted).
        window: ``(left, right)`` sliding window, as flash-attn's ``window_size``: query ``i``
            sees keys ``[i - left, i + right]``, ``-1`` unbounded (Longformer, Beltagy et al.
            2020; Mistral 7B, Jiang et al. 2023).
        block_mask: an arbitrary mask: a forge :class:`~forge_kernels.attention.masks.AttentionMask`
            (e.g. :func:`~forge_kernels.attention.masks.multimodal_mask`: bidirectional within
            an image, causal across text) or a FlexAttention ``BlockMask`` (Dong et al. 2024).
            Do not pass ``causal``/``window`` with it; an ``AttentionMask`` combines with
            ``cu_seqlens`` (the documents become its segment ids).
        backend: ``"auto"`` (default, ``None``), ``"flash_attn"`` (Dao et al. 2022, 2023),
            ``"sdpa"``, ``"flex"`` or ``"eager"``; see :mod:`forge_kernels.attention.dispatch`.
        dropout_p: attention-probability dropout (training only; not with ``"flex"``).
        return_lse: also return the log-sum-exp of the scaled, masked scores, fp32:
            ``[batch, heads_q, seq_q]``, or ``[heads_q, tokens]`` when packed. Not with ``"sdpa"``.

    Returns:
        ``out`` in q's layout and dtype (value head dim), or ``(out, lse)``. A query that sees
        no key gets a zero output.

    Under ``torch.autocast``, q, k and v are cast to the autocast dtype first, as torch casts
    ``scaled_dot_product_attention``'s inputs.

    Dispatches through ``registry.get_op("attention")``, so a plugin override takes effect here.
    """
    q, k, v = autocast_inputs(q, k, v)
    recorded_before = _records
    result = registry.get_op("attention")(
        q,
        k,
        v,
        causal=causal,
        softmax_scale=softmax_scale,
        cu_seqlens=cu_seqlens,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen=max_seqlen,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        window=window,
        block_mask=block_mask,
        backend=backend,
        dropout_p=dropout_p,
        return_lse=return_lse,
    )
    if _records == recorded_before:
        # The reference (FORGE_KERNELS_IMPL=reference) or a plugin override ran without
        # dispatching: record it under its own name, so no earlier choice is reported instead.
        implementation = registry.implementation_of("attention")
        _record(BackendChoice(backend=implementation, requested=backend or "auto"))
    return result
