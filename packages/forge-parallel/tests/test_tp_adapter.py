"""The ``adapter:`` tensor-parallel styles (:mod:`forge_parallel.tp_adapter`): low-rank adapters
on column-parallel (plain and packed) and row-parallel layers give one process's outputs and
gradients at TP2, with and without sequence parallelism, and frozen weights stay frozen."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from forge_parallel import TPPlan, align_grads, apply_tp

DIM, HIDDEN, RANK, BATCH, SEQ = 8, 12, 2, 2, 6


class Adapted(nn.Module):
    """A LoRA-style wrapper: ``base(x) + 0.5 * x A^T B^T`` (``A`` and ``B`` random, so that
    every gradient is non-zero)."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.randn(RANK, base.in_features))
        self.lora_B = nn.Parameter(torch.randn(base.out_features, RANK))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + 0.5 * (x @ self.lora_A.t() @ self.lora_B.t())


class Block(nn.Module):
    """A SwiGLU MLP with a fused ``[gate; up]`` projection plus a parallel plain projection."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up = Adapted(nn.Linear(DIM, 2 * HIDDEN))
        self.proj = Adapted(nn.Linear(DIM, HIDDEN))
        self.down = Adapted(nn.Linear(HIDDEN, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up + self.proj(x))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(DIM)
        self.block = Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.norm(x))


_PLAN = {
    "norm": "sequence_parallel",
    "block": "block_input",
    "block.gate_up": "adapter:colwise_packed",
    "block.proj": "adapter:colwise",
    "block.down": "adapter:rowwise",
}


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    align_grads(model.parameters())
    return {
        name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
        for name, p in model.named_parameters()
        if p.grad is not None
    }


def _adapters_match_one_process() -> list[str]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2,))
    rank = dist.get_rank()
    torch.manual_seed(0)
    reference = Model()
    x = torch.randn(BATCH, SEQ, DIM)
    weight = torch.randn(BATCH, SEQ, DIM)  # the loss's weights on the outputs
    checked = []
    for sp in (False, True):
        for frozen in (False, True):
            single = copy.deepcopy(reference)
            for name, p in single.named_parameters():
                p.requires_grad_(not frozen or "lora" in name)
            model = copy.deepcopy(single)
            apply_tp(model, mesh, TPPlan(styles=_PLAN, sequence_parallel=sp))
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            assert trainable == {n for n, p in single.named_parameters() if p.requires_grad}
            (single(x) * weight).sum().backward()
            if sp:  # each rank its sequence shard in and out
                part = slice(rank * SEQ // 2, (rank + 1) * SEQ // 2)
                out = model(x[:, part].contiguous())
                (out * weight[:, part]).sum().backward()
                torch.testing.assert_close(out, single(x)[:, part], rtol=1e-5, atol=1e-5)
            else:
                out = model(x)
                (out * weight).sum().backward()
                torch.testing.assert_close(out, single(x), rtol=1e-5, atol=1e-5)
            expected, got = _grads(single), _grads(model)
            assert got.keys() == expected.keys(), (sorted(got), sorted(expected))
            for name, grad in expected.items():
                torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-5, msg=name)
            checked.append(f"sp={sp} frozen={frozen}: {len(got)} gradients")
    return checked


def test_adapters_on_split_linears_match_one_process(dist_pool):
    results = dist_pool(2).run(_adapters_match_one_process)
    assert results[0] == results[1]
    assert len(results[0]) == 4
    assert results[0][0].endswith(": 13 gradients")  # the norm's, 3 x (weight, bias, A, B)
    assert results[0][1].endswith(": 6 gradients")  # the adapters alone


def test_adapter_style_errors():
    from forge_parallel.tensor_parallel import validate_tp

    model = Model()
    with pytest.raises(ValueError, match=r"'adapter:colwise' needs a wrapper whose 'base' is"):
        validate_tp(model, {"norm": "adapter:colwise"}, 2)
    with pytest.raises(ValueError, match="unknown tensor-parallel style 'adapter:replicate'"):
        TPPlan(styles={"block.proj": "adapter:replicate"})
    with pytest.raises(
        ValueError, match=r"tp=8 does not divide out_features=12 of block.proj.base"
    ):
        validate_tp(model, {"block.proj": "adapter:colwise"}, 8)
    # Under sequence parallelism an adapted column-parallel layer needs its block's gathered
    # input, like a plain one.
    with pytest.raises(ValueError, match=r"block.proj \(adapter:colwise\) would receive"):
        validate_tp(
            model, TPPlan(styles={"block.proj": "adapter:colwise"}, sequence_parallel=True), 2
        )
