"""Regional compilation (one graph for every block) of blocks whose modules carry
forge-parallel's tensor-parallel hooks: the ``sequence_parallel`` norm style
(``ReplicateParallel``) and the LoRA ``adapter:`` style (``LinearAdapterParallel``). A hook
registered with ``always_call=True`` is guarded by its identity, so every block compiled again
and the ninth hit dynamo's recompile limit (running eagerly from then on)."""

from __future__ import annotations

import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import parallelize_module

from forge_core.testing import fake_process_group
from forge_parallel.tp_adapter import LinearAdapterParallel
from forge_parallel.tp_styles import ReplicateParallel

DIM, BLOCKS = 8, 12


class Adapted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(DIM, DIM)
        self.lora_A = nn.Parameter(torch.randn(2, DIM))
        self.lora_B = nn.Parameter(torch.randn(DIM, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.lora_A.t() @ self.lora_B.t()


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(DIM)
        self.proj = Adapted()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(self.norm(x))


def test_each_block_reuses_the_compiled_graph():
    with fake_process_group(world_size=1, rank=0):
        mesh = init_device_mesh("cpu", (1,))
        blocks = [Block() for _ in range(BLOCKS)]
        x = expected = torch.randn(2, 4, DIM)
        for block in blocks:
            expected = block(expected)
        for block in blocks:
            parallelize_module(
                block,
                mesh,
                {
                    "norm": ReplicateParallel(sequence_parallel=True),
                    "proj": LinearAdapterParallel("rowwise", sequence_parallel=True),
                },
            )
            block.compile(backend="eager")
        torch._dynamo.reset()
        counters.clear()
        for block in blocks:
            x = block(x)
        # The first call and the one whose input needs a gradient: 2 graphs, not one a block.
        assert counters["stats"]["unique_graphs"] <= 2, dict(counters["recompiles"])
        torch.testing.assert_close(x, expected)
