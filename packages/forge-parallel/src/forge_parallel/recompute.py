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

Selective recomputation can also checkpoint chosen submodules of each block and leave the rest
to autograd (Megatron-Core's ``--recompute-modules``; Korthikanti et al. wrap only the core
attention in a checkpoint): ``RecomputeConfig(modules=...)``, and the ``"attention"`` preset,
whose policy runs inside the block's attention submodule. A policy over the whole block saves
every op's output it does not recompute, also those autograd would free (a residual add's).
Over expert-parallel experts the policy decides on their forward's ops, their hooks (FSDP's)
run outside it (:class:`~forge_parallel.expert_parallel.ExpertParallelExperts`).

The module's ``forward`` is wrapped in place (no wrapper module), so parameter names and state
dicts are unchanged, and FSDP / ``torch.compile`` applied afterwards see the checkpointed
forward.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import (
    CheckpointPolicy,
    create_selective_checkpoint_contexts,
)

from forge_parallel.auto_recompute import (
    AutoRecompute,
    auto_budgets,
    is_inplace_collective,
    is_kept_collective,
    storage_ptr,
    written_tensors,
)
from forge_parallel.config import RecomputeConfig
from forge_parallel.replay_checkpoint import checkpoint_block

__all__ = [
    "ATTENTION_MODULE_NAMES",
    "ATTENTION_OPS",
    "MATMUL_OPS",
    "apply_recompute",
    "patterns_in_blocks",
    "selective_policy",
    "stage_recompute",
]

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
#: Child names of a block's attention submodule, where the ``"attention"`` preset applies its
#: policy when no ``modules`` are given (forge's and timm's ``attn``, ``transformers``'
#: ``self_attn``).
ATTENTION_MODULE_NAMES = ("attn", "self_attn", "attention")
#: Projections (linear layers): always kept by the presets.
MATMUL_OPS = frozenset({"aten.mm", "aten.addmm", "aten._scaled_mm", "aten._grouped_mm"})


def _op_name(op: object) -> str:
    packet = getattr(op, "overloadpacket", None)
    return str(packet if packet is not None else op)


def _recompute_predicate(ops: str | Sequence[str], *, submodule: bool) -> Callable[[str], bool]:
    # An in-place collective (c10d.*_, forge's autograd all-to-all) shares the fate of the
    # buffer it fills: cached while the buffer (new_empty, clone) is recomputed, the
    # recomputation would never fill the fresh buffer. The presets that recompute those
    # buffers recompute the collective; the others save both. _guarded matches them per call.
    if ops == "attention" and submodule:
        # Inside the attention submodule: keep only the projections' outputs (and collectives'),
        # recompute the attention core and the cheap ops around it (rotary embedding, QK norm,
        # head reshapes). Saving every other op's output instead keeps intermediates autograd
        # would free (the rotary embedding's products, the output projection's result).
        return lambda name: name not in MATMUL_OPS and not is_kept_collective(name)
    if ops == "attention":
        return ATTENTION_OPS.__contains__
    if ops == "pointwise":
        keep = ATTENTION_OPS | MATMUL_OPS
        # Functional collectives (tensor parallelism inside the block) are kept, never re-issued.
        return lambda name: name not in keep and not is_kept_collective(name)
    names = frozenset(ops)
    return names.__contains__


def selective_policy(ops: str | Sequence[str], *, submodule: bool = False) -> Callable:
    """The ``create_selective_checkpoint_contexts`` policy that recomputes ``ops``.

    ``ops`` is ``"attention"``, ``"pointwise"`` or op names such as ``"aten._softmax"``;
    every other op's output is saved. ``submodule=True``: the policy of a checkpointed
    submodule; there ``"attention"`` keeps only the matmuls' and collectives' outputs.
    """
    recompute = _recompute_predicate(ops, submodule=submodule)

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        if recompute(_op_name(op)):
            return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE

    return policy


def _checkpointed(inner: Callable, context_fn: Callable | None, module: nn.Module) -> Callable:
    # A closure rather than module attributes, so torch.compile traces it as a plain function.
    # checkpoint_block: the recomputation in backward runs under the forward's function modes
    # (context parallelism's attention router), from the state of ``module`` the forward
    # started from, and leaves no writes to it behind (BatchNorm's running statistics).
    def forward(*args, **kwargs):
        return checkpoint_block(inner, *args, context_fn=context_fn, state_module=module, **kwargs)

    return forward


_SAVES = (CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_SAVE)
#: In-place ops that give the same result applied twice (``nn.ReLU(inplace=True)``, ``ReLU6``):
#: recomputed on the saved copy they change nothing, so a policy that recomputes them may save
#: what they write. (Saved themselves, PyTorch's cache check still sees the write.)
_IDEMPOTENT_WRITES = frozenset(
    {"aten.relu_", "aten.clamp_", "aten.clamp_min_", "aten.clamp_max_", "aten.hardtanh_"}
)


def _guarded(policy: Callable, ops: str | Sequence[str]) -> Callable:
    """``policy`` for one checkpointed call, refusing an in-place write into an output it saved.

    The cache holds the saved output as it was; the recomputation would run the in-place op
    again on the cached tensor (``nn.Linear`` on 3-D input ends in ``_unsafe_view``, which
    hides the write from PyTorch's own check: silently wrong gradients), or PyTorch stops
    with a generic "mutated" error in backward. Refused in the forward instead, naming both
    ops. An in-place collective is saved or recomputed as the buffer it fills was (see
    :func:`_recompute_predicate`). The policy sees each op's output after it ran
    (``ctx.op_output``); a torch without it gets no check.
    """
    made: dict[int, bool] = {}  # storage address of an output made here -> saved
    saved: dict[int, str] = {}  # storage address of a saved output -> the op that made it

    def guarded(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        decision = policy(ctx, op, *args, **kwargs)
        if is_inplace_collective(_op_name(op)):
            buffers = [
                made[p] for t in written_tensors(op, args, kwargs) if (p := storage_ptr(t)) in made
            ]
            if buffers:
                return (
                    CheckpointPolicy.MUST_SAVE
                    if all(buffers)
                    else CheckpointPolicy.PREFER_RECOMPUTE
                )
            return decision
        written = written_tensors(op, args, kwargs)
        replay_harmless = decision not in _SAVES and _op_name(op) in _IDEMPOTENT_WRITES
        for t in () if replay_harmless else written:
            maker = saved.get(storage_ptr(t))
            if maker is not None:
                raise ValueError(
                    f"selective recompute ({_ops_text(ops)}) saves the output of {maker}, and "
                    f"{_op_name(op)} then writes into it in place: the recomputation would "
                    "apply the write a second time to the saved copy (wrong gradients). Make "
                    "the write out of place (e.g. nn.ReLU / nn.LeakyReLU(inplace=False), "
                    "x = x * s instead of x.mul_(s)), or checkpoint whole submodules "
                    "(RecomputeConfig(mode='selective', modules=...)), or use mode='full' or "
                    "mode='auto' (which recomputes such outputs)"
                )
        outputs = tree_flatten(getattr(ctx, "op_output", None))[0]
        if decision in _SAVES and written and _aliases(outputs, written):
            # The op's output is what it wrote in place (``num_batches_tracked.add_(1)``, a
            # user's EMA buffer, ``x.mul_(s)``): PyTorch's cache takes its version before the
            # op's own bump and would fail "has been mutated" in backward. Recomputed instead;
            # a write into module state is undone after the recomputation (replay_checkpoint).
            decision = CheckpointPolicy.PREFER_RECOMPUTE
        for t in outputs:
            if isinstance(t, torch.Tensor) and (ptr := storage_ptr(t)):
                made[ptr] = decision in _SAVES  # the latest: a freed address is reused
                if decision in _SAVES:
                    saved.setdefault(ptr, _op_name(op))
        return decision

    return guarded


def _aliases(outputs: list, written: list[torch.Tensor]) -> bool:
    """Whether one of an op's ``outputs`` shares storage with a tensor it wrote in place."""
    targets = {storage_ptr(t) for t in written} - {None}
    return any(isinstance(t, torch.Tensor) and storage_ptr(t) in targets for t in outputs)


def _selective_context(ops: str | Sequence[str], *, submodule: bool = False) -> Callable:
    policy = selective_policy(ops, submodule=submodule)

    def context_fn():
        # A fresh guard per call: the addresses it tracks are this forward's saved outputs.
        return create_selective_checkpoint_contexts(_guarded(policy, ops))

    return context_fn


def _ops_text(ops: str | Sequence[str]) -> str:
    return ops if isinstance(ops, str) else ",".join(ops)


def _check_not_checkpointed(name: str, module: nn.Module) -> None:
    if any(getattr(m, "_forge_recompute", None) for m in module.modules()):
        raise ValueError(f"{name} (or a submodule) is already checkpointed; apply recompute once")


def _checkpoint_in_place(name: str, module: nn.Module, context_fn, description: str) -> None:
    _check_not_checkpointed(name, module)
    module.forward = _checkpointed(module.forward, context_fn, module)
    module._forge_recompute = description


def _matched_submodules(
    blocks: Sequence[tuple[str, nn.Module]], patterns: Sequence[str]
) -> list[list[tuple[str, nn.Module]]]:
    """Per block, the outermost submodules whose path relative to the block matches one of
    ``patterns`` (``fnmatch``); a pattern that matches in no block is an error."""
    used: set[str] = set()
    per_block = []
    for _, block in blocks:
        chosen: list[tuple[str, nn.Module]] = []
        for path, module in block.named_modules():
            hits = [p for p in patterns if path and fnmatch.fnmatchcase(path, p)]
            used.update(hits)
            inside = any(path.startswith(f"{outer}.") for outer, _ in chosen)
            if hits and not inside:  # (inside a checkpointed submodule: already recomputed)
                if isinstance(module, nn.ModuleList | nn.ModuleDict):
                    # A container's forward never runs (the block calls its members): its
                    # members are what a pattern naming it checkpoints.
                    chosen += [(f"{path}.{n}", child) for n, child in module.named_children()]
                else:
                    chosen.append((path, module))
        per_block.append(chosen)
    unmatched = [p for p in patterns if p not in used]
    if unmatched and blocks:
        name, block = blocks[0]
        paths = [path for path, _ in block.named_modules() if path]
        raise ValueError(
            f"recompute modules pattern(s) {unmatched} match no submodule of any block; "
            f"patterns are relative to each block, and block {name!r} "
            f"({type(block).__name__}) has: {', '.join(paths) or '(no submodules)'}"
        )
    return per_block


def stage_recompute(
    config: RecomputeConfig,
    stage_blocks: Sequence[tuple[str, nn.Module]],
    model_blocks: Sequence[tuple[str, nn.Module]],
) -> RecomputeConfig | None:
    """The recompute of a pipeline stage holding ``stage_blocks`` of a model whose blocks are
    ``model_blocks``: with ``modules``, the patterns that match a submodule of the stage's
    blocks (none: no recompute; a stage may hold no MoE layer, as Megatron-Core skips a
    ``--recompute-modules`` entry a layer lacks); a pattern that matches in no block of the
    whole model is an error. Without ``modules``, ``config`` as it is."""
    if config.mode != "selective" or not config.modules:
        return config
    _matched_submodules(model_blocks, config.modules)  # raises for a pattern matching nowhere
    mine = patterns_in_blocks(stage_blocks, config.modules)
    return dataclasses.replace(config, modules=mine) if mine else None


def patterns_in_blocks(
    blocks: Sequence[tuple[str, nn.Module]], patterns: Sequence[str]
) -> tuple[str, ...]:
    """The ``patterns`` (in order) that match a submodule path, relative to its block, of one
    of ``blocks``."""
    paths = {path for _, block in blocks for path, _ in block.named_modules() if path}
    return tuple(p for p in patterns if any(fnmatch.fnmatchcase(path, p) for path in paths))


def _attention_child(block: nn.Module) -> str | None:
    children = dict(block.named_children())
    return next((n for n in ATTENTION_MODULE_NAMES if n in children), None)


def apply_recompute(
    blocks: Sequence[tuple[str, nn.Module]], config: RecomputeConfig
) -> dict[str, str]:
    """Checkpoint ``blocks`` (``(name, module)`` pairs) in place; returns module name ->
    description (the blocks, or with ``modules`` / the ``"attention"`` preset their
    checkpointed submodules)."""
    if config.mode == "auto":
        return _apply_auto(blocks, config)
    if config.mode == "selective" and config.modules:
        return _apply_modules(blocks, config.modules, config.ops)
    ops = "attention" if config.ops is None else config.ops
    attention_children = blocks and all(_attention_child(block) for _, block in blocks)
    if config.mode == "selective" and ops == "attention" and attention_children:
        # Korthikanti et al. 2022 checkpoint the attention core only: the policy runs inside
        # the attention submodule; outside it autograd decides what is kept.
        return _apply_modules(blocks, (), ops)
    context_fn: Callable | None = None
    if config.mode == "full":
        description = "full" if config.every == 1 else f"full (every {config.every})"
    else:
        context_fn = _selective_context(ops)
        description = f"selective ({_ops_text(ops)})"
    applied: dict[str, str] = {}
    for index, (name, block) in enumerate(blocks):
        if config.mode == "full" and index % config.every:
            continue
        _checkpoint_in_place(name, block, context_fn, description)
        applied[name] = description
    return applied


def _apply_modules(
    blocks: Sequence[tuple[str, nn.Module]],
    patterns: Sequence[str],
    ops: str | Sequence[str] | None,
) -> dict[str, str]:
    """Checkpoint submodules of each block (Megatron-Core's ``--recompute-modules``); the rest
    of the block runs without checkpoint, so autograd decides what it keeps there. ``patterns``
    empty: each block's attention child (the ``"attention"`` preset)."""
    if patterns:
        per_block = _matched_submodules(blocks, patterns)
    else:
        children = [_attention_child(block) for _, block in blocks]
        per_block = [[(c, getattr(b, c))] for (_, b), c in zip(blocks, children, strict=True)]
    context_fn = None if ops is None else _selective_context(ops, submodule=True)
    description = "full" if ops is None else f"selective ({_ops_text(ops)})"
    applied: dict[str, str] = {}
    for (name, block), chosen in zip(blocks, per_block, strict=True):
        _check_not_checkpointed(name, block)
        for path, module in chosen:
            full_name = f"{name}.{path}" if name else path
            _checkpoint_in_place(full_name, module, context_fn, description)
            applied[full_name] = description
    return applied


def _apply_auto(blocks: Sequence[tuple[str, nn.Module]], config: RecomputeConfig) -> dict[str, str]:
    budget = auto_budgets(config.memory_budget, config.budget_scope, len(blocks))
    scope = "per block" if config.budget_scope == "block" else "in total"
    description = f"auto ({config.memory_budget / 2**20:.2f} MiB {scope})"
    applied: dict[str, str] = {}
    for name, block in blocks:
        _check_not_checkpointed(name, block)
        # Decided on the block's first forward with gradients; then _forge_recompute says what.
        block.forward = AutoRecompute(block.forward, budget(), block)
        block._forge_recompute = description
        applied[name] = description
    return applied
