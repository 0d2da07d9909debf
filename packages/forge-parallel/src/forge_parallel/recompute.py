"""Activation recomputation (checkpointing) of a model's blocks.

Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost": keep only some activations
in the forward pass and recompute the rest during backward. Full recomputation keeps each
block's input only; selective recomputation (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models") keeps most activations and recomputes the ones
that are large but cheap, above all the attention core. The automatic policy
(:mod:`forge_parallel.auto_recompute`) measures each block and picks, per block, what to
recompute to fit a memory budget with the least extra compute. Both use PyTorch's non-reentrant
``torch.utils.checkpoint``; the selective policy is a per-op
``create_selective_checkpoint_contexts`` policy.

The block's ``forward`` is wrapped in place (no wrapper module), so parameter names and state
dicts are unchanged, and FSDP / ``torch.compile`` applied afterwards see the checkpointed
forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    create_selective_checkpoint_contexts,
)

from forge_parallel.auto_recompute import AutoRecompute, auto_budgets
from forge_parallel.config import RecomputeConfig
from forge_parallel.replay_checkpoint import checkpoint_block

__all__ = ["ATTENTION_OPS", "MATMUL_OPS", "apply_recompute", "selective_policy"]

#: The attention core: recomputed by the ``"attention"`` preset, kept by ``"pointwise"``.
ATTENTION_OPS = frozenset(
    {
        "aten._scaled_dot_product_flash_attention",
        "aten._scaled_dot_product_flash_attention_for_cpu",
        "aten._scaled_dot_product_efficient_attention",
        "aten._scaled_dot_product_cudnn_attention",
        "aten._scaled_dot_product_attention_math",
        "aten._scaled_dot_product_fused_attention_overrideable",
        "aten._flash_attention_forward",
        "aten._efficient_attention_forward",
        "aten._softmax",
        "aten._safe_softmax",
        "aten.bmm",
        "aten.baddbmm",
    }
)
#: Projections (linear layers): always kept by the presets.
MATMUL_OPS = frozenset({"aten.mm", "aten.addmm", "aten._scaled_mm", "aten._grouped_mm"})


def _op_name(op: object) -> str:
    packet = getattr(op, "overloadpacket", None)
    return str(packet if packet is not None else op)


def _recompute_predicate(ops: str | Sequence[str]) -> Callable[[str], bool]:
    if ops == "attention":
        return ATTENTION_OPS.__contains__
    if ops == "pointwise":
        keep = ATTENTION_OPS | MATMUL_OPS
        # Collectives (tensor parallelism inside the block) are kept, never re-issued.
        return lambda name: name not in keep and "c10d" not in name
    names = frozenset(ops)
    return names.__contains__


def selective_policy(ops: str | Sequence[str]) -> Callable:
    """The ``create_selective_checkpoint_contexts`` policy that recomputes ``ops``.

    ``ops`` is ``"attention"``, ``"pointwise"`` or op names such as ``"aten._softmax"``;
    every other op's output is saved.
    """
    recompute = _recompute_predicate(ops)

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        if recompute(_op_name(op)):
            return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE

    return policy


def _checkpointed(inner: Callable, context_fn: Callable | None) -> Callable:
    # A closure rather than module attributes, so torch.compile traces it as a plain function.
    # checkpoint_block: the recomputation in backward runs under the forward's function modes
    # (context parallelism's attention router).
    def forward(*args, **kwargs):
        return checkpoint_block(inner, *args, context_fn=context_fn, **kwargs)

    return forward


def apply_recompute(
    blocks: Sequence[tuple[str, nn.Module]], config: RecomputeConfig
) -> dict[str, str]:
    """Checkpoint ``blocks`` (``(name, module)`` pairs) in place; returns name -> description."""
    if config.mode == "auto":
        return _apply_auto(blocks, config)
    context_fn: Callable | None = None
    if config.mode == "full":
        description = "full" if config.every == 1 else f"full (every {config.every})"
    else:
        policy = selective_policy(config.ops)

        def context_fn():
            return create_selective_checkpoint_contexts(policy)

        ops = config.ops if isinstance(config.ops, str) else ",".join(config.ops)
        description = f"selective ({ops})"
    applied: dict[str, str] = {}
    for index, (name, block) in enumerate(blocks):
        if config.mode == "full" and index % config.every:
            continue
        if getattr(block, "_forge_recompute", None):
            raise ValueError(f"{name} is already checkpointed; apply recompute once")
        block.forward = _checkpointed(block.forward, context_fn)
        block._forge_recompute = description
        applied[name] = description
    return applied


def _apply_auto(blocks: Sequence[tuple[str, nn.Module]], config: RecomputeConfig) -> dict[str, str]:
    budget = auto_budgets(config.memory_budget, config.budget_scope, len(blocks))
    scope = "per block" if config.budget_scope == "block" else "in total"
    description = f"auto ({config.memory_budget / 2**20:.2f} MiB {scope})"
    applied: dict[str, str] = {}
    for name, block in blocks:
        if getattr(block, "_forge_recompute", None):
            raise ValueError(f"{name} is already checkpointed; apply recompute once")
        # Decided on the block's first forward with gradients; then _forge_recompute says what.
        block.forward = AutoRecompute(block.forward, budget(), block)
        block._forge_recompute = description
        applied[name] = description
    return applied
