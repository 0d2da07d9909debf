"""``kept_for_backward`` counts what the autograd graph holds, nothing created before the call
and nothing the graph frees."""

from __future__ import annotations

import torch

from forge_parallel import kept_for_backward
from forge_parallel.memory_probe import CreatedStorages


def test_counts_saved_activations_not_parameter_views():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(8, 64, requires_grad=True)
    # matmul saves x and the weight's transpose (a view of a parameter: no new memory)
    assert kept_for_backward(linear, x) == x.nbytes
    # relu saves its output, the 8 x 32 activation; the linear output it consumed is freed
    assert kept_for_backward(lambda t: linear(t).relu(), x) == x.nbytes + 8 * 32 * 4
    # sum saves nothing of its input: exp's output stays (exp saves its result)
    assert kept_for_backward(lambda t: t.exp().sum(), x) == 2 * x.nbytes
    # nothing requires grad in the call: no graph, only the argument
    assert kept_for_backward(lambda t: (t.detach() * 2).relu(), x) == x.nbytes


def test_probe_excludes_the_outputs_and_filters_devices():
    x = torch.randn(16, 16, requires_grad=True)
    with CreatedStorages() as probe:
        y = x.sin()  # saves x (not created here)
        z = y.cos()  # saves y
    assert probe.alive_bytes() == 2 * y.nbytes  # y and z, both alive
    assert probe.alive_bytes(exclude=(z,)) == y.nbytes
    assert probe.alive_bytes(device="meta") == 0
    del z
    assert probe.alive_bytes(include=x) == 2 * x.nbytes  # x and y (held here); z freed
