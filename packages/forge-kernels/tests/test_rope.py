"""RoPE: cos/sin builders against the reference equations (and transformers / diffusers when
installed), the Triton apply kernel against the eager reference, forward and backward."""

from __future__ import annotations

import ast
import inspect
import math
import sys
import zlib

import pytest
import torch

from forge_kernels import registry
from forge_kernels.rope import (
    Llama3RopeScaling,
    apply_rope,
    apply_rope_,
    apply_rope_reference,
    factorized_3d_cos_sin,
    grid_position_ids,
    mrope_cos_sin,
    packed_position_ids,
    rope_cos_sin,
    rope_inv_freq,
    wan_rope_axis_dims,
    wan_rope_cos_sin,
)
from forge_kernels.rope import apply as apply_mod

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (rtol, atol) per dtype. The kernel and the reference both compute in float32 and round once to
# the storage dtype; bf16 gets a full ulp because the CPU interpreter rounds float32 -> bf16
# towards zero instead of to nearest.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


def assert_close(actual, expected, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@pytest.fixture
def kernel_launches(monkeypatch):
    """Counts launches of the Triton kernel: proof that the Triton path ran."""
    calls = []
    real = apply_mod._launch_rope_kernel

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(apply_mod, "_launch_rope_kernel", spy)
    return calls


# --------------------------------------------------------------------------------------------
# Independent statements of the reference equations.
# --------------------------------------------------------------------------------------------


def rotate_half(x):  # transformers' Llama
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rope_textbook(x, cos, sin, layout):
    """RoPE written as the papers do: rotate_half for "half", complex multiply for "interleaved".
    x: [*tok, H, D] float64; cos/sin: [*tok, R]."""
    rd = 2 * cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    if layout == "half":
        c = torch.cat((cos, cos), -1).unsqueeze(-2)
        s = torch.cat((sin, sin), -1).unsqueeze(-2)
        out = rot * c + rotate_half(rot) * s
    else:
        z = torch.view_as_complex(rot.reshape(*rot.shape[:-1], -1, 2).contiguous())
        out = torch.view_as_real(z * torch.complex(cos, sin).unsqueeze(-2)).flatten(-2)
    return torch.cat((out, rest), -1)


# --------------------------------------------------------------------------------------------
# The apply kernel against the eager reference.
# --------------------------------------------------------------------------------------------

# name: (token shape, q heads, k heads, head_dim, rotary_dim, cos token shape)
CASES = {
    "packed-docs-hd24": ((7,), 3, 1, 24, 24, (7,)),
    "batched-partial-hd80": ((2, 5), 5, 5, 80, 48, (5,)),
    "batched-gqa-hd96": ((2, 4), 7, 1, 96, 96, (2, 4)),
    "packed-partial-hd64": ((9,), 2, 3, 64, 16, (9,)),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_cos_sin(tok_shape, cos_shape, rotary_dim, theta=10000.0):
    if len(cos_shape) == 1 and len(tok_shape) == 1:
        # Packed documents of lengths 3 and 4 (or 4 and 5): positions restart per document.
        n = cos_shape[0]
        pos = packed_position_ids(torch.tensor([0, n // 2, n]))
    elif len(cos_shape) == 1:
        pos = torch.arange(cos_shape[0])  # shared by the batch
    else:
        pos = torch.randint(0, 4096, cos_shape)  # per-sequence positions
    return rope_cos_sin(pos.to(DEVICE), rope_inv_freq(rotary_dim, theta=theta, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("case", list(CASES))
def test_apply_matches_reference(case, layout, dtype, kernel_launches):
    tok, hq, hk, d, rd, cos_tok = CASES[case]
    torch.manual_seed(zlib.crc32(f"{case}-{layout}-{dtype}".encode()))
    q0 = torch.randn(*tok, hq, d, device=DEVICE, dtype=dtype)
    k0 = torch.randn(*tok, hk, d, device=DEVICE, dtype=dtype)
    cos, sin = make_cos_sin(tok, cos_tok, rd)
    gq = torch.randn_like(q0)
    gk = torch.randn_like(k0)

    # Out of place.
    q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    qo, ko = apply_rope(q, k, cos, sin, layout=layout)
    (qo.float() * gq.float()).sum().add((ko.float() * gk.float()).sum()).backward()
    assert len(kernel_launches) == 2  # forward + backward, both through Triton

    qr, kr = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    qro, kro = apply_rope_reference(qr, kr, cos, sin, layout=layout)
    (qro.float() * gq.float()).sum().add((kro.float() * gk.float()).sum()).backward()

    assert qo.dtype == dtype
    assert qo.shape == q0.shape
    assert_close(qo, qro, dtype)
    assert_close(ko, kro, dtype)
    assert_close(q.grad, qr.grad, dtype)
    assert_close(k.grad, kr.grad, dtype)
    # Pass-through channels are copied bit for bit, forward and backward.
    assert torch.equal(qo[..., rd:], q0[..., rd:])
    assert torch.equal(q.grad[..., rd:], gq[..., rd:])

    # In place, on non-leaf tensors (as in a model), with the gradient reaching the leaves.
    ql, kl = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    qi, ki = ql * 1, kl * 1
    qi_out, ki_out = apply_rope_(qi, ki, cos, sin, layout=layout)
    assert qi_out is qi
    assert ki_out is ki
    assert_close(qi, qro, dtype)
    assert_close(ki, kro, dtype)
    (qi.float() * gq.float()).sum().add((ki.float() * gk.float()).sum()).backward()
    assert_close(ql.grad, qr.grad, dtype)
    assert_close(kl.grad, kr.grad, dtype)
    # In place: one launch rotates q and k; backward rotates each gradient.
    assert [c["backward"] for c in kernel_launches] == [False, True, False, True, True]


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_reference_matches_textbook_equations(layout):
    torch.manual_seed(0)
    q = torch.randn(2, 6, 3, 40, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(6), rope_inv_freq(32))
    cos, sin = cos.double(), sin.double()
    out, _ = apply_rope_reference(q, None, cos, sin, layout=layout)
    torch.testing.assert_close(out, rope_textbook(q, cos, sin, layout), rtol=1e-12, atol=1e-12)


def test_kernel_output_is_not_the_input(kernel_launches):
    # Guards against a kernel that silently does nothing: rotation by non-zero angles moves q.
    torch.manual_seed(1)
    q = torch.randn(5, 2, 16, device=DEVICE)
    cos, sin = rope_cos_sin(torch.arange(1, 6, device=DEVICE), rope_inv_freq(16, device=DEVICE))
    out, _ = apply_rope(q, None, cos, sin)
    assert kernel_launches
    assert (out - q).abs().max() > 0.1
    torch.testing.assert_close(out.norm(dim=-1), q.norm(dim=-1))  # rotations keep the norm


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_backward_kernel_is_inverse_rotation(layout, kernel_launches):
    torch.manual_seed(2)
    x = torch.randn(6, 3, 24, device=DEVICE)
    cos, sin = rope_cos_sin(torch.arange(6, device=DEVICE) * 37, rope_inv_freq(24, device=DEVICE))
    y, _ = apply_rope(x, None, cos, sin, layout=layout)
    back, _ = apply_mod._rotate_out_of_place(
        y, None, cos, sin, interleaved=layout == "interleaved", backward=True
    )
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)


def test_packed_positions_equal_per_document_rope(kernel_launches):
    """A packed batch with positions restarting per document = each document rotated alone."""
    torch.manual_seed(3)
    lengths = [3, 5, 2]
    cu = torch.tensor([0, 3, 8, 10])
    q = torch.randn(10, 4, 32, device=DEVICE)
    inv = rope_inv_freq(32, device=DEVICE)
    cos, sin = rope_cos_sin(packed_position_ids(cu).to(DEVICE), inv)
    packed, _ = apply_rope(q, None, cos, sin)
    start = 0
    for n in lengths:
        c, s = rope_cos_sin(torch.arange(n, device=DEVICE), inv)
        alone, _ = apply_rope(q[start : start + n], None, c, s)
        torch.testing.assert_close(packed[start : start + n], alone, rtol=0, atol=0)
        start += n


def test_inplace_into_fused_qkv_views(kernel_launches):
    """In place on strided views of a fused qkv projection; gradients reach the weight."""
    torch.manual_seed(4)
    t, h, d = 6, 3, 24
    x = torch.randn(t, 16, device=DEVICE)
    w = torch.randn(16, 3 * h * d, device=DEVICE, requires_grad=True)
    cos, sin = make_cos_sin((t,), (t,), d)

    def loss(rope):
        qkv = (x @ w).view(t, 3, h, d)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # non-contiguous views
        q, k = rope(q, k)
        return (q * k * v).sum() + (qkv**2).sum()  # qkv sees the rotated q and k

    w.grad = None
    loss(lambda q, k: apply_rope_(q, k, cos, sin)).backward()
    grad_kernel = w.grad.clone()
    assert kernel_launches
    w.grad = None
    loss(lambda q, k: apply_rope_reference(q, k, cos, sin, inplace=True)).backward()
    torch.testing.assert_close(grad_kernel, w.grad, rtol=1e-5, atol=1e-4)


def test_inplace_marks_dirty(kernel_launches):
    cos, sin = make_cos_sin((4,), (4,), 8)
    leaf = torch.randn(4, 2, 8, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        apply_rope_(leaf, None, cos, sin)

    # A tensor saved for backward by another op, then rotated in place: autograd must notice.
    base = torch.randn(4, 2, 8, device=DEVICE, requires_grad=True)
    q = base * 1
    saved_by_sin = q.sin()
    version = q._version
    apply_rope_(q, None, cos, sin)
    assert q._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved_by_sin.sum().backward()


def test_fallbacks_and_registry(monkeypatch, kernel_launches):
    torch.manual_seed(5)
    q = torch.randn(5, 2, 16, device=DEVICE)
    cos, sin = make_cos_sin((5,), (5,), 16)
    expected, _ = apply_rope_reference(q, None, cos, sin)

    # cos/sin that need a gradient go through the (differentiable) eager reference.
    cos_g = cos.clone().requires_grad_()
    out, _ = apply_rope(q, None, cos_g, sin)
    out.sum().backward()
    assert cos_g.grad is not None
    assert not kernel_launches

    # Reference mode from the environment.
    monkeypatch.setenv(registry.IMPL_ENV_VAR, "reference")
    assert registry.implementation_of("apply_rope") == "reference"
    apply_rope(q, None, cos, sin)
    assert not kernel_launches
    monkeypatch.delenv(registry.IMPL_ENV_VAR)

    # An override (as a plugin installs) is what apply_rope calls.
    seen = []

    def vendor_rope(q, k, cos, sin, *, layout="half", inplace=False):
        seen.append(layout)
        return apply_rope_reference(q, k, cos, sin, layout=layout, inplace=inplace)

    with registry.overridden("apply_rope", vendor_rope, source="test-vendor"):
        out, _ = apply_rope(q, None, cos, sin, layout="interleaved")
    assert seen == ["interleaved"]
    assert not kernel_launches

    # No Triton device: CPU without the interpreter falls back to the reference.
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        out, _ = apply_rope(q, None, cos, sin)
        assert not kernel_launches
        torch.testing.assert_close(out, expected)


def test_argument_errors():
    q = torch.randn(4, 2, 16)
    cos, sin = make_cos_sin((4,), (4,), 16)
    with pytest.raises(ValueError, match="layout"):
        apply_rope(q, None, cos, sin, layout="complex")
    big_cos = torch.zeros(4, 9)
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rope(q, None, big_cos, big_cos)
    with pytest.raises(ValueError, match="broadcast"):
        apply_rope(q, None, cos[:3], sin[:3])
    with pytest.raises(ValueError, match="token dims and head_dim"):
        apply_rope(q, torch.randn(5, 2, 16), cos, sin)
    with pytest.raises(ValueError, match="same tensor"):
        apply_rope_(q, q, cos, sin)
    with pytest.raises(ValueError, match="stride-0"):
        apply_rope_(torch.randn(1, 2, 16).expand(4, 2, 16), None, cos, sin)


def test_works_without_triton(monkeypatch, kernel_launches):
    """No module of forge_kernels.rope imports Triton at import time, and without Triton
    apply_rope runs the eager reference."""
    import forge_kernels.rope as rope_pkg
    from forge_kernels import _triton_support

    for module in (rope_pkg, apply_mod, sys.modules["forge_kernels.rope.frequencies"]):
        tree = ast.parse(inspect.getsource(module))
        for node in tree.body:  # module level only; the kernel builder imports Triton lazily
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "triton" for n in names), module.__name__

    monkeypatch.setattr(_triton_support, "triton_importable", lambda: False)
    q = torch.randn(3, 2, 8, device=DEVICE)
    cos, sin = make_cos_sin((3,), (3,), 8)
    out, _ = apply_rope(q, None, cos, sin)
    assert not kernel_launches
    assert torch.equal(out, apply_rope_reference(q, None, cos, sin)[0])


# --------------------------------------------------------------------------------------------
# Frequencies: 1D, Llama 3 scaling, packed positions.
# --------------------------------------------------------------------------------------------


def test_inv_freq_and_cos_sin_equations():
    inv = rope_inv_freq(10, theta=100.0)
    expected = [100.0 ** (-2 * i / 10) for i in range(5)]
    torch.testing.assert_close(inv, torch.tensor(expected), rtol=1e-6, atol=0)
    pos = torch.tensor([[0, 3], [7, 1]])
    cos, sin = rope_cos_sin(pos, inv)
    assert cos.shape == (2, 2, 5)
    assert cos.dtype == torch.float32
    torch.testing.assert_close(cos[1, 0, 2], torch.tensor(math.cos(7 * expected[2])))
    torch.testing.assert_close(sin[0, 1, 4], torch.tensor(math.sin(3 * expected[4])))


def llama3_textbook(inv_freq, factor, low, high, old_len):
    """Llama 3.1's scaling, per frequency, as written in Meta's reference code."""
    out = []
    for f in inv_freq.double().tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old_len / high:
            out.append(f)
        elif wavelen > old_len / low:
            out.append(f / factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(out, dtype=torch.float64)


def test_llama3_scaling_equations():
    scaling = Llama3RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
    )
    plain = rope_inv_freq(32, theta=500000.0)
    scaled = rope_inv_freq(32, theta=500000.0, llama3_scaling=scaling)
    expected = llama3_textbook(plain, 8.0, 1.0, 4.0, 64)
    torch.testing.assert_close(scaled.double(), expected, rtol=1e-6, atol=0)
    # All three regimes occur: kept, divided by factor, interpolated.
    ratio = plain / scaled
    assert ratio[0] == 1
    assert ratio[-1] == 8
    assert ((ratio > 1.01) & (ratio < 7.99)).any()
    with pytest.raises(ValueError, match="low_freq_factor < high_freq_factor"):
        Llama3RopeScaling(low_freq_factor=4.0, high_freq_factor=1.0)


def test_packed_position_ids():
    pos = packed_position_ids(torch.tensor([0, 3, 3, 7, 8]))
    assert pos.tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    with pytest.raises(ValueError, match="non-decreasing"):
        packed_position_ids(torch.tensor([0, 3, 2]))


# --------------------------------------------------------------------------------------------
# M-RoPE (Qwen2-VL) and factorized 3D RoPE (Wan).
# --------------------------------------------------------------------------------------------


def mrope_textbook(position_ids, inv_freq, mrope_section):
    """transformers 4.x ``Qwen2VLRotaryEmbedding`` + ``apply_multimodal_rotary_pos_emb``: full
    width cos ``cat(freqs, freqs)`` per component, then bands ``mrope_section * 2`` pick i % 3."""
    freqs = position_ids[..., None].float() * inv_freq.float()  # [3, *P, R]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    sections = list(mrope_section) * 2
    cos = torch.cat([m[i % 3] for i, m in enumerate(cos.split(sections, dim=-1))], dim=-1)
    sin = torch.cat([m[i % 3] for i, m in enumerate(sin.split(sections, dim=-1))], dim=-1)
    return cos, sin  # [*P, 2R]


def test_mrope_matches_reference_equations(kernel_launches):
    torch.manual_seed(6)
    section = [4, 6, 6]  # head_dim 32
    inv = rope_inv_freq(32, theta=1000000.0)
    pos = torch.randint(0, 50, (3, 2, 7))
    cos, sin = mrope_cos_sin(pos, inv, section)
    cos_full, sin_full = mrope_textbook(pos, inv, section)
    assert cos.shape == (2, 7, 16)
    assert torch.equal(cos, cos_full[..., :16])
    assert torch.equal(cos, cos_full[..., 16:])
    assert torch.equal(sin, sin_full[..., :16])
    # Band by band: the first 4 frequencies follow t, the next 6 h, the last 6 w.
    for band, comp in ((slice(0, 4), 0), (slice(4, 10), 1), (slice(10, 16), 2)):
        c, _ = rope_cos_sin(pos[comp], inv)
        assert torch.equal(cos[..., band], c[..., band])
    # Applied through the kernel = transformers' q * cos + rotate_half(q) * sin.
    q = torch.randn(2, 7, 3, 32, device=DEVICE)
    out, _ = apply_rope(q, None, cos.to(DEVICE), sin.to(DEVICE))
    expected = q * cos_full.unsqueeze(-2).to(DEVICE) + rotate_half(q) * sin_full.unsqueeze(-2).to(
        DEVICE
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert kernel_launches
    with pytest.raises(ValueError, match="sum to"):
        mrope_cos_sin(pos, inv, [4, 6, 5])


def test_factorized_3d_matches_reference_equations(kernel_launches):
    head_dim, theta = 24, 10000.0
    assert wan_rope_axis_dims(128) == (44, 42, 42)
    assert wan_rope_axis_dims(head_dim) == (8, 8, 8)
    assert wan_rope_axis_dims(36) == (12, 12, 12)
    grid = (2, 3, 4)
    cos, sin = wan_rope_cos_sin(grid, head_dim, theta=theta)
    assert cos.shape == (24, 12)
    assert cos.dtype == torch.float32
    # Token (f, h, w) in row-major order; axis a owns channels [offset_a, offset_a + dim_a).
    dims = wan_rope_axis_dims(head_dim)
    token = 0
    for f in range(grid[0]):
        for h in range(grid[1]):
            for w in range(grid[2]):
                angles = []
                for p, dim in zip((f, h, w), dims, strict=True):
                    angles += [p * theta ** (-2 * i / dim) for i in range(dim // 2)]
                expected = torch.tensor(angles, dtype=torch.float64)
                torch.testing.assert_close(cos[token].double(), expected.cos(), rtol=0, atol=1e-7)
                torch.testing.assert_close(sin[token].double(), expected.sin(), rtol=0, atol=1e-7)
                token += 1
    assert grid_position_ids(*grid)[:, 5].tolist() == [0, 1, 1]
    # Interleaved application = complex multiplication (Wan's reference code).
    torch.manual_seed(7)
    q = torch.randn(1, 24, 2, head_dim, device=DEVICE)
    out, _ = apply_rope(q, None, cos.to(DEVICE), sin.to(DEVICE), layout="interleaved")
    z = torch.view_as_complex(q.double().reshape(1, 24, 2, -1, 2))
    expected = torch.view_as_real(
        z * torch.complex(cos.double(), sin.double()).to(DEVICE)[None, :, None]
    ).flatten(-2)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert kernel_launches
    with pytest.raises(ValueError, match="one row per axis"):
        factorized_3d_cos_sin(torch.zeros(2, 5, dtype=torch.long), (8, 8, 8))


# --------------------------------------------------------------------------------------------
# Parity with transformers / diffusers (run when they are installed).
# --------------------------------------------------------------------------------------------


def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def test_llama3_parity_with_transformers():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    params = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    if transformers_major() >= 5:
        config = LlamaConfig(
            hidden_size=64,
            num_attention_heads=2,
            head_dim=32,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **params},
        )
    else:
        config = LlamaConfig(
            hidden_size=64,
            num_attention_heads=2,
            head_dim=32,
            rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", **params},
        )
    hf = LlamaRotaryEmbedding(config)
    inv = rope_inv_freq(32, theta=500000.0, llama3_scaling=Llama3RopeScaling(**params))
    assert torch.equal(inv, hf.inv_freq)

    pos = torch.tensor([[0, 5, 17, 100, 4000], [3, 2, 1, 0, 9]])
    cos_hf, sin_hf = hf(torch.zeros(1), pos)
    cos, sin = rope_cos_sin(pos, inv)
    assert torch.equal(cos, cos_hf[..., :16])
    assert torch.equal(sin, sin_hf[..., 16:])

    torch.manual_seed(8)
    q, k = torch.randn(2, 5, 4, 32), torch.randn(2, 5, 2, 32)
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos_hf, sin_hf)
    qo, ko = apply_rope(q.to(DEVICE), k.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE))
    torch.testing.assert_close(qo.cpu(), q_hf.transpose(1, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ko.cpu(), k_hf.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_partial_rotary_parity_with_transformers_gpt_neox():
    pytest.importorskip("transformers")
    from transformers import GPTNeoXConfig
    from transformers.models.gpt_neox import modeling_gpt_neox as neox

    if transformers_major() >= 5:
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
        config = GPTNeoXConfig(hidden_size=64, num_attention_heads=2, rope_parameters=rope)
    else:
        config = GPTNeoXConfig(hidden_size=64, num_attention_heads=2, rotary_pct=0.25)
    hf = neox.GPTNeoXRotaryEmbedding(config)
    assert torch.equal(rope_inv_freq(8), hf.inv_freq)
    pos = torch.arange(6)[None]
    cos_hf, sin_hf = hf(torch.zeros(1), pos)
    cos, sin = rope_cos_sin(pos, rope_inv_freq(8))
    torch.manual_seed(9)
    q, k = torch.randn(1, 6, 2, 32), torch.randn(1, 6, 2, 32)
    q_hf, k_hf = neox.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos_hf, sin_hf)
    qo, ko = apply_rope(q.to(DEVICE), k.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE))
    torch.testing.assert_close(qo.cpu(), q_hf.transpose(1, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ko.cpu(), k_hf.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_mrope_parity_with_transformers_qwen2_vl():
    pytest.importorskip("transformers")
    from transformers.models.qwen2_vl import modeling_qwen2_vl as qwen2_vl
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig

    section = [2, 3, 3]  # head_dim 16
    if transformers_major() >= 5:
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
        config = Qwen2VLTextConfig(hidden_size=64, num_attention_heads=4, rope_parameters=rope)
    else:
        config = Qwen2VLTextConfig(
            hidden_size=64,
            num_attention_heads=4,
            rope_theta=10000.0,
            rope_scaling={"type": "mrope", "mrope_section": section},
        )
    hf = qwen2_vl.Qwen2VLRotaryEmbedding(config)
    torch.manual_seed(10)
    pos = torch.randint(0, 40, (3, 2, 5))
    cos, sin = mrope_cos_sin(pos, rope_inv_freq(16), section)
    q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16)
    cos_hf, sin_hf = hf(torch.zeros(1), pos)
    if hasattr(qwen2_vl, "apply_multimodal_rotary_pos_emb"):  # transformers 4.x: [3, B, S, D]
        q_hf, k_hf = qwen2_vl.apply_multimodal_rotary_pos_emb(
            q.transpose(1, 2), k.transpose(1, 2), cos_hf, sin_hf, section
        )
    else:  # transformers >= 5: the embedding already recomposed the bands
        assert torch.equal(cos, cos_hf[..., :8])
        assert torch.equal(sin, sin_hf[..., 8:])
        q_hf, k_hf = qwen2_vl.apply_rotary_pos_emb(
            q.transpose(1, 2), k.transpose(1, 2), cos_hf, sin_hf
        )
    qo, ko = apply_rope(q.to(DEVICE), k.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE))
    torch.testing.assert_close(qo.cpu(), q_hf.transpose(1, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ko.cpu(), k_hf.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_wan_parity_with_diffusers():
    pytest.importorskip("diffusers")
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    head_dim, patch = 24, (1, 2, 2)
    hf = WanRotaryPosEmbed(head_dim, patch, max_seq_len=1024)
    video = torch.zeros(1, 4, 3, 4, 6)  # [B, C, F, H, W] -> grid (3, 2, 3)
    cos_d, sin_d = hf(video)  # [1, L, 1, head_dim], each value twice
    cos, sin = wan_rope_cos_sin((3, 2, 3), head_dim)
    assert torch.equal(cos, cos_d[0, :, 0, 0::2])
    assert torch.equal(sin, sin_d[0, :, 0, 1::2])

    torch.manual_seed(11)
    q = torch.randn(2, 18, 3, head_dim)
    expected = apply_rotary_emb(q, (cos_d[0, :, 0], sin_d[0, :, 0]), use_real=True, sequence_dim=1)
    out, _ = apply_rope(q.to(DEVICE), None, cos.to(DEVICE), sin.to(DEVICE), layout="interleaved")
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)
