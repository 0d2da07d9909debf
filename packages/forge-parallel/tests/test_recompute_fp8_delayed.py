"""Every recompute mode over blocks of FP8 delayed-scaling linears (forge-kernels'
``Fp8Linear(recipe="delayed")``) gives the outputs, gradients, amax histories and scales of the
model without recompute, bit for bit, with one amax recorded per forward.

The selective policies (the presets, op names, auto's per-op choice) run under PyTorch's SAC
cache, keyed by ``(op, n-th call of that op)``; a delayed-scaling recomputation skips the
forward's history update, so the update is kept out of the cache's sight
(``forge_kernels.fp8.quantize``), or every later call of the ops it uses is looked up one key
off: "result type Float can't be cast to the desired output type bool" in the replay. Auto's
measurement, which sees ops as that cache does, then puts the history back itself.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from forge_kernels.fp8 import Fp8DelayedScaling, Fp8Linear
from forge_parallel import RecomputeConfig, parallelize
from forge_parallel.auto_recompute import measure_block

_RECIPE = Fp8DelayedScaling(amax_history_len=8)
_DIM = 16


def _fp8(in_features: int, out_features: int) -> Fp8Linear:
    return Fp8Linear(in_features, out_features, recipe=_RECIPE, gemm="emulate")


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = _fp8(_DIM, 4 * _DIM), _fp8(4 * _DIM, _DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(x)))


class _Block(nn.Module):
    """Three FP8 linears and pointwise ops between them: a skipped history update shifts the
    keys of the later casts' ops (``mul``, ``_to_copy``) and of the block's own."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.mlp = _fp8(_DIM, _DIM), _Mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(x)) + x
        return self.mlp(h) * h + h


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _fp8_layers(model: nn.Module) -> list[Fp8Linear]:
    return [m for m in model.modules() if isinstance(m, Fp8Linear)]


def _train(model: nn.Module, steps: int = 2, micro_batches: int = 2):
    """``steps`` steps of ``micro_batches`` forwards, then their backwards in the same order
    (a pipeline schedule's): each recomputation casts with its own forward's scales."""
    generator = torch.Generator().manual_seed(1)
    seen = []
    for step in range(steps):
        losses = []
        for micro in range(micro_batches):
            x = torch.randn(16, _DIM, generator=generator) * (1 + step + 2 * micro)
            out = model(x)
            losses.append(out.square().mean())
            seen.append(out.detach())
        for loss in losses:
            loss.backward()
        seen += [b.clone() for b in model.buffers()]  # amax histories and scales
    seen += [p.grad.clone() for p in model.parameters()]
    return seen


_CONFIGS = {
    "full": RecomputeConfig(mode="full"),
    # No attention child: the policy saves every op's output but the attention core's.
    "attention": RecomputeConfig(mode="selective"),
    "pointwise": RecomputeConfig(mode="selective", ops="pointwise"),
    "ops": RecomputeConfig(mode="selective", ops=("aten.gelu", "aten.tanh")),
    "modules": RecomputeConfig(mode="selective", modules=("mlp",)),
    "modules-pointwise": RecomputeConfig(mode="selective", modules=("mlp",), ops="pointwise"),
    "auto-full": RecomputeConfig(mode="auto", memory_budget=0),
    "auto-selective": RecomputeConfig(mode="auto", memory_budget=6000),
    "auto-modules": RecomputeConfig(mode="auto", memory_budget=15100),
}


@pytest.mark.parametrize("mode", list(_CONFIGS))
def test_delayed_fp8_recompute_is_bit_identical(mode):
    torch.manual_seed(0)
    reference = _Model()
    model = copy.deepcopy(reference)
    parallelize(model, recompute=_CONFIGS[mode])

    want = _train(reference)
    got = _train(model)

    if mode.startswith("auto"):
        kinds = {block.forward.choice.kind for block in model.layers}
        assert kinds == {mode.removeprefix("auto-")}, kinds
    for i, (a, b) in enumerate(zip(want, got, strict=True)):
        assert torch.equal(a, b), f"tensor {i} differs: max |diff| {(a - b).abs().max()}"
    for layer in _fp8_layers(model):
        # 2 steps x 2 micro-batches: 4 amaxes per row (input, weight, output gradient).
        assert (layer.fp8_amax_history != 0).sum(1).tolist() == [4, 4, 4]
        assert not layer.__dict__.get("_fp8_pending"), "a forward waits for a replay"


def test_auto_measurement_leaves_the_history_alone():
    """Auto's measuring forward records amaxes outside its dispatch mode (as under the SAC
    cache): it puts the block's buffers back itself."""
    torch.manual_seed(0)
    block = _Block()
    before = {name: b.clone() for name, b in block.named_buffers()}
    measure_block(block, torch.randn(16, _DIM))
    for name, b in block.named_buffers():
        assert torch.equal(b, before[name]), name
    assert not any(layer.__dict__.get("_fp8_pending") for layer in _fp8_layers(block))


class _ResetOnFlag(nn.Module):
    """Re-initializes on the forward after ``fresh`` is set: the FP8 state of ``first``
    (``reset_fp8_state``, as after materialization) and a buffer drawn at random. A recomputation
    runs from the state and flag its forward started from (forge's replay), so it re-runs the
    reset: it must give the forward's results, not other ones."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = _fp8(_DIM, _DIM), _fp8(_DIM, _DIM)
        self.register_buffer("noise", torch.zeros(_DIM))
        self.fresh = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fresh:
            self.first.reset_fp8_state()
            self.noise.normal_()
            self.fresh = False
        return self.second(torch.tanh(self.first(x)) + self.noise) + x


@pytest.mark.parametrize("mode", ["full", "attention", "auto-selective"])
def test_reset_on_flag_is_recomputed_as_it_ran(mode):
    """The flag is set again before the second step: its first micro-batch resets, its
    second does not; both are recomputed after both forwards."""
    torch.manual_seed(0)
    reference = nn.Sequential(_ResetOnFlag(), _ResetOnFlag())
    model = copy.deepcopy(reference)
    config = RecomputeConfig(mode="auto", memory_budget=3000) if mode == "auto-selective" else None
    parallelize(model, recompute=config or _CONFIGS[mode], blocks="*")
    results = []
    for m in (reference, model):
        torch.manual_seed(5)
        generator = torch.Generator().manual_seed(1)
        seen = []
        for step in range(2):
            for block in m:
                block.fresh = step == 1 or block.fresh
            outs = [m(torch.randn(16, _DIM, generator=generator)) for _ in range(2)]
            for out in outs:
                out.square().mean().backward()
            seen += [out.detach() for out in outs] + [b.clone() for b in m.buffers()]
        results.append(seen + [p.grad.clone() for p in m.parameters()])
    if mode == "auto-selective":
        assert {block.forward.choice.kind for block in model} == {"selective"}
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        assert torch.equal(a, b), f"tensor {i} differs: max |diff| {(a - b).abs().max()}"
