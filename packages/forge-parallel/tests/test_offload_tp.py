"""Activation offload under tensor / sequence parallelism (2 gloo ranks): the tiny Llama's
TP2 and TP2+SP layouts, and a block computing on DTensors (the activations autograd saves are
DTensors, one of them ``Partial``), train bit for bit as without offload."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from forge_core.testing import import_path
from forge_parallel import parallelize
from forge_parallel.config import OffloadConfig

tm = import_path(Path(__file__).with_name("tiny_models.py"), "forge_parallel_tests_tiny_models")

#: Below one (BATCH, SEQ / 2, dim) float32 shard (2 KiB), above the norm weights and biases.
MIN_BYTES = 1024
TOLERANCE = 1e-5  # to one process, as in test_exactness


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _first_gradients(result, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The local gradient shards of one forward/backward (before training changes them)."""
    model = result.model
    with result.loss_context():
        logits = tm.logits_of(model, tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
    grads = {n: _local(p.grad).clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return grads


def _layouts_job() -> dict[str, dict]:
    from forge_core import ParallelDims

    batches = tm.make_batches()
    initial = tm.build_tiny()
    reference_model = copy.deepcopy(initial)
    reference = tm.train(reference_model, batches)
    ref_params = tm.full_params(reference_model)
    out = {}
    for name, sequence_parallel in (("tp2", False), ("tp2_sp", True)):
        runs = {}
        for offload in (None, OffloadConfig(min_bytes=MIN_BYTES)):
            model = copy.deepcopy(initial)
            result = parallelize(
                model,
                ParallelDims(world_size=2, tp=2),
                plan=tm.tiny_plan(sequence_parallel=sequence_parallel),
                offload=offload,
            )
            grads = _first_gradients(result, batches[0][0])
            trained = tm.train(result.model, batches, result=result)
            params = tm.full_params(result.model)
            stats = model.layers[0]._forge_offload.stats if offload else None
            runs[offload is not None] = (grads, trained, params, stats)
        (grads, trained, params, _), (o_grads, o_trained, o_params, stats) = runs[0], runs[1]
        out[name] = {
            "same_losses": o_trained["losses"] == trained["losses"],
            "same_norms": o_trained["norms"] == trained["norms"],
            "same_grads": all(torch.equal(o_grads[n], g) for n, g in grads.items()),
            "same_params": all(torch.equal(o_params[n], p) for n, p in params.items()),
            "vs_one_process": tm.compare(reference, ref_params, o_trained, o_params),
            "stats": stats.__dict__,
        }
    return out


class _DTensorBlock(torch.nn.Module):
    """An MLP run on DTensors (as torch's ``ColwiseParallel(use_local_output=False)`` leaves
    them): saves the Replicate input, Shard(-1) hidden states, a Partial sum (the down
    projection before its all-reduce, saved by the product with ``scale``) and the sigmoid's
    output twice (by the sigmoid and the product: one shared copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(32, 64, bias=False)
        self.down = torch.nn.Linear(64, 32, bias=False)
        self.scale = torch.nn.Parameter(torch.rand(32) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        partial = torch.nn.functional.linear(
            torch.nn.functional.silu(h) * torch.sigmoid(h), self.down.weight
        )
        y = partial * self.scale
        if hasattr(y, "redistribute"):
            from torch.distributed.tensor import Replicate

            y = y.redistribute(placements=[Replicate()])  # the all-reduce of the Partial sum
        return x + y


class _DTensorStack(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(_DTensorBlock() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _dtensor_block_job() -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    reference = _DTensorStack()
    x = torch.randn(tm.BATCH, tm.SEQ, 32, generator=torch.Generator().manual_seed(1))

    def step(model, inputs):
        model.zero_grad()
        out = model(inputs)
        (out.to_local() if hasattr(out, "to_local") else out).logsumexp(-1).mean().backward()
        return {n: p.grad for n, p in model.named_parameters()}

    expected = step(reference, x)
    grads, stats = {}, None
    for offload in (None, OffloadConfig(min_bytes=MIN_BYTES)):
        model = copy.deepcopy(reference)
        for block in model.layers:
            for module, name, placement in (
                (block.up, "weight", Shard(0)),
                (block.down, "weight", Shard(1)),
                (block, "scale", Replicate()),
            ):
                value = getattr(module, name).detach()
                setattr(
                    module, name, torch.nn.Parameter(distribute_tensor(value, mesh, [placement]))
                )
        parallelize(model, blocks="layers.*", offload=offload)
        inputs = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        for _ in range(2):  # the second pass starts new groups
            got = step(model, inputs)
        grads[offload is not None] = {n: g.to_local().clone() for n, g in got.items()}
        full = {n: g.full_tensor() for n, g in got.items()}
        if offload is not None:
            stats = model.layers[0]._forge_offload.stats
    return {
        "same_grads": all(torch.equal(grads[True][n], g) for n, g in grads[False].items()),
        "vs_one_process": max(tm.rel_err(full[n], g) for n, g in expected.items()),
        "stats": stats.__dict__,
    }


def _job() -> dict:
    return {"tiny_llama": _layouts_job(), "dtensor_block": _dtensor_block_job()}


@pytest.fixture(scope="module")
def results(dist_pool) -> list[dict]:
    """Both jobs in one pool call, each rank's results."""
    return dist_pool(2).run(_job)


def test_tiny_llama_tp_layouts_offload_exactly(results):
    passes = 1 + tm.STEPS * tm.ACCUM  # the gradient check, then 5 steps x 2 micro-batches
    for rank, result in enumerate(results):
        for layout, got in result["tiny_llama"].items():
            where = f"rank{rank} {layout}: {got}"
            assert got["same_losses"], where
            assert got["same_norms"], where
            assert got["same_grads"], where
            assert got["same_params"], where
            assert max(got["vs_one_process"].values()) <= TOLERANCE, where
            stats = got["stats"]
            assert stats["reloaded"] == stats["offloaded"] > 0, where
            assert stats["kept_subclasses"] == 0, where
            # The row-parallel projections' inputs are DTensors saved by their matmuls: per
            # block and pass at least o_proj's (B * S, dim / tp) and down_proj's
            # (B * S, ffn / tp) float32 shards moved.
            shards = tm.BATCH * tm.SEQ * (32 + 64) // 2 * 4
            assert stats["offloaded_dtensor_bytes"] >= 2 * passes * shards, where


def test_dtensor_activations_offload_exactly(results):
    for rank, result in enumerate(results):
        got = result["dtensor_block"]
        where = f"rank{rank}: {got}"
        assert got["same_grads"], where
        assert got["vs_one_process"] <= TOLERANCE, where
        stats = got["stats"]
        # Per block and pass (2 blocks, 2 passes): 6 copies of (B, S, 32)-element float32
        # shards (the input's 2-D view, h, silu(h), sigmoid(h), the down projection's input,
        # the Partial sum) and one shared (sigmoid(h) saved by the product too).
        local = tm.BATCH * tm.SEQ * 32 * 4
        assert stats["offloaded"] == stats["reloaded"] == 6 * 4, where
        assert stats["offloaded_dtensor_bytes"] == stats["offloaded_bytes"] == 6 * 4 * local
        assert stats["shared"] == 4, where
