"""The dropless mixture-of-experts feed-forward block (Qwen2-MoE, Qwen3-MoE, DeepSeek-V3).

- Sparsely-gated MoE with a softmax top-k router: Shazeer et al. 2017, arXiv:1701.06538;
  Switch Transformer load-balancing loss: Fedus et al. 2021, arXiv:2101.03961.
- Dropless token permutation + grouped GEMM: MegaBlocks, Gale et al. 2022, arXiv:2211.15841.
- Shared expert with a sigmoid gate: Qwen1.5-MoE / Qwen2 Technical Report, arXiv:2407.10671.
- Qwen3-MoE (no shared expert, ``norm_topk_prob``): Qwen3 Technical Report, arXiv:2505.09388.
- DeepSeekMoE with ungated shared experts, sigmoid affinities, group-limited (node-limited)
  routing, ``routed_scaling_factor`` and the auxiliary-loss-free selection bias: DeepSeek-V3
  technical report, DeepSeek-AI 2024, arXiv:2412.19437, section 2.1.2 (eqs. 12-16); the bias
  rule is Wang et al. 2024, arXiv:2408.15664.

The hot path is forge-kernels' ``moe_topk_routing`` -> ``moe_permute`` -> ``grouped_mm`` ->
``swiglu`` -> ``grouped_mm`` -> ``moe_unpermute``; no Python loop over experts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import forge_kernels
from forge_kernels.moe import (
    grouped_mm,
    moe_permute,
    moe_topk_routing,
    moe_unpermute,
    update_expert_bias,
)
from forge_models.blocks.mlp import GatedMLP
from forge_models.init import init_

__all__ = ["MoEBlock", "MoEExperts", "RouterOutput"]


class RouterOutput(NamedTuple):
    """What one MoE layer reports per forward, for the auxiliary loss and for logging.

    Attributes:
        logits: ``[tokens, num_experts]`` router logits (differentiable; the load-balancing loss
            is computed from them).
        tokens_per_expert: ``[num_experts]`` int64 (token, slot) assignments per expert
            (detached): the per-expert load.
        scores: ``[tokens, num_experts]`` fp32 unbiased affinities (softmax or sigmoid),
            differentiable: the input of DeepSeek-V3's sequence-wise balance loss.
        indices: ``[tokens, top_k]`` chosen experts.
    """

    logits: torch.Tensor
    tokens_per_expert: torch.Tensor
    scores: torch.Tensor | None = None
    indices: torch.Tensor | None = None


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

    def reset_parameters(
        self,
        std: float,
        generator: torch.Generator | None = None,
        *,
        device: torch.device | None = None,
    ) -> None:
        """``normal(0, std)`` weights, drawn whole whatever the sharding (see
        :func:`forge_models.init.init_`; ``device``: where to draw meta parameters)."""

        def fill(t: torch.Tensor) -> None:
            nn.init.normal_(t, mean=0.0, std=std, generator=generator)

        with torch.no_grad():
            init_(self.gate_up_proj, fill, device=device)
            init_(self.down_proj, fill, device=device)

    def extra_repr(self) -> str:
        e, two_i, h = self.gate_up_proj.shape
        return f"num_experts={e}, hidden={h}, intermediate={two_i // 2}"


class MoEBlock(nn.Module):
    """Routed experts plus an optional (sigmoid-gated) shared expert.

    ``out = sum_k w_k(x) * expert_{e_k}(x) [+ g(x) * shared_expert(x)]`` with the top-k experts
    ``e_k`` and weights ``w_k`` from the router scores ``s = softmax(x W_router)`` (Qwen-MoE) or
    ``s = sigmoid(x W_router)`` computed in fp32 (DeepSeek-V3): experts chosen by ``s + b``
    (``expert_bias`` ``b``, within the ``topk_group`` best of ``n_group`` groups), weighted by
    ``s`` (renormalized over the top-k with ``norm_topk_prob``) times
    ``routed_scaling_factor``. ``g(x) = sigmoid(x W_sg)`` with ``shared_expert_gate`` (Qwen2-MoE),
    else 1 (DeepSeek).

    Submodules: ``router`` (``nn.Linear(hidden, E)``, no bias), ``experts``
    (:class:`MoEExperts`), with ``shared_expert_intermediate_size > 0`` ``shared_expert``
    (:class:`GatedMLP`) and, if gated, ``shared_expert_gate`` (``nn.Linear(hidden, 1)``). With
    ``expert_bias`` the buffer ``expert_bias`` ``[E]`` (fp32, saved in the state dict, updated by
    :meth:`update_expert_bias`, never by the optimizer).

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
        shared_expert_gate: bool = True,
        score_func: str = "softmax",
        routed_scaling_factor: float = 1.0,
        n_group: int | None = None,
        topk_group: int | None = None,
        expert_bias: bool = False,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.score_func = score_func
        self.routed_scaling_factor = routed_scaling_factor
        self.n_group = n_group
        self.topk_group = topk_group
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = MoEExperts(num_experts, hidden_size, intermediate_size)
        self.shared_expert = None
        self.shared_expert_gate = None
        if shared_expert_intermediate_size > 0:
            self.shared_expert = GatedMLP(hidden_size, shared_expert_intermediate_size)
            if shared_expert_gate:
                self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
        if expert_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def _apply(self, fn, recurse=True):
        # The selection bias stays fp32 whatever the model dtype (transformers keeps
        # e_score_correction_bias in fp32 too): bf16 cannot hold 1e-3 steps on values near 1.
        super()._apply(fn, recurse)
        if self.expert_bias is not None and self.expert_bias.dtype != torch.float32:
            self.expert_bias = self.expert_bias.float()
        return self

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert: torch.Tensor, update_rate: float) -> None:
        """Auxiliary-loss-free balancing step: ``expert_bias += update_rate * sign(mean - load)``.

        ``tokens_per_expert`` ``[E]``: this layer's load over the whole global batch.
        """
        if self.expert_bias is None:
            raise ValueError(
                "this MoE layer has no expert_bias buffer; build it with MoEConfig(expert_bias=True)"
            )
        update_expert_bias(
            self.expert_bias, tokens_per_expert.to(self.expert_bias.device), update_rate=update_rate
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        """``x``: ``[..., hidden]`` -> ``(out [..., hidden], RouterOutput)``."""
        shape = x.shape
        x_flat = x.reshape(-1, shape[-1])
        if self.score_func == "sigmoid":  # DeepSeek-V3 computes the router in fp32
            logits = F.linear(x_flat.float(), self.router.weight.float())
        else:
            logits = self.router(x_flat)
        routing = moe_topk_routing(
            logits,
            top_k=self.top_k,
            score_func=self.score_func,
            norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=self.routed_scaling_factor,
            n_group=self.n_group,
            topk_group=self.topk_group,
            expert_bias=self.expert_bias,
        )
        perm = moe_permute(x_flat, routing.indices, num_experts=self.num_experts)
        expert_out = self.experts(perm.hidden, perm.tokens_per_expert)
        weights = routing.weights.to(expert_out.dtype)
        out = moe_unpermute(expert_out, perm.slot_positions, routing_weights=weights)
        if self.shared_expert is not None:
            shared = self.shared_expert(x_flat)
            if self.shared_expert_gate is not None:
                shared = F.sigmoid(self.shared_expert_gate(x_flat)) * shared
            out = out + shared
        router = RouterOutput(
            logits, routing.tokens_per_expert.detach(), routing.scores, routing.indices
        )
        return out.reshape(shape), router
