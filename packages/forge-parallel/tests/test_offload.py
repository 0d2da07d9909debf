"""Activation offload: exact gradients, and the saved activations really leave the device."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from forge_core.testing import import_path
from forge_parallel import RecomputeConfig, parallelize
from forge_parallel.config import OffloadConfig

tm = import_path(Path(__file__).with_name("tiny_models.py"), "forge_parallel_tests_tiny_models")


def _step(model, inputs):
    model.zero_grad()
    loss = model(inputs).logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(reference, got):
    torch.testing.assert_close(got[0], reference[0], rtol=0, atol=0)
    for name, grad in reference[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=0, atol=0, msg=name)


def test_offload_exact_and_moves_saved_activations_on_cpu():
    reference = tm.build_tiny(dim=32, n_layers=2)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    expected = _step(reference, tokens)

    model = copy.deepcopy(reference)
    _, summary = parallelize(model, offload=OffloadConfig(min_bytes=1024))
    assert summary.row("layers.0").recompute == "offload to CPU"
    offload = model.layers[0]._forge_offload
    for _ in range(2):  # a second pass starts new groups
        _assert_same(expected, _step(model, tokens))
    stats = offload.stats
    # Every large activation went to a host buffer and came back once; the weights stayed.
    assert stats.offloaded > 0
    assert stats.reloaded == stats.offloaded
    assert stats.prefetched > 0  # layer 1's backward started layer 0's copies
    assert stats.offloaded_bytes > 4 * stats.kept_bytes
    per_pass = stats.offloaded_bytes // 2
    activation = 2 * 16 * 32 * 4  # one (B, S, D) float32 activation
    assert per_pass >= 2 * 4 * activation  # several activations per block and block

    # With full recompute only the block inputs are kept, so only they are offloaded.
    model = copy.deepcopy(reference)
    parallelize(model, recompute=RecomputeConfig(mode="full"), offload=OffloadConfig())
    _assert_same(expected, _step(model, tokens))
    stats = model.layers[0]._forge_offload.stats
    assert stats.offloaded == 2
    assert stats.offloaded_bytes == 2 * activation
    assert stats.reloaded == 2


def test_offload_config_errors():
    with pytest.raises(ValueError, match="min_bytes must be >= 0"):
        OffloadConfig(min_bytes=-1)
    with pytest.raises(ValueError, match="prefetch"):
        OffloadConfig(prefetch="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offload_on_gpu_frees_device_memory_and_overlaps():
    device = torch.device("cuda")
    reference = tm.build_tiny(dim=256, n_layers=4, n_heads=4, n_kv_heads=4, ffn=1024).to(device)
    tokens = torch.randint(0, 64, (8, 512), device=device)
    expected = _step(reference, tokens)

    def activation_bytes(model):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        loss = model(tokens).logsumexp(-1).mean()
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - base
        loss.backward()
        return held

    plain = activation_bytes(copy.deepcopy(reference))
    model = copy.deepcopy(reference)
    parallelize(model, offload=OffloadConfig())
    offloaded = activation_bytes(model)
    assert offloaded < 0.5 * plain, (offloaded, plain)
    _assert_same(expected, _step(model, tokens))
    stats = model.layers[0]._forge_offload.stats
    assert stats.prefetched > 0
    assert stats.reloaded == stats.offloaded


class _SharedInput(torch.nn.Module):
    """q, k and v read one normed activation (as a reshaped view too); with ``in_place`` the
    block then writes into an activation it saved and saves it again."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.in_place = in_place
        self.norm = torch.nn.LayerNorm(32)
        self.q, self.k, self.v = (torch.nn.Linear(32, 32) for _ in range(3))
        self.w = torch.nn.Parameter(torch.randn(32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        out = self.q(h) * self.k(h).sigmoid() + self.v(h.reshape(-1, 32)).view_as(h)
        g = out * 1.5
        first = g * self.w  # saves g
        if self.in_place:
            g.mul_(2)  # a new version of g: saving it again must copy it again
        else:
            g = g * 2
        return first + g * self.w.flip(0)


class _Stack(torch.nn.Module):
    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(_SharedInput(in_place) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_offload_copies_each_saved_activation_once():
    torch.manual_seed(0)
    reference = _Stack(in_place=False)
    x = torch.randn(2, 16, 32)
    expected = _step(reference, x)
    model = _Stack(in_place=True)
    model.load_state_dict(reference.state_dict())
    parallelize(model, blocks="layers.*", offload=OffloadConfig(min_bytes=1024))
    for _ in range(2):
        _assert_same(expected, _step(model, x))
    stats = model.layers[0]._forge_offload.stats
    activation = 2 * 16 * 32 * 4  # h's 2-D views are the same bytes
    # Per block and pass, 9 activations saved: the normed h by q, k and v (one copy, two
    # shared), the sigmoid's output by the sigmoid and the product (one shared); g before and
    # after the in-place write (two copies: different versions). Shared bytes move no data.
    assert stats.shared == 3 * 2 * 2
    assert stats.offloaded == 6 * 2 * 2
    assert stats.shared_bytes == stats.shared * activation
    assert stats.reloaded == stats.offloaded


class _Wrapped(torch.Tensor):
    """A wrapper tensor subclass (as float8 tensors are): offload must keep it as it is."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> _Wrapped:
        return torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, dtype=inner.dtype, requires_grad=inner.requires_grad
        )

    def __init__(self, inner: torch.Tensor) -> None:
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = torch.utils._pytree.tree_map_only(cls, lambda t: t.inner, (args, kwargs or {}))
        out = func(*unwrap[0], **unwrap[1])
        return torch.utils._pytree.tree_map_only(torch.Tensor, cls, out)


class _WrappedBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        wrapped = _Wrapped(h.detach()).requires_grad_()  # saved by sigmoid as a _Wrapped
        gate = wrapped.sigmoid()
        return h * gate.inner.detach() + torch.tanh(h)


def test_offload_keeps_tensor_subclasses_on_the_device():
    torch.manual_seed(0)
    reference = torch.nn.Sequential(_WrappedBlock(), _WrappedBlock())
    x = torch.randn(4, 16, 32)
    expected = _step(reference, x)
    model = copy.deepcopy(reference)
    parallelize(model, blocks="*", offload=OffloadConfig(min_bytes=1024))
    _assert_same(expected, _step(model, x))
    stats = model[0]._forge_offload.stats
    assert stats.kept_subclasses == 2  # the sigmoid's _Wrapped output, one per block
    assert stats.offloaded > 0  # the plain activations still moved
