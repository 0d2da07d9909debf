"""ParallelDims validation, and mesh layouts checked on simulated and real process groups."""

from __future__ import annotations

import re

import pytest
import torch.distributed as dist

from forge_core import ParallelDims

# (world_size, degrees, expected resolved degrees)
VALID_LAYOUTS = [
    (1, {}, {"dp_shard": 1, "tp": 1, "etp": 1}),
    (8, {}, {"dp_shard": 8}),
    (8, {"tp": 2}, {"dp_shard": 4, "tp": 2, "etp": 2}),
    (8, {"tp": 2, "pp": 2}, {"dp_shard": 2}),
    (8, {"dp_replicate": 2, "dp_shard": 2, "tp": 2}, {"dp": 4, "dp_cp": 4}),
    (16, {"cp": 2, "tp": 2}, {"dp_shard": 4, "dp_shard_cp": 8, "dp_cp": 8}),
    (8, {"dp_shard": 2, "tp": -1}, {"tp": 4}),
    (
        64,
        {"dp_replicate": 2, "cp": 2, "tp": 2, "ep": 8},
        {"dp_shard": 8, "edp_shard": 2, "edp": 4, "etp": 2},
    ),
    (16, {"tp": 2, "ep": 8, "etp": 1}, {"dp_shard": 8, "edp_shard": 2, "etp": 1}),
    (1024, {"tp": 8, "pp": 4, "cp": 2}, {"dp_shard": 16, "dp_cp": 32}),
    (12, {"tp": 3}, {"dp_shard": 4}),
]


@pytest.mark.parametrize(("world_size", "degrees", "expected"), VALID_LAYOUTS)
def test_valid_layouts_resolve(world_size, degrees, expected):
    dims = ParallelDims(world_size=world_size, **degrees)
    for name, value in expected.items():
        assert getattr(dims, name) == value, name
    assert dims.pp * dims.dp_replicate * dims.dp_shard * dims.cp * dims.tp == world_size
    assert dims.edp * dims.ep * dims.etp * dims.pp == world_size


REJECTED_LAYOUTS = [
    (
        8,
        {"tp": 3},
        "cannot infer dp_shard: world_size 8 is not divisible by dp_replicate(1) x cp(1) x tp(3) x pp(1) = 3",
    ),
    (8, {"tp": 3, "dp_shard": 2}, "= 6, but world_size is 8"),
    (
        8,
        {"tp": 2, "dp_shard": 2},
        "= 4, but world_size is 8. The degrees must multiply to the world size",
    ),
    (
        8,
        {"tp": -1, "dp_shard": -1},
        "at most one degree can be inferred, but dp_shard and tp are -1",
    ),
    (8, {"tp": 0}, "tp must be a positive integer (or -1 to infer it), got 0"),
    (8, {"pp": -2}, "pp must be a positive integer"),
    (8, {"ep": 3}, "ep=3 must divide dp_shard x cp = 8"),
    (8, {"tp": 2, "ep": 8}, "ep=8 must divide dp_shard x cp = 4"),
    (8, {"tp": 2, "etp": 4}, "etp (expert tensor parallel) must be 1 or equal to tp=2, got 4"),
    (8, {"ep": -1}, "ep cannot be inferred"),
    (0, {}, "world_size must be a positive integer"),
    (8, {"tp": 2.0}, "tp must be a positive integer"),
]


@pytest.mark.parametrize(("world_size", "degrees", "message"), REJECTED_LAYOUTS)
def test_invalid_layouts_are_rejected_with_an_explanation(world_size, degrees, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ParallelDims(world_size=world_size, **degrees)


def test_coordinates_follow_the_documented_rank_order():
    dims = ParallelDims(world_size=16, dp_replicate=2, cp=2, tp=2)  # dp_shard = 2
    # rank = (((pp * R + r) * S + s) * C + c) * T + t
    assert dims.coordinates(0) == {
        "pp": 0,
        "dp_replicate": 0,
        "dp_shard": 0,
        "cp": 0,
        "tp": 0,
        "edp_shard": 0,
        "ep": 0,
        "etp": 0,
    }
    assert dims.coordinates(13) == {
        "pp": 0,
        "dp_replicate": 1,
        "dp_shard": 1,
        "cp": 0,
        "tp": 1,
        "edp_shard": 2,
        "ep": 0,
        "etp": 1,
    }
    with pytest.raises(ValueError, match="outside"):
        dims.coordinates(16)


def _ranks(mesh, axis):
    return dist.get_process_group_ranks(mesh.group(axis))


@pytest.mark.parametrize(
    ("world_size", "rank", "degrees", "groups"),
    [
        (
            1024,
            517,
            {"tp": 8, "pp": 4, "cp": 2},
            {
                "tp": list(range(512, 520)),
                "cp": [517, 525],
                "pp": [5, 261, 517, 773],
                "dp_shard": list(range(517, 768, 16)),
                "dp_shard_cp": sorted([r + c for r in range(517, 768, 16) for c in (0, 8)]),
            },
        ),
        (
            64,
            37,
            {"dp_replicate": 2, "cp": 2, "tp": 2, "ep": 8},
            {
                "dp_replicate": [5, 37],
                "ep": list(range(33, 48, 2)),
                "etp": [36, 37],
                "edp_shard": [37, 53],
                "edp": [5, 21, 37, 53],
                "dp_cp": list(range(1, 64, 2)),
            },
        ),
        (
            16,
            6,
            {"tp": 2, "ep": 8, "etp": 1},
            {"ep": list(range(0, 8)), "etp": [6], "edp_shard": [6, 14], "tp": [6, 7]},
        ),
    ],
)
def test_mesh_groups_on_a_simulated_world(fake_pg, world_size, rank, degrees, groups):
    dims = ParallelDims(world_size=world_size, **degrees)
    with fake_pg(world_size=world_size, rank=rank):
        mesh = dims.build_mesh("cpu")
        for axis, expected in groups.items():
            assert _ranks(mesh, axis) == expected, axis
            assert mesh.size(axis) == len(expected)
            assert mesh.local_rank(axis) == expected.index(rank)


def test_expert_axes_need_ep(fake_pg):
    with fake_pg(world_size=4, rank=0):
        mesh = ParallelDims(world_size=4, tp=2).build_mesh("cpu")
        with pytest.raises(KeyError, match="only built when ep > 1"):
            mesh["ep"]
        with pytest.raises(KeyError, match="unknown mesh axis 'model'"):
            mesh["model"]
        assert mesh[("dp_shard", "cp")].ndim == 2


def test_build_mesh_checks_the_process_group(fake_pg):
    with pytest.raises(RuntimeError, match="init_distributed"):
        ParallelDims(world_size=2).build_mesh("cpu")
    with fake_pg(world_size=4, rank=0), pytest.raises(ValueError, match="world_size=8"):
        ParallelDims(world_size=8).build_mesh("cpu")


def _real_mesh_groups() -> dict[str, list[int]]:
    mesh = ParallelDims(world_size=dist.get_world_size(), tp=2, cp=2, ep=2).build_mesh("cpu")
    groups = {axis: _ranks(mesh, axis) for axis in mesh.axes}
    # The groups really communicate: sum of global ranks over each axis.
    import torch

    for axis, ranks in groups.items():
        x = torch.tensor([float(dist.get_rank())])
        dist.all_reduce(x, group=mesh.group(axis))
        assert x.item() == sum(ranks), axis
    return groups


def test_mesh_groups_communicate_on_real_ranks(dist_pool):
    results = dist_pool(8).run(_real_mesh_groups)
    # world 8: dp_shard 2, cp 2, tp 2; experts: edp_shard 1, ep 2, etp 2
    assert results[5]["tp"] == [4, 5]
    assert results[5]["cp"] == [5, 7]
    assert results[5]["dp_shard"] == [1, 5]
    assert results[5]["dp_shard_cp"] == [1, 3, 5, 7]
    assert results[5]["ep"] == [5, 7]
    assert results[5]["etp"] == [4, 5]
    assert results[5]["edp"] == [1, 5]
