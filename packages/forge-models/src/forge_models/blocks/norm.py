"""RMSNorm as a module over :func:`forge_kernels.rms_norm` (Zhang & Sennrich 2019, arXiv:1910.07467)."""

from __future__ import annotations

import torch
from torch import nn

import forge_kernels

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x**2) + eps)`` over the last dim, statistics in fp32.

    Numerics follow transformers' ``LlamaRMSNorm`` (normalize in fp32, cast to the input dtype,
    then scale); the fused Triton kernel runs where it can (see ``forge_kernels.rms_norm``).
    """

    def __init__(self, dim: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forge_kernels.rms_norm(x, self.weight, eps=self.eps)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
