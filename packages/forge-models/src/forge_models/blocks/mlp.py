"""The SwiGLU feed-forward block (Shazeer 2020, "GLU Variants Improve Transformer", arXiv:2002.05202)."""

from __future__ import annotations

import torch
from torch import nn

import forge_kernels

__all__ = ["GatedMLP"]


class GatedMLP(nn.Module):
    """``down_proj(silu(x W_gate) * (x W_up))`` with gate and up fused into one GEMM.

    ``gate_up_proj.weight`` is ``[2 * intermediate, hidden]``: the gate rows, then the up rows
    (checkpoints store them as separate ``gate_proj`` / ``up_proj``; forge-ckpt concatenates
    them). Its output is split in two halves for ``forge_kernels.swiglu``. Under tensor
    parallelism the weight must be sharded per half (the ``"colwise_packed"`` style of the
    default plan) so that each rank holds matching gate and up rows.
    """

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(forge_kernels.swiglu(gate, up))
