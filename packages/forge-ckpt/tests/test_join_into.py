"""Joins written straight into a target tensor give the bits of the joined tensor."""

from __future__ import annotations

import pytest
import torch

from forge_ckpt.mapping import Concat, GroupedQKV, PadDim, Rule, StackExperts

CTX = {"num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 4, "vocab_size": 10}


def _parts(*shapes: tuple[int, ...]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen) for s in shapes]


@pytest.mark.parametrize(
    ("join", "shapes"),
    [
        (Concat(dim=0), [(3, 5), (3, 5)]),
        (Concat(dim=1, sizes=(2, 3)), [(4, 2), (4, 3)]),
        (GroupedQKV(), [(24, 5), (8, 5), (8, 5)]),
        (GroupedQKV(), [(24,), (8,), (8,)]),  # biases
        (StackExperts(groups=2, dim=1), [(3, 5)] * 8),  # gate + up of 4 experts
        (StackExperts(groups=1), [(5, 3)] * 4),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_join_into_matches_join(join, shapes, dtype):
    parts = _parts(*shapes)
    want = join.join(parts, CTX).to(dtype)
    out = torch.full(want.shape, float("nan"), dtype=dtype)
    join.join_into(out, parts, CTX)
    assert torch.equal(out, want)


def test_join_into_refuses_a_target_of_another_shape():
    parts = _parts((3, 5), (3, 5))
    with pytest.raises(ValueError, match=r"joined tensor has shape \[6, 5\], the target \[6, 4\]"):
        Concat(dim=0).join_into(torch.empty(6, 4), parts, CTX)


def test_to_forge_into_with_transforms_after_the_join():
    rule = Rule(
        "w",
        ("a", "b"),
        concat=Concat(dim=0),
        transforms=(PadDim(size="vocab_size", multiple=4),),
    ).bind(CTX)
    parts = _parts((5, 3), (5, 3))
    want = rule.to_forge(parts, CTX)
    assert want.shape == (12, 3)
    out = torch.empty(12, 3)
    rule.to_forge_into(out, parts, CTX)
    assert torch.equal(out, want)
    with pytest.raises(ValueError, match="the target"):
        rule.to_forge_into(torch.empty(10, 3), parts, CTX)
