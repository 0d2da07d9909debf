"""The dropless mixture-of-experts feed-forward block (Qwen2-MoE, Qwen3-MoE).

- Sparsely-gated MoE with a softmax top-k router: Shazeer et al. 2017, arXiv:1701.06538;
  Switch Transformer load-balancing loss: Fedus et al. 2021, arXiv:2101.03961.
- Dropless token permutation + grouped GEMM: MegaBlocks, Gale et al. 2022, arXiv:2211.15841.
- Shared expert with a sigmoid gate: Qwen1.5-MoE / Qwen2 Technical Report, arXiv:2407.10671.
- Qwen3-MoE (no shared expert, ``norm_topk_prob``): Qwen3 Technical Report, arXiv:2505.09388.

The hot path is forge-kernels' ``moe_topk_routing`` -> ``moe_permute`` -> ``grouped_mm`` ->
``swiglu`` -> ``grouped_mm`` -> ``moe_unpermute``; no Python loop over experts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import forge_kernels
from forge_kernels.moe import grouped_mm, moe_permute, moe_topk_routing, moe_unpermute
from forge_models.blocks.mlp import GatedMLP

__all__ = ["MoEBlock", "MoEExperts", "RouterOutput"]


class RouterOutput(NamedTuple):
    """What one MoE layer reports per forward, for the auxiliary loss and for logging.

    Attributes:
        logits: ``[tokens, num_experts]`` router logits (differentiable; the load-balancing loss
            is computed from them).
        tokens_per_expert: ``[num_experts]`` int64 (token, slot) assignments per expert
            (detached): the per-expert load.
    """

    logits: torch.Tensor
    tokens_per_expert: torch.Tensor


class MoEExperts(nn.Module):
    """``num_experts`` SwiGLU MLPs with stacked weights, applied to tokens sorted by expert.

    Parameters (as transformers 5.x ``Qwen3MoeExperts`` holds them): ``gate_up_proj``
    ``[E, 2 * I, hidden]`` (each expert's gate rows, then its up rows) and ``down_proj``
    ``[E, hidden, I]``. Expert parallelism shards both along dim 0 (the ``"expert_parallel"``
    style); the number of local experts is read from the weights.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size)
        )
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """``x_sorted``: ``[rows, hidden]`` grouped by expert, ``tokens_per_expert`` ``[E]``."""
        gate_up = grouped_mm(x_sorted, self.gate_up_proj, tokens_per_expert, transpose_weight=True)
        gate, up = gate_up.chunk(2, dim=-1)
        act = forge_kernels.swiglu(gate, up)
        return grouped_mm(act, self.down_proj, tokens_per_expert, transpose_weight=True)

    def reset_parameters(self, std: float, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            nn.init.normal_(self.gate_up_proj, mean=0.0, std=std, generator=generator)
            nn.init.normal_(self.down_proj, mean=0.0, std=std, generator=generator)

    def extra_repr(self) -> str:
        e, two_i, h = self.gate_up_proj.shape
        return f"num_experts={e}, hidden={h}, intermediate={two_i // 2}"


class MoEBlock(nn.Module):
    """Routed experts plus an optional sigmoid-gated shared expert.

    ``out = sum_k w_k(x) * expert_{e_k}(x) [+ sigmoid(x W_sg) * shared_expert(x)]`` with the
    top-k experts ``e_k`` and weights ``w_k`` of ``softmax(x W_router)`` (renormalized over the
    top-k with ``norm_topk_prob``).

    Submodules: ``router`` (``nn.Linear(hidden, E)``, no bias), ``experts``
    (:class:`MoEExperts`), and with ``shared_expert_intermediate_size > 0`` ``shared_expert``
    (:class:`GatedMLP`) and ``shared_expert_gate`` (``nn.Linear(hidden, 1)``, no bias).

    ``forward`` returns ``(out, RouterOutput)``.
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        norm_topk_prob: bool = False,
        shared_expert_intermediate_size: int = 0,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = MoEExperts(num_experts, hidden_size, intermediate_size)
        if shared_expert_intermediate_size > 0:
            self.shared_expert = GatedMLP(hidden_size, shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
        else:
            self.shared_expert = None
            self.shared_expert_gate = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        """``x``: ``[..., hidden]`` -> ``(out [..., hidden], RouterOutput)``."""
        shape = x.shape
        x_flat = x.reshape(-1, shape[-1])
        logits = self.router(x_flat)
        routing = moe_topk_routing(
            logits, top_k=self.top_k, score_func="softmax", norm_topk_prob=self.norm_topk_prob
        )
        perm = moe_permute(x_flat, routing.indices, num_experts=self.num_experts)
        expert_out = self.experts(perm.hidden, perm.tokens_per_expert)
        out = moe_unpermute(expert_out, perm.slot_positions, routing_weights=routing.weights)
        if self.shared_expert is not None:
            gate = F.sigmoid(self.shared_expert_gate(x_flat))
            out = out + gate * self.shared_expert(x_flat)
        return out.reshape(shape), RouterOutput(logits, routing.tokens_per_expert.detach())
