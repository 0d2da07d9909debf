"""FlashAttention 2 through the ``flash-attn`` package (Dao et al. 2022, arXiv:2205.14135; Dao 2023,
arXiv:2307.08691): ``flash_attn_func`` for ``[B, S, H, D]``, ``flash_attn_varlen_func`` for packed
documents. Causal masks are aligned to the bottom right when ``Sq != Sk``, windows are its
``window_size`` and GQA/MQA is native: the conventions :mod:`forge_kernels.attention` follows.

``flash-attn`` is an optional extra (``pip install "forge-kernels[flash-attn]"``), imported only
when this backend is chosen. It needs CUDA on Ampere or newer, fp16/bf16 and head dims up to 256,
and takes no arbitrary masks. The log-sum-exp it returns (``return_lse=True``) carries no gradient.
"""

from __future__ import annotations

import functools
import importlib.util
from types import ModuleType

import torch

from forge_kernels.attention.backends import AttentionProblem

__all__ = ["INSTALL_HINT", "flash_attn_installed", "require", "run", "unsupported_reason"]

INSTALL_HINT = 'pip install "forge-kernels[flash-attn]"'
MAX_HEAD_DIM = 256


@functools.cache
def flash_attn_installed() -> bool:
    """Whether the ``flash_attn`` package is findable (without importing it)."""
    try:
        return importlib.util.find_spec("flash_attn") is not None
    except (ImportError, ValueError):
        return False


def require() -> ModuleType:
    """Import ``flash_attn``, or raise ``ImportError`` naming the extra that installs it."""
    try:
        import flash_attn
        from flash_attn import flash_attn_func, flash_attn_varlen_func  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"backend='flash_attn' needs the flash-attn package: {INSTALL_HINT} (it builds "
            "against your torch: install it with --no-build-isolation on a CUDA machine); "
            f"or use backend='auto'. Import error: {exc}"
        ) from exc
    return flash_attn


def unsupported_reason(problem: AttentionProblem) -> str | None:
    if problem.device.type != "cuda":
        return f"flash-attn runs on CUDA only, not {problem.device.type}"
    if problem.q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn takes fp16/bf16, not {problem.q.dtype}"
    if problem.head_dim > MAX_HEAD_DIM or problem.v.shape[-1] != problem.head_dim:
        return (
            f"flash-attn takes equal q/k/v head dims up to {MAX_HEAD_DIM}, got "
            f"{problem.head_dim} and {problem.v.shape[-1]}"
        )
    if problem.mask is not None:
        return "flash-attn takes no arbitrary block mask (only causal, window and cu_seqlens)"
    if torch.cuda.get_device_capability(problem.device)[0] < 8:
        return "flash-attn 2 needs an Ampere (sm80) or newer GPU"
    if not flash_attn_installed():
        return f"flash-attn is not installed ({INSTALL_HINT})"
    return None


def _max_seqlen(cu_seqlens: torch.Tensor) -> int:
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())  # one host sync


def run(problem: AttentionProblem) -> tuple[torch.Tensor, torch.Tensor | None]:
    flash_attn = require()
    window = problem.window if problem.window is not None else (-1, -1)
    common = {
        "dropout_p": problem.dropout_p,
        "softmax_scale": problem.scale,
        "causal": problem.causal,
        "window_size": window,
        "return_attn_probs": problem.return_lse,
    }
    if problem.varlen:
        cu_q = problem.cu_seqlens_q.to(torch.int32)
        cu_k = cu_q if problem.cu_seqlens_k is problem.cu_seqlens_q else problem.cu_seqlens_k
        cu_k = cu_k.to(torch.int32)
        max_q = problem.max_seqlen_q if problem.max_seqlen_q is not None else _max_seqlen(cu_q)
        max_k = problem.max_seqlen_k
        if max_k is None:
            max_k = max_q if cu_k is cu_q else _max_seqlen(cu_k)
        result = flash_attn.flash_attn_varlen_func(
            problem.q, problem.k, problem.v, cu_q, cu_k, max_q, max_k, **common
        )
    else:
        result = flash_attn.flash_attn_func(problem.q, problem.k, problem.v, **common)
    if problem.return_lse:
        out, lse = result[0], result[1]  # lse: [B, H, Sq], or [H, T] for varlen
        return out, lse
    return result, None
