"""Test helpers: a tiny mixture-of-experts decoder (TinyLlama with MoE feed-forward blocks).

The MoE block follows the expert-parallel protocol of :mod:`forge_parallel.expert_parallel`:
route (softmax top-k) -> ``moe_permute`` -> ``experts(x_sorted, tokens_per_expert)`` ->
``moe_unpermute``, with forge-kernels' ops (as forge-models' ``MoEBlock``), experts stacked
``gate_up_proj [E, 2F, D]`` / ``down_proj [E, D, F]``, and a plain shared expert.

Imported by file path from the test modules (and, through them, by the worker pool).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import forge_parallel
from forge_core.testing import import_path
from forge_kernels.moe import grouped_mm, moe_permute, moe_topk_routing, moe_unpermute
from forge_parallel import TPPlan

tm = import_path(Path(__file__).with_name("tiny_models.py"), "forge_parallel_tests_tiny_models")


@dataclass(frozen=True, kw_only=True)
class TinyMoEConfig:
    num_experts: int = 4
    top_k: int = 2
    expert_ffn: int = 16
    shared_ffn: int = 16


class Experts(nn.Module):
    """``E`` SwiGLU experts with stacked weights, applied to rows grouped by expert."""

    def __init__(self, num_experts: int, dim: int, ffn: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(num_experts, 2 * ffn, dim) * dim**-0.5)
        self.down_proj = nn.Parameter(torch.randn(num_experts, dim, ffn) * ffn**-0.5)

    def forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        gate_up = grouped_mm(x_sorted, self.gate_up_proj, tokens_per_expert, transpose_weight=True)
        gate, up = gate_up.chunk(2, dim=-1)
        return grouped_mm(
            F.silu(gate) * up, self.down_proj, tokens_per_expert, transpose_weight=True
        )


class MoE(nn.Module):
    def __init__(self, dim: int, cfg: TinyMoEConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.router = nn.Linear(dim, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, dim, cfg.expert_ffn)
        self.shared = tm.MLP(tm.TinyConfig(dim=dim, ffn=cfg.shared_ffn))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        routing = moe_topk_routing(self.router(flat), top_k=self.top_k, norm_topk_prob=True)
        perm = moe_permute(flat, routing.indices, num_experts=self.num_experts)
        rows = self.experts(perm.hidden, perm.tokens_per_expert)
        out = moe_unpermute(rows, perm.slot_positions, routing_weights=routing.weights)
        return (out + self.shared(flat)).reshape(x.shape)


class TinyMoE(tm.TinyLlama):
    """TinyLlama whose feed-forward blocks are :class:`MoE` (so the shared loop runs it)."""

    def __init__(self, cfg: tm.TinyConfig, moe: TinyMoEConfig) -> None:
        super().__init__(cfg)
        for layer in self.layers:
            layer.mlp = MoE(cfg.dim, moe)


def build_tiny_moe(seed: int = 0, *, n_layers: int = 2, **overrides) -> TinyMoE:
    """``overrides``: :class:`TinyMoEConfig` fields."""
    torch.manual_seed(seed)
    return TinyMoE(tm.TinyConfig(n_layers=n_layers), TinyMoEConfig(**overrides))


def moe_plan(*, sequence_parallel: bool = False, expert_parallel: bool = False) -> TPPlan:
    """Attention, embedding and head tensor-parallel; the MoE blocks stay replicated over tp
    (their experts are split by expert tensor parallelism instead).

    With sequence parallelism the norms run on sequence shards and so does each MoE block
    (``replicate``: its weights become replicated DTensors whose gradients, partial sums over
    each rank's tokens, are summed over tp); with ``expert_parallel`` too, only its router and
    shared expert (the experts are sharded over ep x etp, ``EPConfig(sequence_parallel=True)``).
    """
    tiny = tm.tiny_plan(sequence_parallel=sequence_parallel)
    styles = {k: v for k, v in tiny.styles.items() if k != "layers.*.mlp" and ".mlp." not in k}
    if sequence_parallel and expert_parallel:
        styles["layers.*.mlp.router"] = "replicate"
        styles["layers.*.mlp.shared"] = "replicate"
    elif sequence_parallel:
        styles["layers.*.mlp"] = "replicate"
    return TPPlan(styles=styles, attributes=tiny.attributes, sequence_parallel=sequence_parallel)


@contextlib.contextmanager
def eager_kernels():
    """forge-kernels' ops through their eager references: on a CPU test machine the Triton
    kernels run interpreted, far too slowly for training loops; forge-kernels checks them
    against these references, and the parallel layouts must be exact with either one."""
    from forge_kernels.registry import reference_implementations

    with reference_implementations():
        yield


def run_moe_layouts(layouts: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Train the single-process reference and every layout on this rank; relative errors."""
    with eager_kernels():
        return _run_moe_layouts(layouts)


def _run_moe_layouts(layouts: dict[str, dict]) -> dict[str, dict[str, float]]:
    from forge_core import ParallelDims

    batches = tm.make_batches()
    initial = build_tiny_moe()
    reference, ref_params = tm.rank0_reference(initial, batches)
    out = {}
    for name, layout in layouts.items():
        kwargs = dict(layout)
        dims = ParallelDims(world_size=dist.get_world_size(), **kwargs.pop("dims"))
        model = copy.deepcopy(initial)
        result = forge_parallel.parallelize(model, dims, **kwargs)
        got = tm.train(result.model, batches, result=result)
        out[name] = tm.compare(reference, ref_params, got, tm.full_params(result.model))
    return out
