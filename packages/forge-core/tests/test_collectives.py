"""Every autograd-aware collective against a single-process reference, at world sizes 2, 4, 8.

Each rank runs the op on its own input; every rank also recomputes the whole job in one process
(the reference) from the same seeded inputs and checks its output and its input gradient against
the reference's slice. The ops run over the default group and over both axes of a 2-D mesh.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from forge_core import collectives as C


def _gen(tag: str, ranks: list[int]) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{tag}:{ranks}".encode()))


# Each entry: (distributed op on (x, group, n), reference on a list of per-rank inputs -> list of
# per-rank outputs, input is replicated?, loss counted once (replicated output)?, input shape(n)).
def _a2a_splits(n: int, ranks: list[int]) -> torch.Tensor:
    return torch.randint(0, 4, (n, n), generator=_gen("splits", ranks))


def _a2a_ref(xs, n, ranks):
    splits = _a2a_splits(n, ranks)
    pieces = [list(x.split(splits[r].tolist())) for r, x in enumerate(xs)]
    return [torch.cat([pieces[src][dst] for src in range(n)]) for dst in range(n)]


OPS = {
    "all_gather_dim1": (
        lambda x, g, n, ranks: C.all_gather(x, dim=1, group=g),
        lambda xs, n, ranks: [torch.cat(xs, dim=1)] * n,
        False,
        False,
        lambda n: (3, 2, 5),
    ),
    "reduce_scatter_sum": (
        lambda x, g, n, ranks: C.reduce_scatter(x, dim=0, group=g),
        lambda xs, n, ranks: list(torch.stack(xs).sum(0).chunk(n, dim=0)),
        False,
        False,
        lambda n: (2 * n, 3),
    ),
    "reduce_scatter_avg_dim_last": (
        lambda x, g, n, ranks: C.reduce_scatter(x, dim=-1, op="avg", group=g),
        lambda xs, n, ranks: list(torch.stack(xs).mean(0).chunk(n, dim=-1)),
        False,
        False,
        lambda n: (3, n),
    ),
    "all_reduce_sum": (
        lambda x, g, n, ranks: C.all_reduce(x, group=g),
        lambda xs, n, ranks: [torch.stack(xs).sum(0)] * n,
        False,
        False,
        lambda n: (4, 3),
    ),
    "all_reduce_avg": (
        lambda x, g, n, ranks: C.all_reduce(x, op="avg", group=g),
        lambda xs, n, ranks: [torch.stack(xs).mean(0)] * n,
        False,
        False,
        lambda n: (5,),
    ),
    "all_to_all_even": (
        lambda x, g, n, ranks: C.all_to_all(x, group=g),
        lambda xs, n, ranks: [torch.cat([x.chunk(n)[dst] for x in xs]) for dst in range(n)],
        False,
        False,
        lambda n: (2 * n, 3),
    ),
    "shift_plus_one": (
        lambda x, g, n, ranks: C.shift(x, offset=1, group=g),
        lambda xs, n, ranks: [xs[(r - 1) % n] for r in range(n)],
        False,
        False,
        lambda n: (3, 2),
    ),
    "shift_minus_three": (
        lambda x, g, n, ranks: C.shift(x, offset=-3, group=g),
        lambda xs, n, ranks: [xs[(r + 3) % n] for r in range(n)],
        False,
        False,
        lambda n: (4,),
    ),
    "copy_to_group_f": (
        lambda x, g, n, ranks: C.copy_to_group(x, group=g),
        lambda xs, n, ranks: [xs[0]] * n,
        True,
        False,
        lambda n: (3, 4),
    ),
    "reduce_from_group_g": (
        lambda x, g, n, ranks: C.reduce_from_group(x, group=g),
        lambda xs, n, ranks: [torch.stack(xs).sum(0)] * n,
        False,
        True,
        lambda n: (3, 4),
    ),
    "scatter_to_group": (
        lambda x, g, n, ranks: C.scatter_to_group(x, dim=-1, group=g),
        lambda xs, n, ranks: list(xs[0].chunk(n, dim=-1)),
        True,
        False,
        lambda n: (2, 3 * n),
    ),
    "gather_from_group": (
        lambda x, g, n, ranks: C.gather_from_group(x, dim=0, group=g),
        lambda xs, n, ranks: [torch.cat(xs, dim=0)] * n,
        False,
        True,
        lambda n: (2, 3),
    ),
}


def _check_op_on_group(name: str, group, tag: str) -> None:
    op, reference, replicated_input, loss_once, shape_of = OPS[name]
    pg = C.as_process_group(group)
    n, me, ranks = dist.get_world_size(pg), dist.get_rank(pg), dist.get_process_group_ranks(pg)
    gen = _gen(f"{tag}:{name}", ranks)
    xs = [torch.randn(shape_of(n), generator=gen) for _ in range(n)]
    if replicated_input:
        xs = [xs[0]] * n
    # Reference: the whole job in this process.
    leaves = [x.clone().requires_grad_() for x in ({id(x): x for x in xs}.values())]
    ref_inputs = [leaves[0]] * n if replicated_input else leaves
    ref_outputs = reference(ref_inputs, n, ranks)
    weights = [torch.randn(y.shape, generator=gen) for y in ref_outputs]
    if loss_once:
        weights = [weights[0]] * n
        ref_loss = (ref_outputs[0] * weights[0]).sum()
    else:
        ref_loss = sum((y * w).sum() for y, w in zip(ref_outputs, weights, strict=True))
    ref_loss.backward()
    ref_grad = leaves[0].grad if replicated_input else leaves[me].grad
    # Distributed.
    x = xs[me].clone().requires_grad_()
    y = op(x, group, n, ranks)
    (y * weights[me]).sum().backward()
    torch.testing.assert_close(
        y, ref_outputs[me].detach(), msg=lambda m: f"{name} forward on {tag}: {m}"
    )
    torch.testing.assert_close(x.grad, ref_grad, msg=lambda m: f"{name} backward on {tag}: {m}")


def _check_variable_all_to_all(group, tag: str) -> None:
    pg = C.as_process_group(group)
    n, me, ranks = dist.get_world_size(pg), dist.get_rank(pg), dist.get_process_group_ranks(pg)
    splits = _a2a_splits(n, ranks)
    gen = _gen(f"{tag}:a2a_var", ranks)
    xs = [torch.randn(int(splits[r].sum()), 3, generator=gen) for r in range(n)]
    leaves = [x.clone().requires_grad_() for x in xs]
    ref_out = _a2a_ref(leaves, n, ranks)
    weights = [torch.randn(y.shape, generator=gen) for y in ref_out]
    sum((y * w).sum() for y, w in zip(ref_out, weights, strict=True)).backward()
    x = xs[me].clone().requires_grad_()
    # Output sizes exchanged automatically from the input sizes.
    y = C.all_to_all(x, input_split_sizes=splits[me].tolist(), group=group)
    (y * weights[me]).sum().backward()
    torch.testing.assert_close(y, ref_out[me].detach())
    torch.testing.assert_close(x.grad, leaves[me].grad)
    # And with both sizes given explicitly.
    x2 = xs[me].clone().requires_grad_()
    y2 = C.all_to_all(
        x2,
        input_split_sizes=splits[me].tolist(),
        output_split_sizes=splits[:, me].tolist(),
        group=group,
    )
    (y2 * weights[me]).sum().backward()
    torch.testing.assert_close(x2.grad, leaves[me].grad)


def _groups_to_test():
    """The default group, and each axis of a 2 x (world/2) mesh."""
    world = dist.get_world_size()
    groups = [(None, "world")]
    if world >= 4:
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("outer", "inner"))
        groups += [(mesh["outer"], "mesh-outer"), (mesh["inner"], "mesh-inner")]
    return groups


def _check_all_ops() -> int:
    checked = 0
    for group, tag in _groups_to_test():
        for name in OPS:
            _check_op_on_group(name, group, tag)
            checked += 1
        _check_variable_all_to_all(group, tag)
        checked += 1
    return checked


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_collectives_match_single_process_reference(dist_pool, world_size):
    checked = dist_pool(world_size).run(_check_all_ops)
    groups = 1 if world_size < 4 else 3
    assert checked == [groups * (len(OPS) + 1)] * world_size


def _send_recv_chain() -> list[float]:
    """Rank r computes h_r = h_{r-1} * (r + 2) and sends it on; the last rank takes the loss.
    Gradients flow back through the sends to rank 0's input (a pipeline in miniature)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x0 = torch.linspace(-1.0, 1.0, 4)
    factors = [r + 2.0 for r in range(world)]
    if rank == 0:
        x = x0.clone().requires_grad_()
        h = x * factors[0]
    else:
        h = C.recv((4,), src=rank - 1) * factors[rank]
    if rank < world - 1:
        token = C.send(h, dst=rank + 1)
        token.sum().backward()
    else:
        (h * h).sum().backward()
    if rank != 0:
        return []
    # Single-process reference: loss = sum((x * prod(factors))^2).
    ref_x = x0.clone().requires_grad_()
    total = torch.tensor(factors).prod()
    ((ref_x * total) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    return x.grad.tolist()


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_send_recv_backward_crosses_ranks(dist_pool, world_size):
    results = dist_pool(world_size).run(_send_recv_chain)
    assert len(results[0]) == 4
    assert all(r == [] for r in results[1:])


def _async_and_overlap() -> None:
    world, rank = dist.get_world_size(), dist.get_rank()
    x = torch.arange(6.0).reshape(2, 3) + rank
    gathered = C.all_gather_async(x, dim=1).wait()
    torch.testing.assert_close(
        gathered, torch.cat([torch.arange(6.0).reshape(2, 3) + r for r in range(world)], dim=1)
    )
    full = torch.arange(2.0 * world * 3).reshape(2 * world, 3) * (rank + 1)
    scattered = C.reduce_scatter_async(full, op="avg").wait()
    mean_factor = sum(r + 1 for r in range(world)) / world
    torch.testing.assert_close(scattered, full.chunk(world)[rank] / (rank + 1) * mean_factor)
    summed = C.all_reduce_async(x).wait()
    torch.testing.assert_close(
        summed, sum(torch.arange(6.0).reshape(2, 3) + r for r in range(world))
    )
    splits = [(rank + dst) % 3 for dst in range(world)]
    rows = torch.full((sum(splits), 2), float(rank))
    received = C.all_to_all_async(rows, input_split_sizes=splits).wait()
    expected = torch.cat([torch.full(((src + rank) % 3, 2), float(src)) for src in range(world)])
    torch.testing.assert_close(received, expected)
    # Software-pipelined: gather chunk i+1 while "computing" on chunk i.
    chunks = [torch.full((2,), float(i + rank)) for i in range(5)]
    out = C.overlapped(
        chunks,
        communicate=lambda c: C.all_gather_async(c),
        compute=lambda c, g: (g.sum() * 2).item(),
    )
    assert out == [2 * sum(2 * (i + r) for r in range(world)) for i in range(5)]


@pytest.mark.parametrize("world_size", [2, 4])
def test_async_collectives_and_overlap(dist_pool, world_size):
    dist_pool(world_size).run(_async_and_overlap)


def _bad_inputs() -> list[str]:
    messages = []
    for call in (
        lambda: C.reduce_scatter(torch.ones(3), group=None),
        lambda: C.all_to_all(torch.ones(3)),
        lambda: C.all_to_all(torch.ones(3), input_split_sizes=[1, 1]),
        lambda: C.all_to_all(torch.ones(3), input_split_sizes=[1]),
        lambda: C.all_reduce(torch.ones(3), op="max"),
        lambda: C.as_process_group(init_device_mesh("cpu", (1, 2), mesh_dim_names=("x", "y"))),
    ):
        try:
            call()
        except ValueError as exc:
            messages.append(str(exc))
    return messages


def test_bad_inputs_explain_themselves(dist_pool):
    messages = dist_pool(2).run(_bad_inputs)[0]
    assert any("divisible by the group size 2" in m for m in messages)
    assert any("evenly over 2 ranks" in m for m in messages)
    assert any("sum to 2 but x has 3 rows" in m for m in messages)
    assert any("1 entries but the group has 2 ranks" in m for m in messages)
    assert any("'sum' or 'avg'" in m for m in messages)
    assert any("2-D mesh" in m for m in messages)


def _uneven_gathers() -> None:
    """all_gather(sizes=...) and its async twin against one process holding every rank's block,
    including the gradient: rank r's block receives the sum of every rank's weights on it."""
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [r + 1 for r in range(world)]
    for dim in (0, 1):
        blocks = [
            torch.randn(*((n, 3) if dim == 0 else (2, n)), generator=_gen(f"uneven{dim}", [r]))
            for r, n in enumerate(sizes)
        ]
        full = torch.cat(blocks, dim=dim)
        weights = [torch.randn(full.shape, generator=_gen(f"w{dim}", [r])) for r in range(world)]
        x = blocks[rank].clone().requires_grad_()
        y = C.all_gather(x, dim=dim, sizes=sizes)
        torch.testing.assert_close(y, full)
        (y * weights[rank]).sum().backward()
        expected_grad = sum(weights).split(sizes, dim=dim)[rank]
        torch.testing.assert_close(x.grad, expected_grad)
        pending = C.all_gather_async(blocks[rank], dim=dim, sizes=sizes)
        torch.testing.assert_close(pending.wait(), full)


def test_uneven_all_gather_matches_one_process_with_gradients(dist_pool):
    dist_pool(2).run(_uneven_gathers, timeout=60)


def _mismatched_shapes_raise() -> list[str]:
    import os

    rank = dist.get_rank()
    messages = []
    x = torch.zeros(rank + 1, 2)
    try:
        C.all_gather(x, check_shapes=True)
    except ValueError as exc:
        messages.append(str(exc))
    os.environ["FORGE_CHECK_COLLECTIVES"] = "1"
    try:
        C.all_gather_async(x)
    except ValueError as exc:
        messages.append(str(exc))
    try:  # lengths along dim 0 announced right, but dim 1 differs between ranks
        C.all_gather(torch.zeros(rank + 1, 2 + rank), sizes=[1, 2])
    except ValueError as exc:
        messages.append(str(exc))
    finally:
        del os.environ["FORGE_CHECK_COLLECTIVES"]
    try:  # a wrong local length is caught with no communication (here on both ranks)
        C.all_gather(x, sizes=[2, 1])
    except ValueError as exc:
        messages.append(str(exc))
    C.all_gather(x, sizes=[1, 2])  # the group is still in step after all of the above
    return messages


def test_mismatched_gather_shapes_raise_on_every_rank_when_checked(dist_pool):
    results = dist_pool(2).run(_mismatched_shapes_raise, timeout=60)
    for messages in results:
        assert "all_gather along dim 0 got rank 0: (1, 2), rank 1: (2, 2)" in messages[0]
        assert "pass sizes=" in messages[0]
        assert "all_gather_async along dim 0 got rank 0: (1, 2), rank 1: (2, 2)" in messages[1]
        assert "rank 0: (1, 2), rank 1: (2, 3)" in messages[2]
    assert "sizes[0]=2 but this rank's input has length 1" in results[0][3]
    assert "sizes[1]=1 but this rank's input has length 2" in results[1][3]
