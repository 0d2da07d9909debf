"""MoE token permute / unpermute: Triton kernels vs the eager reference and a naive loop.

On a machine without CUDA the root conftest sets ``TRITON_INTERPRET=1``, so the Triton kernels run
interpreted on CPU; the parity tests check the kernel launch counters, so they cannot pass by
falling back to the reference.
"""

from __future__ import annotations

import importlib
import zlib

import pytest
import torch

pytest.importorskip("triton")

from forge_kernels import registry
from forge_kernels._triton_support import can_use_triton
from forge_kernels.moe import (
    moe_permute,
    moe_permute_reference,
    moe_unpermute,
    moe_unpermute_reference,
)

permute_module = importlib.import_module("forge_kernels.moe.permute")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

pytestmark = pytest.mark.skipif(
    not can_use_triton(torch.empty(0, device=DEVICE)),
    reason="Triton cannot run here (needs CUDA, or TRITON_INTERPRET=1 on CPU)",
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative to the largest expected magnitude. bf16 is loose because the interpreter truncates
# fp32 -> bf16 instead of rounding to nearest (1 ulp), on top of the reference's own roundings.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}

# (tokens, experts, top_k, hidden): the main odd case (experts 4 and 5 get no tokens), top-1,
# hidden 1, and a row wider than one column block (1024) so the kernels loop over columns.
SHAPES = [(37, 6, 2, 24), (5, 3, 1, 1), (16, 3, 3, 1030)]


def _gen(*params) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(params).encode()))


def _indices(tokens, experts, top_k, gen) -> torch.Tensor:
    """Distinct experts per token from the first ``experts - 2`` (the last two get no tokens)."""
    usable = max(experts - 2, top_k)
    scores = torch.rand(tokens, usable, generator=gen)
    return scores.topk(top_k, dim=-1).indices.to(DEVICE)


def _assert_close(actual, expected, dtype):
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    tol = TOL[dtype]
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


def naive_permute(x, idx, num_experts):
    """Expert by expert, token by token: the rows, their (token, slot) and the counts."""
    rows, slots, counts = [], [], []
    idx = idx.tolist()
    for e in range(num_experts):
        n = 0
        for t in range(len(idx)):
            for j in range(len(idx[t])):
                if idx[t][j] == e:
                    rows.append(x[t])
                    slots.append(t * len(idx[t]) + j)
                    n += 1
        counts.append(n)
    return torch.stack(rows), slots, counts


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_permute_matches_naive(shape):
    tokens, experts, top_k, hidden = shape
    gen = _gen("naive", shape)
    x = torch.randn(tokens, hidden, generator=gen).to(DEVICE)
    idx = _indices(tokens, experts, top_k, gen)

    perm = moe_permute(x, idx, num_experts=experts)
    rows, slots, counts = naive_permute(x.cpu(), idx.cpu(), experts)
    assert torch.equal(perm.hidden.cpu(), rows)
    assert perm.sorted_slots.tolist() == slots
    assert perm.tokens_per_expert.tolist() == counts
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    assert perm.expert_offsets.tolist() == offsets
    assert perm.slot_positions.shape == (tokens, top_k)
    positions = perm.slot_positions.tolist()
    for t in range(tokens):
        for j in range(top_k):
            assert slots[positions[t][j]] == t * top_k + j

    # Unpermute: out[t] = sum_j w[t, j] * y[pos[t, j]], in fp64 here.
    y = torch.randn(tokens * top_k, hidden, generator=gen).to(DEVICE)
    w = torch.rand(tokens, top_k, generator=gen).to(DEVICE)
    out = moe_unpermute(y, perm.slot_positions, routing_weights=w)
    y64, w64 = y.cpu().double(), w.cpu().double()
    want = torch.stack(
        [sum(w64[t, j] * y64[positions[t][j]] for j in range(top_k)) for t in range(tokens)]
    )
    torch.testing.assert_close(out.cpu(), want.float(), rtol=1e-5, atol=1e-5)


def _check(fn, ref, inputs: dict, dtype, seed, *, n_grad_from: int = 1):
    """Run ``fn`` and ``ref`` on cloned leaves; compare outputs and the leaves' gradients."""
    results = []
    for f in (fn, ref):
        leaves = {
            k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()
        }
        outs = f(**leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        outs = outs[:n_grad_from]
        gen = torch.Generator().manual_seed(seed)
        grads_out = [torch.randn(o.shape, generator=gen).to(DEVICE, o.dtype) for o in outs]
        grad_leaves = [v for v in leaves.values() if v.requires_grad]
        grads = torch.autograd.grad(outs, grad_leaves, grads_out)
        results.append(tuple(outs) + tuple(grads))
    for got, want in zip(*results, strict=True):
        _assert_close(got, want, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_permute_matches_reference(shape, dtype):
    tokens, experts, top_k, hidden = shape
    gen = _gen("permute", shape, dtype)
    x = torch.randn(tokens, hidden, generator=gen).to(DEVICE, dtype)
    idx = _indices(tokens, experts, top_k, gen)
    before = dict(permute_module.KERNEL_LAUNCHES)
    _check(
        lambda x: moe_permute(x, idx, num_experts=experts),
        lambda x: moe_permute_reference(x, idx, num_experts=experts),
        {"x": x},
        dtype,
        seed=1,
    )
    for name in ("moe_permute_fwd", "moe_permute_bwd"):
        assert permute_module.KERNEL_LAUNCHES[name] == before.get(name, 0) + 1, (
            f"{name} did not run"
        )


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weights", ["none", "same_dtype", "fp32"])
def test_unpermute_matches_reference(shape, dtype, weights):
    tokens, experts, top_k, hidden = shape
    gen = _gen("unpermute", shape, dtype, weights)
    idx = _indices(tokens, experts, top_k, gen)
    positions = moe_permute_reference(
        torch.empty(tokens, 0, device=DEVICE), idx, num_experts=experts
    ).slot_positions
    inputs = {"y": torch.randn(tokens * top_k, hidden, generator=gen).to(DEVICE, dtype)}
    if weights != "none":
        w_dtype = dtype if weights == "same_dtype" else torch.float32
        inputs["w"] = torch.rand(tokens, top_k, generator=gen).to(DEVICE, w_dtype)
    before = dict(permute_module.KERNEL_LAUNCHES)
    _check(
        lambda y, w=None: moe_unpermute(y, positions, routing_weights=w),
        lambda y, w=None: moe_unpermute_reference(y, positions, routing_weights=w),
        inputs,
        dtype,
        seed=2,
    )
    for name in ("moe_unpermute_fwd", "moe_unpermute_bwd"):
        assert permute_module.KERNEL_LAUNCHES[name] == before.get(name, 0) + 1, (
            f"{name} did not run"
        )


def test_round_trip_and_strided_input():
    """Unpermute(permute(x)) with unit weights is top_k * x; x may be a strided column slice."""
    gen = _gen("round_trip")
    wide = torch.randn(37, 40, generator=gen).to(DEVICE)
    x = wide[:, 8:32]  # row stride 40
    idx = _indices(37, 6, 2, gen)
    perm = moe_permute(x, idx, num_experts=6)
    back = moe_unpermute(perm.hidden, perm.slot_positions)
    torch.testing.assert_close(back, 2 * x)
    weights = torch.full((37, 2), 0.5, device=DEVICE)
    torch.testing.assert_close(
        moe_unpermute(perm.hidden, perm.slot_positions, routing_weights=weights), x
    )


def test_empty_inputs():
    x = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    idx = torch.empty(0, 2, dtype=torch.int64, device=DEVICE)
    perm = moe_permute(x, idx, num_experts=4)
    assert perm.hidden.shape == (0, 8)
    assert perm.tokens_per_expert.tolist() == [0, 0, 0, 0]
    assert perm.expert_offsets.tolist() == [0, 0, 0, 0, 0]
    out = moe_unpermute(perm.hidden, perm.slot_positions)
    assert out.shape == (0, 8)


def test_dispatches_through_registry():
    sentinel = object()
    with registry.overridden("moe_permute", lambda *a, **k: sentinel):
        assert (
            moe_permute(torch.randn(2, 3), torch.zeros(2, 1, dtype=torch.long), num_experts=2)
            is sentinel
        )
    with registry.overridden("moe_unpermute", lambda *a, **k: sentinel):
        assert moe_unpermute(torch.randn(2, 3), torch.zeros(2, 1, dtype=torch.long)) is sentinel
    assert registry.get_reference("moe_permute") is moe_permute_reference
    assert registry.get_reference("moe_unpermute") is moe_unpermute_reference


def test_bad_arguments():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"reshape\(-1, hidden.shape\[-1\]\)"):
        moe_permute(x.view(2, 2, 8), torch.zeros(4, 2, dtype=torch.long), num_experts=2)
    with pytest.raises(ValueError, match=r"tokens=4"):
        moe_permute(x, torch.zeros(3, 2, dtype=torch.long), num_experts=2)
    with pytest.raises(ValueError, match="integer"):
        moe_permute(x, torch.zeros(4, 2), num_experts=2)
    with pytest.raises(ValueError, match="slot_positions"):
        moe_unpermute(torch.randn(8, 3), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="routing_weights must have the shape"):
        moe_unpermute(
            torch.randn(8, 3), torch.zeros(4, 2, dtype=torch.long), routing_weights=torch.ones(4)
        )
