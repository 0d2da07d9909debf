"""Automatic recomputation measures each block with one extra forward on its first call: that
forward must leave no trace in the block's state (running statistics, FP8 delayed-scaling
histories, counters), or the first step updates it twice."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from forge_kernels.fp8 import Fp8Linear
from forge_parallel import RecomputeConfig, apply_recompute
from forge_parallel.auto_recompute import measure_block, written_tensors


class _StatefulBlock(nn.Module):
    """Updates state in its forward every way a block can: BatchNorm's running statistics
    (an op whose schema does not mark the write) and ``num_batches_tracked`` (``add_``), an
    FP8 delayed-scaling amax history, a buffer written through ``.data``, a Python counter."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.fp8 = Fp8Linear(dim, dim, recipe="delayed", gemm="emulate")
        self.norm = nn.BatchNorm1d(dim)
        self.register_buffer("seen", torch.zeros(2))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.seen.data[0] += 1
        self.seen[1:].add_(x.detach().abs().sum())
        return torch.relu(self.norm(self.fp8(x))) + x


def _step_state(model: nn.Module, x: torch.Tensor, steps: int = 2):
    outs = []
    for _ in range(steps):
        out = model(x)
        out.square().mean().backward()
        outs.append(out.detach())
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return outs, buffers, grads, [m.calls for m in model]


@pytest.mark.parametrize(
    ("budget", "kind", "same_as"), [(10**9, "none", "none"), (0, "full", "full")]
)
def test_first_step_updates_state_once(budget, kind, same_as):
    torch.manual_seed(0)
    reference = nn.Sequential(_StatefulBlock(), _StatefulBlock())
    model = copy.deepcopy(reference)
    if same_as != "none":  # the mode auto chooses, applied directly: no measurement
        apply_recompute(list(reference.named_children()), RecomputeConfig(mode=same_as))
    config = RecomputeConfig(mode="auto", memory_budget=budget)
    apply_recompute(list(model.named_children()), config)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))

    want_outs, want_buffers, want_grads, want_calls = _step_state(reference, x)
    outs, buffers, grads, calls = _step_state(model, x)

    assert [block.forward.choice.kind for block in model] == [kind, kind]
    assert calls == want_calls
    for name, value in want_buffers.items():
        torch.testing.assert_close(buffers[name], value, rtol=0, atol=0, msg=name)
    for got, want in zip(outs, want_outs, strict=True):  # FP8 casts used the same scales
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for name, value in want_grads.items():
        torch.testing.assert_close(grads[name], value, rtol=0, atol=0, msg=name)
    # The measured forward's FP8 scales were released with its graph: none wait for a replay.
    assert all(not block.fp8.__dict__.get("_fp8_pending") for block in model)


def test_overlapping_writes_into_an_input_are_undone():
    """Views written in place, overlapping and more than once: the old values come back."""
    buf = torch.arange(6.0)
    weight = torch.ones(6, requires_grad=True)

    def block(x: torch.Tensor) -> torch.Tensor:
        x[1:4].mul_(10)
        x[2:6].add_(1)
        x.data[0] = -1
        torch.add(x[:2], 5, out=x[4:6])
        return (x * weight).sum()

    measure_block(block, buf)
    torch.testing.assert_close(buf, torch.arange(6.0), rtol=0, atol=0)


@pytest.mark.parametrize("op", ["native_batch_norm", "cudnn_batch_norm", "miopen_batch_norm"])
def test_batch_norm_running_statistics_count_as_written(op):
    """nn.BatchNorm's ops (CPU: native, CUDA: cuDNN) update the running statistics without
    their schemas saying so; only in training."""
    mean, var, x = torch.zeros(3), torch.ones(3), torch.randn(4, 3)
    func = getattr(torch.ops.aten, op).default
    training = written_tensors(func, (x, torch.ones(3), None, mean, var, True, 0.1, 1e-5), {})
    assert [t is mean for t in training] == [True, False]
    assert [t is var for t in training] == [False, True]
    assert written_tensors(func, (x, torch.ones(3), None, mean, var, False, 0.1, 1e-5), {}) == []
