"""Fp8Linear's delayed-scaling state under activation checkpointing and dtype casts.

A checkpointed forward runs twice, the second time inside the backward pass; the second run
must cast with the scales of the first and leave the amax history alone, so a run with
recompute is bit-identical to one without (outputs, gradients and the state after each step).
The state buffers are fp32 by contract, also after ``model.to(torch.bfloat16)``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from forge_kernels.fp8 import (
    DelayedScalingState,
    Fp8DelayedScaling,
    Fp8Linear,
    fp8_linear_reference,
)

RECIPE = Fp8DelayedScaling(amax_history_len=4)


def _model(*, frozen_first: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        Fp8Linear(32, 48, recipe=RECIPE, gemm="emulate"),
        nn.GELU(),
        Fp8Linear(48, 32, recipe=RECIPE, gemm="emulate"),
    )
    if frozen_first:  # a frozen layer: its forward records no autograd node
        model[0].requires_grad_(False)
    return model


def _fp8_layers(model: nn.Module) -> list[Fp8Linear]:
    return [m for m in model.modules() if isinstance(m, Fp8Linear)]


def _train(mode: str | None, *, frozen_first: bool = False):
    """3 steps of 2 micro-batches each, both forwards before both backwards (as a pipeline
    schedule runs them), then an SGD step; ``mode``: how each micro-batch is checkpointed."""
    model = _model(frozen_first=frozen_first)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    seen = []
    for step in range(3):
        xs = []
        for micro in range(2):
            g = torch.Generator().manual_seed(10 * step + micro)
            x = torch.randn(16, 32, generator=g) * (1 + step + 2 * micro)  # amaxes change
            xs.append(x.requires_grad_(not frozen_first))
        if mode is None:
            ys = [model(x) for x in xs]
        else:
            ys = [checkpoint(model, x, use_reentrant=mode == "reentrant") for x in xs]
        for y in ys:
            y.square().sum().backward()
        seen += [y.detach() for y in ys] + [p.grad.clone() for p in params]
        seen += [x.grad for x in xs if x.grad is not None]
        for layer in _fp8_layers(model):
            seen += [layer.fp8_amax_history.clone(), layer.fp8_scale.clone()]
        opt.step()
        opt.zero_grad()
    return seen, [len(layer._fp8_pending) for layer in _fp8_layers(model)]


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant", "non_reentrant_frozen"])
def test_recompute_is_bit_identical_to_no_recompute(mode):
    """Outputs, gradients, amax histories and scales after each step are the same bits with
    and without ``torch.utils.checkpoint`` (both flavours; a frozen first layer, whose forward
    has no autograd node but is still replayed, with the non-reentrant one). Without the
    replay, the recomputation casts with the scales the forward had already updated and rolls
    the history a second time: the recomputed activations differ and the scales drift."""
    frozen = mode.endswith("_frozen")
    reference, _ = _train(None, frozen_first=frozen)
    got, pending = _train(mode.removesuffix("_frozen"), frozen_first=frozen)
    assert len(got) == len(reference)
    for i, (a, b) in enumerate(zip(reference, got, strict=True)):
        assert torch.equal(a, b), f"tensor {i} differs: max |diff| {(a - b).abs().max()}"
    assert pending == [0, 0], "every queued forward was replayed or released"


def test_only_forwards_a_checkpoint_can_replay_are_queued():
    """Evaluation (``no_grad``, ``inference_mode``) and forwards outside a checkpoint queue
    nothing; a checkpointed forward stays queued until its backward, or until its graph is
    freed without one. A forward that runs inside a backward with nothing queued (a backward
    hook's) is an ordinary forward and updates the state."""
    layer = _model()[0]
    x = torch.randn(8, 32, requires_grad=True)
    with torch.no_grad():
        layer(x)
    with torch.inference_mode():
        layer(x)
    y = layer(x)
    assert len(layer._fp8_pending) == 0
    del y

    y = checkpoint(layer, x, use_reentrant=False)
    assert len(layer._fp8_pending) == 1
    y.sum().backward()
    assert len(layer._fp8_pending) == 0
    y = checkpoint(layer, x, use_reentrant=False)
    del y  # autograd graphs are freed by reference counting
    assert len(layer._fp8_pending) == 0, "a freed graph's forward is dropped"

    history = layer.fp8_amax_history.clone()
    z = x.detach().requires_grad_()

    def forward_in_backward(grad):
        layer(grad)

    z.register_hook(forward_in_backward)
    (z * 1).sum().backward()
    assert not torch.equal(layer.fp8_amax_history, history), "an ordinary forward updates"


def _checked_fp32(layer: Fp8Linear, device: str = "cpu") -> None:
    for buffer in (layer.fp8_amax_history, layer.fp8_scale):
        assert buffer.dtype == torch.float32
        assert buffer.device.type == device


def test_dtype_casts_keep_the_delayed_state_fp32():
    """``.to(bfloat16)``, ``.half()``, ``.bfloat16()``, ``.double()`` cast the parameters and
    leave the delayed-scaling buffers fp32 and bit-unchanged (in bf16 the scales were rounded to
    8 significant bits); a device move still moves them; the forward of the bf16 model casts
    with the fp32 scales; state_dict round trips keep fp32 (a bf16 one is loaded into fp32)."""
    layer = _model()[0]
    for step in range(2):  # scales and amaxes that bf16 cannot hold exactly
        layer(torch.randn(16, 32) * (3.3 + step)).sum().backward()
    history, scale = layer.fp8_amax_history.clone(), layer.fp8_scale.clone()
    assert not torch.equal(scale.bfloat16().float(), scale), "the case must lose bits in bf16"

    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16
    _checked_fp32(layer)
    assert torch.equal(layer.fp8_amax_history, history)
    assert torch.equal(layer.fp8_scale, scale)
    for cast in (nn.Module.half, nn.Module.double, nn.Module.bfloat16):
        cast(layer)
        _checked_fp32(layer)
        assert torch.equal(layer.fp8_scale, scale)

    x = torch.randn(16, 32, dtype=torch.bfloat16) * 3
    state = DelayedScalingState(history.clone(), scale.clone())
    expected = fp8_linear_reference(x, layer.weight, layer.bias, recipe=RECIPE, state=state)
    with torch.no_grad():
        got = layer(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected)
    assert torch.equal(layer.fp8_amax_history, state.amax_history)
    assert torch.equal(layer.fp8_scale, state.scale)

    saved = layer.state_dict()
    fresh = _model()[0].to(torch.bfloat16)
    fresh.load_state_dict(saved)
    _checked_fp32(fresh)
    assert torch.equal(fresh.fp8_scale, layer.fp8_scale)
    old_style = {k: v.bfloat16() if k.startswith("fp8_") else v for k, v in saved.items()}
    fresh.load_state_dict(old_style)  # written before the fix: bf16 buffers
    _checked_fp32(fresh)

    layer.to("meta")
    _checked_fp32(layer, "meta")
    assert layer.weight.device.type == "meta"


def test_fp8_linear_forward_under_checkpoint_uses_fp32_state_after_bf16_cast():
    """The two fixes together: a bf16 model, checkpointed, trains bit-identically to the
    same model without checkpoint, and its state stays fp32."""

    def run(checkpointed: bool):
        model = _model().to(torch.bfloat16)
        x = (torch.randn(16, 32, generator=torch.Generator().manual_seed(1)) * 4).bfloat16()
        outs = []
        for _ in range(2):
            x = x.detach().requires_grad_()
            y = checkpoint(model, x, use_reentrant=False) if checkpointed else model(x)
            F.mse_loss(y.float(), torch.zeros_like(y, dtype=torch.float32)).backward()
            outs += [y.detach(), x.grad] + [p.grad for p in model.parameters()]
            model.zero_grad()
        for layer in _fp8_layers(model):
            _checked_fp32(layer)
            outs += [layer.fp8_amax_history, layer.fp8_scale]
        return outs

    for a, b in zip(run(False), run(True), strict=True):
        assert torch.equal(a, b)


def _nan_to_empty(module: nn.Module) -> nn.Module:
    """``module.to_empty(device="cpu")`` whose memory happens to hold NaN (``torch.empty`` is
    arbitrary: NaN made explicit, so the test is deterministic)."""
    return module._apply(lambda t: torch.full(t.shape, float("nan"), dtype=t.dtype))


def _steps(layer: Fp8Linear) -> list[torch.Tensor]:
    """Outputs, gradients and delayed-scaling state of two training steps."""
    outs = []
    for step in range(2):
        x = torch.randn(16, 32, generator=torch.Generator().manual_seed(step)) * (2 + step)
        y = layer(x.requires_grad_())
        y.square().sum().backward()
        outs += [y.detach(), x.grad, layer.weight.grad, layer.fp8_amax_history.clone()]
        outs.append(layer.fp8_scale.clone())
        layer.zero_grad()
    return outs


@pytest.mark.parametrize("materialize", ["to_empty+reset_parameters", "to_empty"])
def test_meta_built_delayed_linear_materializes_to_the_fresh_state(materialize):
    """A delayed-scaling Fp8Linear built on the meta device (FSDP2, ``forge_models``' meta
    builds) and materialized trains exactly as one built on the CPU with the same weights:
    ``reset_parameters`` resets the scaling state with the weights, and leaving the meta
    device starts it fresh even where only the weights are initialized afterwards (a model's
    ``init_weights`` by parameter name, a Hugging Face checkpoint without the buffers)."""
    eager = _model()[0]
    with torch.device("meta"):
        layer = Fp8Linear(32, 48, recipe=RECIPE, gemm="emulate")
    assert layer.fp8_scale.is_meta
    if materialize == "to_empty":
        _nan_to_empty(layer)  # the scaling state is fresh straight away
    else:
        layer.to_empty(device="cpu")
        with torch.no_grad():
            for buffer in (layer.fp8_amax_history, layer.fp8_scale):
                buffer.fill_(float("nan"))  # arbitrary to_empty memory, made explicit
        layer.reset_parameters()
    _checked_fp32(layer)
    assert torch.equal(layer.fp8_scale, torch.ones(3))
    assert torch.equal(layer.fp8_amax_history, torch.zeros(3, RECIPE.amax_history_len))
    with torch.no_grad():  # the weights as a model's init_weights / a checkpoint writes them
        layer.weight.copy_(eager.weight)
        layer.bias.copy_(eager.bias)
    got, expected = _steps(layer), _steps(eager)
    assert all(t.isfinite().all() for t in got)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_reset_fp8_state_restarts_delayed_scaling_in_place():
    """``reset_fp8_state`` writes the buffers in place (a TP-replicated DTensor buffer, or a
    reference held elsewhere, sees it) and is a no-op for recipes without state."""
    layer = _model()[0]
    _steps(layer)
    history, scale = layer.fp8_amax_history, layer.fp8_scale
    assert not torch.equal(scale, torch.ones(3))
    layer.reset_fp8_state()
    assert layer.fp8_amax_history is history
    assert layer.fp8_scale is scale
    assert torch.equal(scale, torch.ones(3))
    assert not history.any()
    Fp8Linear(32, 48, recipe="current").reset_fp8_state()  # no buffers: nothing to do
