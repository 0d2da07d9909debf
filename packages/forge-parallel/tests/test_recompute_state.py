"""A recomputed forward updates no module state a second time, and reads the state its forward
read: BatchNorm's running statistics and ``num_batches_tracked``, a user's buffers written in
place or reassigned, a Python counter, FP8 delayed-scaling histories. Under every recompute
mode, buffers, outputs and gradients equal those of the model without recompute, bit for bit
(``torch.utils.checkpoint`` alone replays the writes: ``num_batches_tracked`` counts two
batches per step, and a forward that reads its updated counter is recomputed from the next
value, so the gradients change too)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from forge_kernels.fp8 import Fp8Linear
from forge_parallel import RecomputeConfig, apply_recompute


class _Body(nn.Module):
    """State updated in the forward every way a user's block does: BatchNorm, a counter
    buffer written in place and read afterwards (a replay that started from the updated value
    would compute other outputs), an EMA buffer reassigned, a Python counter read afterwards,
    FP8 delayed scaling (which handles its own replay: its history must come back once)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fp8 = Fp8Linear(dim, dim, recipe="delayed", gemm="emulate")
        self.norm = nn.BatchNorm1d(dim)
        self.register_buffer("seen", torch.zeros(()))
        self.register_buffer("ema", torch.zeros(dim))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.seen.add_(1)
        self.ema = 0.5 * self.ema + x.detach().mean(0)
        h = torch.relu(self.norm(self.fp8(x)))
        return h * (self.seen + 1) + h * self.calls + self.ema


class _Block(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.body = _Body(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.proj(x)) + x


def _train(model: nn.Module, steps: int = 2, micro_batches: int = 2):
    """``steps`` steps of ``micro_batches`` forwards, then their backwards in the same order
    (as a pipeline schedule runs them): the state a later micro-batch's forward changed must
    survive the earlier one's recomputation, which starts from the state its forward saw."""
    generator = torch.Generator().manual_seed(1)
    outs = []
    for _ in range(steps):
        losses = []
        for _ in range(micro_batches):
            out = model(torch.randn(32, 16, generator=generator))
            losses.append(out.square().mean())
            outs.append(out.detach())
        for loss in losses:
            loss.backward()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return outs, buffers, grads, [block.body.calls for block in model]


_CONFIGS = {
    "full": RecomputeConfig(mode="full"),
    "pointwise": RecomputeConfig(mode="selective", ops="pointwise"),
    # No attention child: the policy saves every output but the attention core's, in-place
    # writes into module state included, which PyTorch's cache cannot hold.
    "attention": RecomputeConfig(mode="selective"),
    "modules": RecomputeConfig(mode="selective", modules=("body",)),
    "modules-pointwise": RecomputeConfig(mode="selective", modules=("body",), ops="pointwise"),
    "auto-full": RecomputeConfig(mode="auto", memory_budget=0),
    "auto-selective": RecomputeConfig(mode="auto", memory_budget=3000),
    "auto-modules": RecomputeConfig(mode="auto", memory_budget=4400),
}


@pytest.mark.parametrize("mode", list(_CONFIGS))
def test_recompute_updates_state_once(mode):
    torch.manual_seed(0)
    reference = nn.Sequential(_Block(), _Block())
    model = copy.deepcopy(reference)
    applied = apply_recompute(list(model.named_children()), _CONFIGS[mode])

    want_outs, want_buffers, want_grads, want_calls = _train(reference)
    outs, buffers, grads, calls = _train(model)

    if mode.startswith("auto"):
        kinds = {block.forward.choice.kind for block in model}
        assert kinds == {mode.removeprefix("auto-")}, kinds
    else:
        assert applied
    assert calls == want_calls
    for name, value in want_buffers.items():
        torch.testing.assert_close(buffers[name], value, rtol=0, atol=0, msg=name)
    for got, want in zip(outs, want_outs, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for name, value in want_grads.items():
        torch.testing.assert_close(grads[name], value, rtol=0, atol=0, msg=name)


def test_replay_twice_with_retained_graph():
    """A graph back-propagated twice is recomputed twice, from the same state both times."""
    torch.manual_seed(0)
    reference = nn.Sequential(_Block())
    model = copy.deepcopy(reference)
    apply_recompute(list(model.named_children()), RecomputeConfig(mode="full"))
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    for m in (reference, model):
        loss = m(x).square().mean()
        loss.backward(retain_graph=True)
        loss.backward()
    for (name, want), got in zip(reference.named_buffers(), model.buffers(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    for (name, want), got in zip(reference.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=0, msg=name)


def test_no_grad_forward_tracks_nothing():
    """Evaluation (no grad) checkpoints nothing, so it copies no state either."""
    model = nn.Sequential(_Block())
    apply_recompute(list(model.named_children()), RecomputeConfig(mode="full"))
    with torch.no_grad():
        model(torch.randn(4, 16))
    assert model[0].body.seen.item() == 1
    assert model[0].body.norm.num_batches_tracked.item() == 1
