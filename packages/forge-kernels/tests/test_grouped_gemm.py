"""Grouped GEMM over experts (Triton, torch._grouped_mm and loop backends) and a whole MoE layer.

On a machine without CUDA the root conftest sets ``TRITON_INTERPRET=1``, so the Triton kernels run
interpreted on CPU (shapes are tiny: the interpreter is slow); the parity tests check the kernel
launch counters and the backend counter, so they cannot pass by falling back to the loop. The
``torch`` backend is checked on CPU through ``torch._grouped_mm``'s portable fallback, which shares
its API and autograd with the CUDA kernel; ``auto`` picks it only on sm90/sm100 GPUs.
"""

from __future__ import annotations

import importlib
import zlib

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from forge_kernels import registry
from forge_kernels._triton_support import can_use_triton
from forge_kernels.moe import (
    BACKEND_CALLS,
    grouped_mm,
    grouped_mm_backend,
    grouped_mm_reference,
    moe_permute,
    moe_topk_routing,
    moe_unpermute,
)

triton_module = importlib.import_module("forge_kernels.moe.grouped_gemm_triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

pytestmark = pytest.mark.skipif(
    not can_use_triton(torch.empty(0, device=DEVICE)),
    reason="Triton cannot run here (needs CUDA, or TRITON_INTERPRET=1 on CPU)",
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative to the largest expected magnitude; the GEMMs accumulate in fp32 and round once.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}

# Rows per expert: zeros (first, middle and last experts), one expert spanning two 32-row tiles.
COUNTS = [0, 37, 5, 0, 11, 0]
K_DIM, N_DIM = 40, 36  # two K blocks and two N tiles of the interpreter's 32


def _gen(*params) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(params).encode()))


def _operands(dtype, transpose_weight, gen, counts=COUNTS, k_dim=K_DIM, n_dim=N_DIM):
    experts, rows = len(counts), sum(counts)
    x = torch.randn(rows, k_dim, generator=gen).to(DEVICE, dtype)
    shape = (experts, n_dim, k_dim) if transpose_weight else (experts, k_dim, n_dim)
    w = (torch.randn(shape, generator=gen) / k_dim**0.5).to(DEVICE, dtype)
    return x, w, torch.tensor(counts, device=DEVICE)


def _run(fn, x, w, gen_seed):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = fn(x, w)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(gen_seed)).to(DEVICE, y.dtype)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    return y, dx, dw


def _assert_close(actual, expected, dtype):
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    tol = TOL[dtype]
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


def _reference(x, w, counts, transpose_weight):
    """The loop reference in fp64 (fp32 inputs) or fp32 (half inputs), cast back."""
    compute = torch.float64 if x.dtype == torch.float32 else torch.float32
    y = grouped_mm_reference(
        x.to(compute), w.to(compute), counts, transpose_weight=transpose_weight
    )
    return y.to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transpose_weight", [False, True], ids=["EKN", "ENK"])
def test_triton_matches_reference(dtype, transpose_weight):
    gen = _gen("triton", dtype, transpose_weight)
    x, w, counts = _operands(dtype, transpose_weight, gen)
    launches = dict(triton_module.KERNEL_LAUNCHES)
    calls = BACKEND_CALLS["triton"]
    got = _run(
        lambda x, w: grouped_mm(x, w, counts, transpose_weight=transpose_weight), x, w, gen_seed=3
    )
    assert BACKEND_CALLS["triton"] == calls + 1, "auto did not pick the Triton backend"
    for name in ("grouped_mm_fwd", "grouped_mm_dx", "grouped_mm_dw"):
        assert triton_module.KERNEL_LAUNCHES[name] == launches.get(name, 0) + 1, (
            f"{name} did not run"
        )
    want = _run(lambda x, w: _reference(x, w, counts, transpose_weight), x, w, gen_seed=3)
    for g, r in zip(got, want, strict=True):
        _assert_close(g, r, dtype)
    # Experts without tokens get an exactly zero weight gradient.
    dw = got[2]
    assert (dw[torch.tensor(COUNTS) == 0] == 0).all()


def test_reference_matches_naive_rows():
    """The loop reference (the parity target above) against a row-by-row fp64 product."""
    gen = _gen("naive")
    x, w, counts = _operands(torch.float32, False, gen)
    expert_of_row = [e for e, c in enumerate(COUNTS) for _ in range(c)]
    want = torch.stack([x[r].double() @ w[e].double() for r, e in enumerate(expert_of_row)])
    got = grouped_mm_reference(x, w, counts)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    got_t = grouped_mm_reference(x, w.transpose(1, 2).contiguous(), counts, transpose_weight=True)
    torch.testing.assert_close(got_t, got)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm is missing")
@pytest.mark.parametrize("transpose_weight", [False, True], ids=["EKN", "ENK"])
def test_torch_backend_matches_reference(transpose_weight):
    """The torch._grouped_mm wrapper's forward and custom backward (fp32; 16-byte aligned K, N)."""
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    gen = _gen("torch", transpose_weight)
    x, w, counts = _operands(dtype, transpose_weight, gen, k_dim=24, n_dim=16)
    calls = BACKEND_CALLS["torch"]
    got = _run(
        lambda x, w: grouped_mm(x, w, counts, transpose_weight=transpose_weight, backend="torch"),
        x,
        w,
        gen_seed=4,
    )
    assert BACKEND_CALLS["torch"] == calls + 1
    want = _run(lambda x, w: _reference(x, w, counts, transpose_weight), x, w, gen_seed=4)
    for g, r in zip(got, want, strict=True):
        _assert_close(g, r, dtype)
    assert (got[2][torch.tensor(COUNTS) == 0] == 0).all()


@pytest.mark.parametrize("backend", ["triton", "loop", "torch"])
def test_no_tokens_at_all(backend):
    if backend == "torch" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm is missing")
    x = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(3, 8, 4, device=DEVICE, requires_grad=True)
    y = grouped_mm(x, w, torch.zeros(3, dtype=torch.int64, device=DEVICE), backend=backend)
    assert y.shape == (0, 4)
    dx, dw = torch.autograd.grad(y.sum(), (x, w))
    assert dx.shape == (0, 8)
    assert dw.shape == w.shape
    assert (dw == 0).all()


def test_backend_choice(monkeypatch):
    x = torch.randn(4, 8, device=DEVICE)
    w = torch.randn(2, 8, 8, device=DEVICE)
    counts = torch.tensor([1, 3], device=DEVICE)
    if DEVICE.type == "cpu":
        assert grouped_mm_backend(x, w, counts) == "triton"
        assert (
            grouped_mm_backend(x.bfloat16(), w.bfloat16(), counts) == "triton"
        )  # no CUTLASS on CPU
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # no interpreter: plain CPU runs the loop
        assert grouped_mm_backend(x, w, counts) == "loop"
        monkeypatch.undo()
    # fp64 has no kernel: the loop runs, and says so.
    calls = BACKEND_CALLS["loop"]
    y = grouped_mm(x.double(), w.double(), counts)
    assert grouped_mm_backend(x.double(), w.double(), counts) == "loop"
    assert BACKEND_CALLS["loop"] == calls + 1
    torch.testing.assert_close(y[:1], x[:1].double() @ w[0].double())


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] not in (9, 10),
    reason="torch._grouped_mm's CUTLASS path needs an sm90/sm100 GPU",
)
def test_auto_picks_torch_grouped_mm_on_hopper():
    x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4, 64, 32, device="cuda", dtype=torch.bfloat16)
    counts = torch.tensor([0, 40, 24, 0], device="cuda")
    assert grouped_mm_backend(x, w, counts) == "torch"
    assert grouped_mm_backend(x, w[:, :, :30], counts) == "triton"  # N not 16-byte aligned
    assert grouped_mm_backend(x.float(), w.float(), counts) == "triton"


def test_dispatches_through_registry():
    sentinel = object()
    with registry.overridden("grouped_mm", lambda *a, **k: sentinel):
        assert grouped_mm(torch.randn(2, 3), torch.randn(1, 3, 2), torch.tensor([2])) is sentinel
    assert registry.get_reference("grouped_mm") is grouped_mm_reference


def test_bad_arguments():
    x, w, counts = torch.randn(6, 8), torch.randn(3, 8, 4), torch.tensor([2, 0, 4])
    with pytest.raises(ValueError, match="transpose_weight=True"):
        grouped_mm(x, torch.randn(3, 4, 8), counts)
    with pytest.raises(ValueError, match="transpose_weight=False"):
        grouped_mm(x, w, counts, transpose_weight=True)
    with pytest.raises(ValueError, match="one dtype"):
        grouped_mm(x, w.double(), counts)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        grouped_mm(x, w, torch.tensor([6]))
    with pytest.raises(ValueError, match="integer"):
        grouped_mm(x, w, counts.float())
    with pytest.raises(ValueError, match="backend must be one of"):
        grouped_mm(x, w, counts, backend="cutlass")
    with pytest.raises(ValueError, match="sums to 5"):
        grouped_mm(x, w, torch.tensor([1, 0, 4]), backend="loop")


# --------------------------------------------------------------------------------------------
# A whole MoE layer: routing + permute + grouped GEMMs + SwiGLU + unpermute
# --------------------------------------------------------------------------------------------


def forge_moe(hidden, router_weight, gate_up_proj, down_proj, *, top_k, norm_topk_prob):
    """Qwen3-MoE's sparse block from forge ops; weights in transformers' [E, out, in] layout."""
    routing = moe_topk_routing(
        F.linear(hidden, router_weight), top_k=top_k, norm_topk_prob=norm_topk_prob
    )
    perm = moe_permute(hidden, routing.indices, num_experts=gate_up_proj.shape[0])
    gate_up = grouped_mm(perm.hidden, gate_up_proj, perm.tokens_per_expert, transpose_weight=True)
    gate, up = gate_up.chunk(2, dim=-1)
    act = F.silu(gate) * up
    out = grouped_mm(act, down_proj, perm.tokens_per_expert, transpose_weight=True)
    return moe_unpermute(out, perm.slot_positions, routing_weights=routing.weights)


def naive_moe(hidden, router_weight, gate_up_proj, down_proj, *, top_k, norm_topk_prob):
    """Token by token: softmax router, top-k, each chosen expert's SwiGLU MLP, weighted sum."""
    outs = []
    for h in hidden:
        probs = (router_weight @ h).softmax(-1)
        weights, experts = probs.topk(top_k)
        if norm_topk_prob:
            weights = weights / weights.sum()
        acc = torch.zeros_like(h)
        for w_e, e in zip(weights, experts.tolist(), strict=True):
            gate, up = (gate_up_proj[e] @ h).chunk(2)
            acc = acc + w_e * (down_proj[e] @ (F.silu(gate) * up))
        outs.append(acc)
    return torch.stack(outs)


def _moe_params(gen, tokens=37, hidden=24, experts=6, inter=16):
    return {
        "hidden": torch.randn(tokens, hidden, generator=gen),
        "router_weight": torch.randn(experts, hidden, generator=gen),
        "gate_up_proj": torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5,
        "down_proj": torch.randn(experts, hidden, inter, generator=gen) / inter**0.5,
    }


def _grads(fn, params, dtype, seed, **kwargs):
    leaves = {k: v.detach().clone().to(DEVICE, dtype).requires_grad_() for k, v in params.items()}
    out = fn(**leaves, **kwargs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    return (out, *torch.autograd.grad(out, list(leaves.values()), g))


def test_moe_layer_matches_naive():
    gen = _gen("moe_layer")
    params = _moe_params(gen)
    # Expert 5 unreachable: feature 0 is always >= 1 and expert 5's logit is -50 times it.
    params["hidden"][:, 0] = 1 + params["hidden"][:, 0].abs()
    params["router_weight"][5] = 0.0
    params["router_weight"][5, 0] = -50.0
    kwargs = {"top_k": 2, "norm_topk_prob": True}
    launches = dict(triton_module.KERNEL_LAUNCHES)
    got = _grads(forge_moe, params, torch.float32, seed=5, **kwargs)
    assert triton_module.KERNEL_LAUNCHES["grouped_mm_dw"] == launches.get("grouped_mm_dw", 0) + 2
    want = _grads(naive_moe, params, torch.float64, seed=5, **kwargs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w.float(), rtol=1e-4, atol=1e-5)
    # No tokens, no gradient for expert 5's weights (gate_up_proj, down_proj).
    assert (got[3][5] == 0).all()
    assert (got[4][5] == 0).all()


@pytest.mark.parametrize("norm_topk_prob", [False, True], ids=["plain", "norm"])
def test_moe_layer_matches_transformers_qwen3(norm_topk_prob):
    pytest.importorskip("transformers")
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = Qwen3MoeConfig(
        hidden_size=24,
        moe_intermediate_size=16,
        num_experts=6,
        num_experts_per_tok=2,
        norm_topk_prob=norm_topk_prob,
        hidden_act="silu",
    )
    block = Qwen3MoeSparseMoeBlock(config).to(DEVICE)
    params = _moe_params(_gen("qwen3_block", norm_topk_prob))
    with torch.no_grad():
        block.gate.weight.copy_(params["router_weight"])
        block.experts.gate_up_proj.copy_(params["gate_up_proj"])
        block.experts.down_proj.copy_(params["down_proj"])
    hidden = params["hidden"].to(DEVICE).requires_grad_()
    want = block(hidden.view(1, 37, 24)).view(37, 24)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    tf_params = [hidden, block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj]
    want_grads = torch.autograd.grad(want, tf_params, g)

    got = _grads(forge_moe, params, torch.float32, seed=6, top_k=2, norm_topk_prob=norm_topk_prob)
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1:], want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
