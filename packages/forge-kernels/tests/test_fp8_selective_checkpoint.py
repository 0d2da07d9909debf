"""Fp8Linear under PyTorch's selective activation checkpointing (SAC,
``create_selective_checkpoint_contexts``), as forge-parallel's selective and auto recompute
use it.

SAC caches the outputs its policy saves under ``(op, n-th call of that op)`` and hands them to
the recomputation in backward by the same key, so the recomputation must issue the ops of
the forward, call for call. A delayed-scaling forward also records amaxes and updates its
history; its recomputation does not (it casts with the forward's scales), so those ops must be
unseen by the cache, or every later ``mul`` / ``_to_copy`` / ... is looked up one key off
(another op's output: a crash, or wrong values). And a saved product must not be clamped in
place afterwards (PyTorch reports the cache entry as mutated).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from forge_kernels.fp8 import Fp8DelayedScaling, Fp8Linear


def _save_all(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE


def _save_mul(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    # The op whose n-th call was the cast's product in the forward and isfinite's bool
    # product in the recomputation, before the bookkeeping was hidden.
    if op == torch.ops.aten.mul.Tensor:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


_POLICIES = {"save_all": _save_all, "save_mul": _save_mul}


def _model(recipe, dim: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        Fp8Linear(dim, 2 * dim, recipe=recipe, gemm="emulate"),
        nn.GELU(),
        Fp8Linear(2 * dim, dim, recipe=recipe, gemm="emulate"),
    )


def _train(recipe, policy: str | None, *, dim: int = 16, tokens: int = 16):
    """2 steps of 2 micro-batches (both forwards, then both backwards), then an SGD step."""
    model = _model(recipe, dim)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    seen = []
    for step in range(2):
        xs = [
            torch.randn(tokens, dim, generator=torch.Generator().manual_seed(10 * step + m))
            * (1 + step + 2 * m)  # the amaxes change from call to call
            for m in range(2)
        ]
        if policy is None:
            ys = [model(x) for x in xs]
        else:

            def context_fn():
                return create_selective_checkpoint_contexts(_POLICIES[policy])

            ys = [checkpoint(model, x, use_reentrant=False, context_fn=context_fn) for x in xs]
        for y in ys:
            y.square().sum().backward()
        seen += [y.detach() for y in ys] + [p.grad.clone() for p in model.parameters()]
        seen += [b.clone() for b in model.buffers()]  # delayed: amax histories and scales
        opt.step()
        opt.zero_grad()
    pending = [len(m.__dict__.get("_fp8_pending") or ()) for m in model]
    return seen, pending


@pytest.mark.parametrize(
    ("recipe", "policy"),
    [("delayed", "save_all"), ("delayed", "save_mul"), ("current", "save_all")],
)
def test_selective_checkpoint_is_bit_identical_to_no_checkpoint(recipe, policy):
    """Outputs, gradients and (delayed) amax histories and scales after each step are the bits
    of the run without checkpoint; each forward records its amaxes once."""
    if recipe == "delayed":
        recipe = Fp8DelayedScaling(amax_history_len=8)
    reference, _ = _train(recipe, None)
    got, pending = _train(recipe, policy)
    for i, (want, have) in enumerate(zip(reference, got, strict=True)):
        assert torch.equal(want, have), (
            f"tensor {i} differs: max |diff| {(want - have).abs().max()}"
        )
    assert pending == [0, 0, 0], "every queued forward was replayed or released"


def test_blockwise_under_a_policy_that_saves_everything():
    """Block-wise scaling casts through the same clamp: the saved product stays as it was."""
    reference, _ = _train("blockwise", None, dim=128, tokens=128)
    got, _ = _train("blockwise", "save_all", dim=128, tokens=128)
    for i, (want, have) in enumerate(zip(reference, got, strict=True)):
        assert torch.equal(want, have), f"tensor {i} differs"


def test_history_records_one_amax_per_forward():
    """2 steps x 2 micro-batches under the save-everything policy: 4 amaxes in each row of
    the history (a recomputation that recorded its own would leave 8)."""
    recipe = Fp8DelayedScaling(amax_history_len=8)
    model = _model(recipe, 16)
    context_fn = lambda: create_selective_checkpoint_contexts(_save_all)  # noqa: E731
    for step in range(4):
        x = torch.randn(16, 16) * (step + 1)
        checkpoint(model, x, use_reentrant=False, context_fn=context_fn).sum().backward()
    for layer in (model[0], model[2]):
        # Rows: input, weight (recorded in the forward), output gradient (in the backward).
        assert (layer.fp8_amax_history != 0).sum(1).tolist() == [4, 4, 4]
