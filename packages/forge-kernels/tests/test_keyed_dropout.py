"""Keyed dropout: the Triton kernel against the eager reference (masks bit for bit, outputs and
gradients), the mask's statistics, what autograd saves, argument errors, and a compile of the
kernel for sm90.

On a machine without CUDA the root conftest sets ``TRITON_INTERPRET=1``, so the kernel runs
interpreted on CPU (sizes stay small); every parity test checks the kernel launch counters, so
it cannot pass by falling back to the reference.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from forge_kernels import registry
from forge_kernels._triton_support import can_use_triton
from forge_kernels.dropout import keyed_dropout, keyed_dropout_mask, keyed_dropout_reference
from forge_kernels.dropout.keyed_dropout_kernels import KERNEL_LAUNCHES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

pytestmark = pytest.mark.skipif(
    not can_use_triton(torch.empty(0, device=DEVICE)),
    reason="Triton cannot run here (needs CUDA, or TRITON_INTERPRET=1 on CPU)",
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

#: (x shape, feature_offset, p, salt): 1 token, odd (non-power-of-two) features, 3-D, a
#: feature shard past 2**31, salts 0, 1 (a value Triton would specialize) and 2**32 - 1, p = 0
#: and p close to 1, features wider than one tile (1024).
CASES = [
    ((1, 5), 0, 0.5, 1),
    ((7, 37), 3, 0.1, 0),
    ((2, 3, 130), 2**31 + 5, 0.3, 2**32 - 1),
    ((5, 1100), 17, 0.75, 123456789),
    ((4, 9), 0, 0.0, 99),
    ((16, 24), 1, 0.999, 2**31),
]


def _keys(tokens: int, seed: int) -> torch.Tensor:
    """Random int64 keys, with padding (-1), a negative key and one past 32 bits among them."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randint(0, 2**32, (tokens,), generator=gen)
    keys[0] = -1
    if tokens > 2:
        keys[1], keys[2] = -7, 2**40 + 5
    return keys.to(DEVICE)


def _launches() -> tuple[int, int]:
    return KERNEL_LAUNCHES["keyed_dropout_fwd"], KERNEL_LAUNCHES["keyed_dropout_bwd"]


@pytest.mark.parametrize(("shape", "feature_offset", "p", "salt"), CASES)
def test_kernel_mask_is_the_reference_mask_bit_for_bit(shape, feature_offset, p, salt):
    """Ones in, ``keep / (1 - p)`` out: the kernel's mask is where the output is non-zero."""
    tokens = math.prod(shape[:-1])
    keys = _keys(tokens, seed=tokens)
    before = _launches()
    y = keyed_dropout(
        torch.ones(shape, device=DEVICE), keys, p=p, salt=salt, feature_offset=feature_offset
    )
    assert _launches()[0] == before[0] + 1, "the Triton kernel did not run"
    expected = keyed_dropout_mask(
        keys, features=shape[-1], p=p, salt=salt, feature_offset=feature_offset
    )
    assert torch.equal(y.reshape(tokens, -1) != 0, expected)
    # Shards of these features draw their slices of this mask.
    split = shape[-1] // 2
    shards = [
        keyed_dropout_mask(keys, features=n, p=p, salt=salt, feature_offset=feature_offset + o)
        for o, n in ((0, split), (split, shape[-1] - split))
    ]
    assert torch.equal(expected, torch.cat(shards, dim=1))


def _ulp_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal on a CPU except bf16 (the interpreter truncates fp32 -> bf16 instead of rounding);
    1 ulp on a GPU (torch's CUDA division by a scalar multiplies by its reciprocal)."""
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert torch.equal(actual != 0, expected != 0)
    if DEVICE.type == "cpu" and actual.dtype != torch.bfloat16:
        assert torch.equal(actual, expected)
    else:
        eps = torch.finfo(actual.dtype).eps
        torch.testing.assert_close(actual, expected, rtol=eps, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "feature_offset", "p", "salt"), CASES)
def test_output_and_gradient_match_the_reference(shape, feature_offset, p, salt, dtype):
    gen = torch.Generator().manual_seed(len(shape) + shape[-1])
    x = torch.randn(shape, generator=gen).to(device=DEVICE, dtype=dtype)
    dy = torch.randn(shape, generator=gen).to(device=DEVICE, dtype=dtype)
    keys = _keys(math.prod(shape[:-1]), seed=7)
    kwargs = {"p": p, "salt": salt, "feature_offset": feature_offset}

    def forward_backward(fn):
        leaf = x.clone().requires_grad_()
        y = fn(leaf, keys, **kwargs)
        (dx,) = torch.autograd.grad(y, leaf, dy)
        return y, dx

    before = _launches()
    y, dx = forward_backward(keyed_dropout)
    assert _launches() == (before[0] + 1, before[1] + 1), "no Triton forward and backward"
    ref_y, ref_dx = forward_backward(keyed_dropout_reference)
    _ulp_close(y, ref_y)
    _ulp_close(dx, ref_dx)
    # The gradient is the same masked scaling of dy.
    _ulp_close(dx, keyed_dropout_reference(dy, keys, **kwargs))


def test_strided_input_and_dims():
    """A transposed view (no unit feature stride) and a 3-D input take the kernel too."""
    x = torch.randn(6, 10, device=DEVICE)
    keys = _keys(10, seed=3)
    before = _launches()
    got = keyed_dropout(x.t(), keys, p=0.4, salt=5)
    assert _launches()[0] == before[0] + 1
    assert torch.equal(got, keyed_dropout_reference(x.t(), keys, p=0.4, salt=5))
    x3 = torch.randn(2, 5, 7, device=DEVICE)
    keys3 = _keys(10, seed=4).reshape(2, 5)  # keys may come in the tokens' shape
    assert torch.equal(
        keyed_dropout(x3, keys3, p=0.4, salt=5), keyed_dropout_reference(x3, keys3, p=0.4, salt=5)
    )


def test_backward_saves_the_keys_not_a_mask():
    """The kernel's autograd keeps one int64 key per token; the reference keeps a
    ``[tokens, features]`` mask (what the kernel saves memory on)."""
    x = torch.randn(8, 48, device=DEVICE, requires_grad=True)
    keys = _keys(8, seed=1)

    def saved_by(fn) -> list[torch.Tensor]:
        saved = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x, keys, p=0.2, salt=3).sum().backward()
        return saved

    kernel_saved = saved_by(keyed_dropout)
    assert [(t.dtype, tuple(t.shape)) for t in kernel_saved] == [(torch.int64, (8,))]
    reference_saved = saved_by(keyed_dropout_reference)
    assert any(t.shape == (8, 48) for t in reference_saved)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_fraction_is_binomial(p):
    """Over 512 tokens x 256 features the kept fraction is within 5 binomial standard
    deviations of 1 - p, overall and in every token's row and feature's column (within 5
    standard deviations of their own counts), and no two rows share a mask."""
    tokens, features = 512, 256
    keys = _keys(tokens, seed=11).abs()  # distinct positive keys (no padding)
    y = keyed_dropout(torch.ones(tokens, features, device=DEVICE), keys, p=p, salt=2024)
    keep = (y != 0).double()
    n = keep.numel()
    assert abs(keep.mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    for counts, size in ((keep.sum(1), features), (keep.sum(0), tokens)):
        sd = math.sqrt(p * (1 - p) * size)
        assert (counts - (1 - p) * size).abs().max().item() < 5 * sd
    assert torch.unique(keep, dim=0).shape[0] == tokens


def test_gradcheck_of_the_reference_and_the_kernel_gradient():
    """The reference's gradient is checked numerically (fp64); the kernel's is dy * keep / (1 - p)
    with the reference's mask."""
    keys = _keys(3, seed=5)
    x64 = torch.randn(3, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: keyed_dropout_reference(x, keys, p=0.3, salt=8, feature_offset=2), (x64,)
    )
    x = x64.detach().float().requires_grad_()
    dy = torch.randn(3, 6, device=DEVICE)
    (dx,) = torch.autograd.grad(keyed_dropout(x, keys, p=0.3, salt=8, feature_offset=2), x, dy)
    keep = keyed_dropout_mask(keys, features=6, p=0.3, salt=8, feature_offset=2)
    assert torch.equal(dx, dy * keep / torch.tensor(0.7, dtype=torch.float32))


def test_registered_op_and_reference_mode(monkeypatch):
    assert "keyed_dropout" in registry.list_ops()
    assert registry.get_reference("keyed_dropout") is keyed_dropout_reference
    monkeypatch.setenv(registry.IMPL_ENV_VAR, "reference")
    before = _launches()
    x, keys = torch.randn(4, 8, device=DEVICE), _keys(4, seed=2)
    assert torch.equal(
        keyed_dropout(x, keys, p=0.5, salt=1), keyed_dropout_reference(x, keys, p=0.5, salt=1)
    )
    assert _launches() == before  # the reference ran, not the kernel


@pytest.mark.parametrize(
    ("kwargs", "keys", "match"),
    [
        ({"p": 1.0, "salt": 0}, None, "0 <= p < 1"),
        ({"p": -0.1, "salt": 0}, None, "0 <= p < 1"),
        ({"p": 0.1, "salt": 2**32}, None, r"uint32 value in \[0, 2\*\*32\)"),
        ({"p": 0.1, "salt": 0, "feature_offset": -1}, None, "must be >= 0"),
        ({"p": 0.1, "salt": 0}, torch.zeros(5, dtype=torch.int64), "one key per token"),
        ({"p": 0.1, "salt": 0}, torch.zeros(4), "integer tensor"),
    ],
)
def test_bad_arguments_say_what_is_wrong(kwargs, keys, match):
    x = torch.randn(4, 8, device=DEVICE)
    keys = torch.zeros(4, dtype=torch.int64) if keys is None else keys
    for fn in (keyed_dropout, keyed_dropout_reference):
        with pytest.raises(ValueError, match=match):
            fn(x, keys.to(DEVICE), **kwargs)


_COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from forge_kernels.dropout.keyed_dropout_kernels import keyed_dropout_kernel as kernel

names = kernel.arg_names
for dtype, wide in [("bf16", "i32"), ("fp32", "i64")]:  # salt/offset/threshold past 2**31: i64
    types = {"INP": "*" + dtype, "KEYS": "*i64", "OUT": "*" + dtype, "stride_inp": "i32",
             "n_rows": "i32", "n_cols": "i32", "salt": wide, "feature_offset": wide,
             "threshold": wide, "keep_prob": "fp32", "BLOCK_M": "constexpr",
             "BLOCK_N": "constexpr"}
    assert sorted(names) == sorted(types), names
    source = ASTSource(
        fn=kernel,
        signature={name: types[name] for name in names},
        constexprs={(names.index("BLOCK_M"),): 4, (names.index("BLOCK_N"),): 1024},
    )
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    # IEEE division, as torch's (Triton's ``/`` is div.full.f32, 2 ulp); logical shifts.
    assert "div.rn.f32" in ptx and "div.full.f32" not in ptx, "not an IEEE division"
    assert "shr.u32" in ptx and "shr.s32" not in ptx, "an arithmetic shift in the hash"
print("compiled")
"""


@pytest.mark.sm90_compile
def test_kernel_compiles_for_hopper():
    """The interpreter runs the kernel as Python (numpy's uint32 and IEEE division): compile it
    for sm90 (front end to PTX, no GPU needed), in a process without ``TRITON_INTERPRET``, and
    check the hash and the scaling compile to what the interpreter computed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_HOPPER],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled" in done.stdout
