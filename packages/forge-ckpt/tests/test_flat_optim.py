"""Flat (ZeRO-1/2) optimizer slices named by parameter: box cover and slice detection.

The save/resume round trip (ZeRO-2 on 2 ranks -> other slices, one process) is in
tests/test_ckpt_resharding.py at the repository root.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from torch import nn

from forge_ckpt.training.flat_optim import flat_segments, row_major_boxes


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (4, 1, 3, 2)])
def test_boxes_cover_exactly_the_flat_range_in_order(shape):
    index = torch.arange(math.prod(shape)).view(shape)
    n = index.numel()
    ranges = [(a, b - a) for a, b in itertools.combinations(range(n + 1), 2)]
    for start, length in random.Random(0).sample(ranges, min(len(ranges), 200)):
        boxes = row_major_boxes(shape, start, length)
        assert len(boxes) <= 2 * len(shape) - 1
        got = torch.cat(
            [
                index[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))].flatten()
                for offsets, sizes in boxes
            ]
        )
        assert torch.equal(got, torch.arange(start, start + length)), (shape, start, length)


def _flat_model_and_slices(world: int):
    """A model whose parameters are views of one flat buffer, and ``world`` equal slices of it
    (padded), as forge_parallel.ZeroOptimizer lays them out."""
    model = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2))
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    size = -(-total // world)
    flat = torch.zeros(size * world)
    offset = 0
    for p in params:
        flat[offset : offset + p.numel()].copy_(p.detach().reshape(-1))
        p.data = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    slices = [nn.Parameter(flat[r * size : (r + 1) * size]) for r in range(world)]
    return model, slices


def test_slices_are_mapped_to_the_parameters_they_overlap():
    model, slices = _flat_model_and_slices(world=3)
    for piece in slices:
        opt = torch.optim.SGD([piece], lr=0.1)
        segments = flat_segments(model, opt)
        # every element of the slice that is a parameter element is found, in order
        values = torch.cat(
            [s.opt_param.detach()[s.opt_start : s.opt_start + s.length] for s in segments]
        )
        params = dict(model.named_parameters())
        from_params = torch.cat(
            [
                params[s.fqn].detach().reshape(-1)[s.param_start : s.param_start + s.length]
                for s in segments
            ]
        )
        assert torch.equal(values, from_params)
    covered = sum(
        s.length
        for r in range(3)
        for s in flat_segments(model, torch.optim.SGD([slices[r]], lr=0.1))
    )
    assert covered == sum(p.numel() for p in model.parameters())
    assert flat_segments(model, torch.optim.SGD(model.parameters(), lr=0.1)) is None


def test_unnameable_optimizer_tensors_are_refused_with_the_reason():
    model, slices = _flat_model_and_slices(world=2)
    master = nn.Parameter(slices[0].detach().double().clone())  # a master copy in another dtype
    with pytest.raises(ValueError, match=r"shares no memory with one.*master copies"):
        flat_segments(model, torch.optim.SGD([master], lr=0.1))
    mixed = torch.optim.SGD([slices[0], next(model.parameters())], lr=0.1)
    with pytest.raises(ValueError, match="not a mix"):
        flat_segments(model, mixed)
