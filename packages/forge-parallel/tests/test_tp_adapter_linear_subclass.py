"""The ``adapter:`` styles around a base that overrides ``nn.Linear.forward`` (as forge_kernels'
``Fp8Linear`` does): the base runs on its ``DTensor`` parameters and input, so a forward that
needs a whole-tensor statistic (here the weight's largest magnitude, as an FP8 linear's
per-tensor amax) gets one process's value; on plain local shards each rank would use its own
shard's and the outputs would differ."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from forge_parallel import TPPlan, align_grads, apply_tp

DIM, HIDDEN, RANK, BATCH, SEQ = 8, 12, 2, 2, 6


class MaxScaledLinear(nn.Linear):
    """``x (W / max|W|)^T + b``: a statistic over the whole weight, like a per-tensor FP8
    scale. Records whether it ran on DTensors."""

    ran_on_dtensors = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).ran_on_dtensors = isinstance(self.weight, DTensor) and isinstance(x, DTensor)
        return F.linear(x, self.weight / self.weight.abs().max(), self.bias)


class Adapted(nn.Module):
    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.randn(RANK, base.in_features))
        self.lora_B = nn.Parameter(torch.randn(base.out_features, RANK))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + 0.5 * (x @ self.lora_A.t() @ self.lora_B.t())


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = Adapted(MaxScaledLinear(DIM, HIDDEN))
        self.down = Adapted(MaxScaledLinear(HIDDEN, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.up(x)))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(DIM)
        self.mlp = Mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(x))


_PLAN = {
    "norm": "sequence_parallel",
    "mlp": "block_input",
    "mlp.up": "adapter:colwise",
    "mlp.down": "adapter:rowwise",
}


def _subclass_bases_match_one_process() -> list[str]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2,))
    rank = dist.get_rank()
    torch.manual_seed(0)
    reference = Model()
    for name, p in reference.named_parameters():
        p.requires_grad_("lora" in name)
    x = torch.randn(BATCH, SEQ, DIM)
    weight = torch.randn(BATCH, SEQ, DIM)
    checked = []
    for sp in (False, True):
        single, model = copy.deepcopy(reference), copy.deepcopy(reference)
        apply_tp(model, mesh, TPPlan(styles=_PLAN, sequence_parallel=sp))
        expected = single(x)
        (expected * weight).sum().backward()
        MaxScaledLinear.ran_on_dtensors = False
        part = slice(rank * SEQ // 2, (rank + 1) * SEQ // 2) if sp else slice(None)
        out = model(x[:, part].contiguous())
        (out * weight[:, part]).sum().backward()
        torch.testing.assert_close(out, expected[:, part], rtol=1e-5, atol=1e-6)
        align_grads(model.parameters())
        for name, p in single.named_parameters():
            got = dict(model.named_parameters())[name].grad
            if p.grad is None:
                assert got is None, name
                continue
            got = got.full_tensor() if isinstance(got, DTensor) else got
            torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-6, msg=name)
        assert MaxScaledLinear.ran_on_dtensors
        checked.append(f"sp={sp}")
    return checked


def test_linear_subclass_bases_run_on_dtensors_and_match_one_process(dist_pool):
    assert dist_pool(2).run(_subclass_bases_match_one_process) == [["sp=False", "sp=True"]] * 2
