"""``local_index`` against what FSDP2 really holds when it shards tensor-parallel parameters
unevenly (a dim that the TP or FSDP degree does not divide), at 8 simulated ranks (4 FSDP x 2
TP) under the fake process group: no communication, real ``fully_shard``.

The values are FSDP's own: each rank's TP shard of a known tensor is handed to ``fully_shard``,
which keeps its chunk; ``local_index`` (from the placements FSDP chose) must point at exactly
those elements of the full tensor.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from forge_core.testing import fake_process_group
from forge_models.local_shards import local_index

WORLD, DP, TP = 8, 4, 2
# (full shape, the TP placement): column-parallel rows 33 -> 17 + 16 per TP rank, then FSDP
# chunks of 5/5/5/2 and 4/4/4/4; row-parallel columns with FSDP rows 9 -> 3/3/3/0; a norm
# replicated over TP with FSDP chunks 2/2/2/1.
CASES = {
    "colwise": ((33, 6), "shard0"),
    "rowwise": ((9, 7), "shard1"),
    "norm": ((7,), "replicate"),
}


def _fsdp_param(full: torch.Tensor, mesh, kind: str) -> torch.Tensor:
    """``full`` as a tensor-parallel DTensor on ``mesh["tp"]``, then sharded by FSDP2."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard

    tp_rank = mesh["tp"].get_local_rank()
    placement = {"shard0": Shard(0), "shard1": Shard(1), "replicate": Replicate()}[kind]
    if kind == "replicate":
        local = full
    else:
        chunks = list(torch.chunk(full, TP, dim=placement.dim))
        local = chunks[tp_rank] if tp_rank < len(chunks) else full.narrow(placement.dim, 0, 0)
    module = nn.Module()
    module.w = nn.Parameter(
        DTensor.from_local(
            local.clone(), mesh["tp"], [placement], run_check=False,
            shape=full.shape, stride=full.stride(),
        )
    )  # fmt: skip
    fully_shard(module, mesh=mesh["dp"])
    return module.w


def _box(full: torch.Tensor, index: list[torch.Tensor]) -> torch.Tensor:
    for dim, positions in enumerate(index):
        full = full.index_select(dim, positions)
    return full


@pytest.mark.parametrize("rank", range(WORLD))
def test_local_index_is_what_fsdp2_holds_over_uneven_tensor_parallel_shards(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    with fake_process_group(world_size=WORLD, rank=rank):
        mesh = init_device_mesh("cpu", (DP, TP), mesh_dim_names=("dp", "tp"))
        dp_rank, tp_rank = mesh.get_coordinate()
        for name, (shape, kind) in CASES.items():
            full = torch.arange(float(torch.Size(shape).numel())).reshape(shape)
            param = _fsdp_param(full, mesh, kind)
            # The same placements and local data on this process's own 2-D mesh (the mesh
            # FSDP builds caches the coordinate of the first fake process group of a process).
            held = param.to_local()
            probe = DTensor.from_local(
                held, mesh, param.placements, run_check=False,
                shape=param.shape, stride=param.stride(),
            )  # fmt: skip
            index = local_index(probe)
            assert torch.equal(_box(full, index), held), (name, rank, param.placements)
            if name == "colwise":
                # FSDP's chunk of the TP shard: rows of TP rank t's 17 / 16, chunked 4 ways.
                tp_rows = torch.chunk(torch.arange(33), TP)[tp_rank]
                parts = torch.chunk(tp_rows, DP)
                want = parts[dp_rank] if dp_rank < len(parts) else tp_rows[:0]
                assert index[0].tolist() == want.tolist(), rank


def test_packed_column_parallel_pieces_are_unchanged():
    """A lone ``_StridedShard`` (packed ``[gate; up]`` over TP) keeps its pieces rule."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import _StridedShard

    with fake_process_group(world_size=2, rank=1):
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
        probe = DTensor.from_local(
            torch.zeros(4, 3), mesh, [_StridedShard(0, split_factor=2)], run_check=False,
            shape=torch.Size((8, 3)), stride=(3, 1),
        )  # fmt: skip
        assert local_index(probe)[0].tolist() == [2, 3, 6, 7]  # [gate_1; up_1]
