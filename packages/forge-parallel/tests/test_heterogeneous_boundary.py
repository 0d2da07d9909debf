"""Single-process checks of the heterogeneous batch boundary's rule for inputs (R15 leftover
1: inputs broadcast over the batch were gathered as if batch-major) and of the per-part
expert-parallel degree (leftover 2: a wrong ``ep`` was found only after earlier parts had been
parallelized, without the part's name or the values that fit).

The fake process group's all-gather copies this rank's input into every slot, so under it the
ranks agree: the shapes the part sees are checked here, rank disagreements through
:func:`_decide_inputs` on hand-made tables, numerics in test_heterogeneous.py's pool."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from forge_core.testing import import_path
from forge_parallel.expert_parallel import EPConfig
from forge_parallel.heterogeneous import (
    SubmoduleParallel,
    _boundary_kind,
    _decide_inputs,
    _fingerprint,
    _install_boundary,
    _validate,
)

_TESTS = Path(__file__).parent
tm = import_path(_TESTS / "tiny_models.py", "forge_parallel_tests_tiny_models")
tmoe = import_path(_TESTS / "tiny_moe.py", "forge_parallel_tests_tiny_moe")


class _Recorder(nn.Module):
    """Records the shapes it is called with; returns its ``ids``' embedding, batch-major."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.seen: dict[str, tuple[int, ...]] = {}

    def forward(self, ids, position_ids=None, *, mask=None, scale=None, scatter=()):
        named = {"ids": ids, "position_ids": position_ids, "mask": mask, "scale": scale}
        named |= {f"scatter{k}{j}": t for k, pair in enumerate(scatter) for j, t in enumerate(pair)}
        self.seen = {k: tuple(v.shape) for k, v in named.items() if v is not None}
        h = self.embed(ids)
        if position_ids is not None:
            h = h + self.embed(position_ids)  # broadcasts (1, S) over the rows
        if mask is not None:
            h = h * mask[:, None]
        return h if scale is None else h * scale


def test_inputs_broadcast_over_the_batch_enter_unchanged(fake_pg):
    """(1, S) positions and an (S,) mask were gathered to (2, S) / (2S,) beside the (8, S) rows
    (R15): the part failed with 'size of tensor a (8) must match ... b (2)'. Visual features
    that follow the batch's placeholders are still gathered, positionally or by keyword."""
    with fake_pg(world_size=2, rank=1):
        part = _Recorder()
        _install_boundary(part, dist.group.WORLD)
        ids, positions = torch.randint(0, 16, (4, 6)), torch.arange(6)[None]
        where, features = torch.ones(4, 6, dtype=torch.bool), torch.randn(5, 8)
        out = part(
            ids,
            positions,
            mask=torch.ones(6),
            scale=torch.tensor(2.0),
            scatter=[(where, features)],
        )
        assert out.shape == (4, 6, 8)
        assert part.seen == {
            "ids": (8, 6),
            "position_ids": (1, 6),
            "mask": (6,),
            "scale": (),
            "scatter00": (8, 6),
            "scatter01": (10, 8),
        }
        part(ids=ids, position_ids=positions)  # all by keyword: the batch is still ids
        assert part.seen == {"ids": (8, 6), "position_ids": (1, 6)}
        # One row per rank: (1, S) positions cannot be told from rows and are gathered,
        # which gives every gathered row its own rank's positions (the same result).
        part(ids[:1], positions)
        assert part.seen == {"ids": (2, 6), "position_ids": (2, 6)}


def test_boundary_kind_is_one_rule():
    rows = {4}
    assert _boundary_kind(torch.Size([]), rows) == "scalar"
    assert _boundary_kind(torch.Size([4, 6]), rows) == "batch"
    assert _boundary_kind(torch.Size([1, 6]), rows) == "shared"
    assert _boundary_kind(torch.Size([6]), rows) == "shared"
    assert _boundary_kind(torch.Size([4]), rows) == "batch"  # a label per row
    assert _boundary_kind(torch.Size([12, 8]), rows) == "rows"
    assert _boundary_kind(torch.Size([1, 6]), {1}) == "batch"


def _table(*ranks):
    """``table[r][k]`` from per-rank lists of (ndim, dim0, numel, fingerprint, fingerprint)."""
    return [list(map(list, r)) for r in ranks]


def test_ranks_that_disagree_raise_on_every_rank():
    ids, pos = torch.Size([4, 6]), torch.Size([1, 6])
    same = _table([(2, 4, 24, 0, 0), (2, 1, 6, 15, 55)], [(2, 4, 24, 0, 0), (2, 1, 6, 15, 55)])
    assert _decide_inputs([ids, pos], same, 2, [0, 1]) == ["batch", "shared"]
    short = _table([(2, 4, 24, 0, 0)], [(2, 3, 18, 0, 0)])
    with pytest.raises(ValueError, match=r"hold \[4, 3\] rows.*drop or pad"):
        _decide_inputs([ids], short, 2, [0, 1])
    other = _table([(2, 4, 24, 0, 0), (2, 1, 6, 15, 55)], [(2, 4, 24, 0, 0), (2, 1, 6, 21, 91)])
    with pytest.raises(ValueError, match=r"\(1, 6\) input.*differ across the ranks \[2, 3\]"):
        _decide_inputs([ids, pos], other, 2, [2, 3])
    feats = torch.Size([12, 8])
    ragged = _table([(2, 4, 24, 0, 0), (2, 12, 96, 0, 0)], [(2, 4, 24, 0, 0), (2, 9, 72, 0, 0)])
    with pytest.raises(ValueError, match=r"\(12, 8\) input.*hold \[12, 9\] of them"):
        _decide_inputs([ids, feats], ragged, 2, [0, 1])
    mrope = torch.Size([3, 4, 6])
    table = _table([(2, 4, 24, 0, 0), (3, 3, 72, 0, 0)], [(2, 4, 24, 0, 0), (3, 3, 72, 0, 0)])
    with pytest.raises(ValueError, match=r"\(3, 4, 6\) input.*batch's 4 rows along dim 1"):
        _decide_inputs([ids, mrope], table, 2, [0, 1])


def test_fingerprint_tells_values_apart():
    a = torch.arange(6.0)[None]
    assert torch.equal(_fingerprint(a), _fingerprint(a.clone()))
    assert not torch.equal(_fingerprint(a), _fingerprint(a.flip(-1)))  # same sum, other order
    nan = torch.tensor([1.0, float("nan"), float("inf")])
    assert torch.equal(_fingerprint(nan), _fingerprint(nan.clone()))


class _MoEVLM(nn.Module):
    def __init__(self, num_experts: int = 4) -> None:
        super().__init__()
        self.vision = nn.Linear(4, 4)
        moe = tmoe.TinyMoEConfig(num_experts=num_experts)
        self.language_model = tmoe.TinyMoE(tm.TinyConfig(), moe)


def _parts(**language):
    experts = EPConfig(experts="layers.*.mlp.experts")
    return {
        "vision": SubmoduleParallel(),
        "language_model": SubmoduleParallel(expert_parallel=experts, **language),
    }


@pytest.mark.parametrize(
    ("experts", "language", "message"),
    [
        (4, {"ep": 3}, r"ep=3 must divide the part's dp_shard x cp = 4 ranks.*among \[1, 2, 4\]"),
        (4, {"ep": 8}, r"ep=8 must divide .* = 4 ranks.*4 experts.*among \[1, 2, 4\]"),
        (6, {"ep": 4}, r"ep=4 .* = 4 ranks .*the 6 experts .*among \[1, 2\]"),
        (
            4,
            {"ep": 2, "dp_replicate": 4},
            r"ep=2 .* = 1 ranks \(world 4 / \(tp=1 x dp_replicate=4\).*among \[1\]",
        ),
        (
            4,
            {"ep": 4, "tp": 2, "plan": tm.tiny_plan(loss_parallel=False)},
            r"ep=4 .* = 2 ranks \(world 4 / \(tp=2 x dp_replicate=1\).*among \[1, 2\]",
        ),
        (4, {"ep": 2, "data_parallel": "ddp"}, r"ep=2 needs FSDP/HSDP.*data_parallel='ddp'"),
    ],
)
def test_expert_parallel_degree_is_checked_per_part(experts, language, message):
    """R15: these raised from inside parallelize (or ParallelDims) only when the loop reached the
    language model, the vision part already FSDP-wrapped, with no part name and, for experts
    ep does not divide, suggestions that did not fit the ranks."""
    with pytest.raises(ValueError, match="part 'language_model': " + message):
        _validate(_MoEVLM(experts), _parts(**language), 4)
    _validate(_MoEVLM(experts), _parts(ep=2), 4)  # what fits


def test_world_size_error_suggests_degrees():
    model = _MoEVLM()
    parts = {"vision": SubmoduleParallel(), "language_model": SubmoduleParallel(tp=4, plan={})}
    with pytest.raises(ValueError, match=r"divide the world size 6; .*tp can be \[1, 2, 3, 6\]"):
        _validate(model, parts, 6)
