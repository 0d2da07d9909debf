"""Single-process edge cases: activation offload with several micro-batches in flight, the
heterogeneous batch boundary refusing outputs that are not batch-major, and configs whose
settings would be silently ignored (R15 items 5-8)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from forge_parallel import CompileConfig, FSDPConfig, OffloadConfig, RecomputeConfig, parallelize
from forge_parallel.heterogeneous import _check_batch_major, _install_boundary, _split_rows


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(64, 64), nn.Tanh()) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_offload_two_micro_batches_in_flight_prefetch_their_own_copies():
    """Pipeline 1F1B order F1 F2 B1 B2: backward of micro-batch 1 prefetches its own earlier
    blocks, never micro-batch 2's copies (R15: 4 of mb2's 6 came back during B1)."""
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(32, 64, generator=gen) for _ in range(2)]
    reference = _Stack()
    for x in batches:
        reference(x).sum().backward()

    model = copy.deepcopy(reference)
    model.zero_grad()
    parallelize(model, offload=OffloadConfig(min_bytes=0))
    offload = model.layers[0]._forge_offload
    out1 = model(batches[0])
    groups1 = offload._groups
    out2 = model(batches[1])
    groups2 = offload._groups
    assert groups1 is not groups2
    copies2 = [c for g in groups2 for c in g.copies]
    assert len(copies2) == 6  # per block: the Linear's input, the Tanh's output

    out1.sum().backward()
    assert sum(c.reloaded is not None for c in copies2) == 0  # mb2 stays on the host
    # mb1's blocks 1 and 0 (2 copies each) were prefetched by blocks 2 and 1, and are back.
    assert offload.stats.prefetched == 4
    assert offload.stats.reloaded == 6
    assert all(c.users == 0 for g in groups1 for c in g.copies)

    out2.sum().backward()
    assert offload.stats.prefetched == 8
    assert offload.stats.reloaded == 12
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


def test_boundary_split_rows_error_names_the_numbers():
    torch.testing.assert_close(_split_rows(torch.arange(6), 2, 1), torch.tensor([3, 4, 5]))
    with pytest.raises(ValueError, match=r"\(3,\) tensor has 3 rows.*2 ranks.*3 % 2 = 1"):
        _split_rows(torch.zeros(3), 2, 0)


def test_boundary_check_batch_major():
    _check_batch_major(torch.zeros(8, 5), {8}, 2)  # batch-major: split
    _check_batch_major(torch.zeros(4), {8, 4}, 2)  # a second input's row count
    with pytest.raises(ValueError, match=r"\(6,\) tensor whose dim 0 \(6\).*gathered on entry \(8"):
        _check_batch_major(torch.zeros(6), {8}, 2)
    with pytest.raises(ValueError, match="batch_boundary=False"):
        _check_batch_major(torch.zeros(3), set(), 2)


class _AuxPart(nn.Module):
    """Returns its batch-major rows and a per-feature statistic of ``aux`` elements."""

    def __init__(self, aux: int) -> None:
        super().__init__()
        self.fc, self.aux = nn.Linear(8, 8), aux

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.fc(x)
        return h, h.mean(0)[: self.aux], h.sum()


@pytest.mark.parametrize("aux", [6, 3])
def test_boundary_refuses_outputs_that_are_not_batch_major(fake_pg, aux):
    """A tp=2 part returning a [6] statistic: each rank silently got a different [3] slice
    (R15), a [3] one raised a bare AssertionError; both are a ValueError naming the shape now.
    Shapes only: the fake process group gathers this rank's rows twice."""
    with fake_pg(world_size=2, rank=1):
        part = _AuxPart(aux)
        _install_boundary(part, dist.group.WORLD)
        part.aux = 8  # batch-major by coincidence of length: split like the rows
        h, stat, total = part(torch.randn(4, 8))
        assert h.shape == (4, 8)
        assert stat.shape == (4,)
        assert total.ndim == 0
        part.aux = aux
        with pytest.raises(ValueError, match=rf"returned a \({aux},\) tensor.*batch_boundary"):
            part(torch.randn(4, 8))


@pytest.mark.parametrize(
    ("ops", "message"),
    [
        (("aten.softmax",), r"CompositeImplicitAutograd.*never matches; it runs 'aten._softmax'"),
        (("aten.scaled_dot_product_attention",), r"runs 'aten._scaled_dot_product_flash_att"),
        (("aten.linear",), r"decomposed.*'aten.mm', 'aten.addmm'"),
        (("silu",), r"'silu' has no namespace.*did you mean 'aten.silu'\?"),
        (("aten.sliu",), r"no op torch.ops.aten.sliu; did you mean 'aten.silu'"),
        (("aten.silu.default",), r"without overload.*use 'aten.silu'"),
        (("aten._softmax", "aten::silu"), r"'aten::silu'.*use 'aten.silu'"),
    ],
)
def test_recompute_op_names_that_never_match_are_refused(ops, message):
    """R15: each of these recomputed nothing and kept every op's output (+54% memory)."""
    with pytest.raises(ValueError, match=message):
        RecomputeConfig(mode="selective", ops=ops)


def test_recompute_op_names_that_match_stay_valid():
    ops = ("aten._softmax", "aten.silu", "aten.mm", "aten.native_layer_norm", "aten.gelu")
    RecomputeConfig(mode="selective", ops=ops)
    RecomputeConfig(mode="selective", ops=("aten._fused_rms_norm",))  # a CUDA kernel exists
    RecomputeConfig(mode="selective", ops=("_c10d_functional.all_reduce", "mylib.op"))


def test_settings_that_would_be_ignored_are_refused():
    with pytest.raises(ValueError, match="ops='pointwise' is ignored by mode='auto'"):
        RecomputeConfig(mode="auto", memory_budget=1 << 20, ops="pointwise")
    with pytest.raises(ValueError, match=r"modules=\('mlp',\) is ignored by mode='auto'"):
        RecomputeConfig(mode="auto", memory_budget=1 << 20, modules=("mlp",))
    with pytest.raises(ValueError, match="budget_scope='total' shares out mode='auto'"):
        RecomputeConfig(mode="full", budget_scope="total")
    with pytest.raises(ValueError, match="budget_scope must be 'block' or 'total'"):
        RecomputeConfig(mode="selective", budget_scope="everything")
    with pytest.raises(ValueError, match="every must be a positive integer"):
        RecomputeConfig(mode="full", every=True)
    with pytest.raises(ValueError, match="cpu_offload must be True or False, got 'yes'"):
        FSDPConfig(cpu_offload="yes")
    with pytest.raises(ValueError, match="fullgraph must be True or False, got 'no'"):
        CompileConfig(fullgraph="no")
    with pytest.raises(ValueError, match="dynamic must be True, False or None"):
        CompileConfig(dynamic=1)
    with pytest.raises(ValueError, match="backend must be"):
        CompileConfig(backend="")
    # What stays valid: the forms forge-train and the tests build.
    RecomputeConfig(mode="auto", memory_budget=0, budget_scope="total")
    RecomputeConfig(mode="full", every=2)
    RecomputeConfig(mode="selective", modules=("mlp",), ops=("aten.silu",))
    FSDPConfig(cpu_offload=True, reshard_after_forward=False)
    CompileConfig(backend="aot_eager", fullgraph=True, dynamic=False)
