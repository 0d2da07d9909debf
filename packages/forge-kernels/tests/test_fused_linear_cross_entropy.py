"""Fused linear + cross-entropy against F.cross_entropy on materialized logits.

Runs on CPU: the Triton path under ``TRITON_INTERPRET=1`` (set by the root conftest), the eager
chunked path by making ``can_use_triton`` say no. Spies on the two per-chunk functions prove
which path ran and how many chunks it took.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from forge_kernels import registry
from forge_kernels._triton_support import can_use_triton
from forge_kernels.loss import (
    FusedLinearCrossEntropyLoss,
    auto_chunk_size,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)

# The package re-exports the function under the submodule's name: fetch the module itself.
flce_mod = importlib.import_module("forge_kernels.loss.fused_linear_ce")

N, H, V = 37, 24, 101
CHUNK = 8  # does not divide N: 5 chunks, the last one of 5 rows
N_CHUNKS = math.ceil(N / CHUNK)

TRITON_RUNS_ON_CPU = can_use_triton(torch.empty(1))


@dataclass
class Path:
    name: str
    # One entry per per-chunk call: its compute_grad flag.
    calls: dict[str, list[bool]] = field(default_factory=lambda: {"triton": [], "torch": []})

    def assert_ran(self, n_calls: int) -> None:
        other = "torch" if self.name == "triton" else "triton"
        assert len(self.calls[self.name]) == n_calls, self.calls
        assert self.calls[other] == [], f"the {other} path ran too: {self.calls}"


def _spy(monkeypatch, module, attr: str, log: list[bool]) -> None:
    original = getattr(module, attr)

    def spy(*args, **kwargs):
        log.append(kwargs["compute_grad"])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, attr, spy)


@pytest.fixture(params=["triton", "torch"])
def path(request, monkeypatch) -> Path:
    """Which per-chunk implementation runs: the Triton kernel or the eager torch fallback."""
    p = Path(request.param)
    if p.name == "triton":
        if not TRITON_RUNS_ON_CPU:
            pytest.skip("Triton cannot run on CPU tensors here (needs TRITON_INTERPRET=1)")
        from forge_kernels.loss import cross_entropy_kernels

        _spy(monkeypatch, cross_entropy_kernels, "cross_entropy_loss_and_grad_", p.calls["triton"])
    else:
        monkeypatch.setattr(flce_mod, "can_use_triton", lambda *tensors: False)
    _spy(monkeypatch, flce_mod, "_loss_and_grad_chunk_torch", p.calls["torch"])
    return p


def _inputs(
    *, dtype=torch.float32, bias=True, n=N, h=H, v=V, seed=0, ignore_every=4, ignore_index=-100
):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / math.sqrt(h) * 3).to(dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        labels[1::ignore_every] = ignore_index
    for t in (hidden, weight, b):
        if t is not None:
            t.requires_grad_(True)
    return hidden, weight, b, labels


def _loss_and_grads(fn, hidden, weight, bias, labels, *, grad_out_seed=1, **kwargs):
    loss, z_loss = fn(hidden, weight, labels, bias=bias, return_z_loss=True, **kwargs)
    if loss.dim() == 0:
        grad_out = torch.tensor(1.7)  # a non-unit upstream gradient checks backward's scaling
    else:
        grad_out = torch.randn(loss.shape, generator=torch.Generator().manual_seed(grad_out_seed))
    params = [t for t in (hidden, weight, bias) if t is not None]
    grads = torch.autograd.grad(loss, params, grad_out)
    return loss.detach(), z_loss, grads


CASES = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss_weight": 1e-2},
    "softcap": {"logit_softcap": 4.0},
    "all": {"label_smoothing": 0.2, "z_loss_weight": 1e-3, "logit_softcap": 6.0},
    "ignore_index=3": {"ignore_index": 3},
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(path, case, reduction):
    kwargs = dict(CASES[case], reduction=reduction)
    ignore_index = kwargs.get("ignore_index", -100)
    # ignore_index=3 is also a real class: rows labelled 3 must be skipped, nothing else.
    hidden, weight, bias, labels = _inputs(ignore_index=ignore_index, bias=case != "plain")
    assert (labels == ignore_index).any()
    assert (labels != ignore_index).any()

    loss, z_loss, grads = _loss_and_grads(
        fused_linear_cross_entropy, hidden, weight, bias, labels, chunk_size=CHUNK, **kwargs
    )
    ref_loss, ref_z, ref_grads = _loss_and_grads(
        fused_linear_cross_entropy_reference, hidden, weight, bias, labels, **kwargs
    )
    # forward once (+ once more in backward for "none"), one call per chunk
    path.assert_ran(N_CHUNKS * (2 if reduction == "none" else 1))

    assert loss.dtype == torch.float32
    assert loss.shape == ref_loss.shape
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_loss, ref_z, rtol=1e-5, atol=1e-6)
    if "z_loss_weight" not in kwargs:
        assert not z_loss.any()
    if reduction == "none":
        assert not loss[labels == ignore_index].any()
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if reduction != "none":
        # ignored rows get exactly zero gradient
        assert not grads[0][labels == ignore_index].any()


def test_int32_labels_work_in_the_reference_as_in_the_default():
    hidden, weight, _, labels = _inputs(ignore_index=-100, bias=False)
    labels32 = labels.to(torch.int32)
    want = fused_linear_cross_entropy_reference(hidden, weight, labels)
    got = fused_linear_cross_entropy_reference(hidden, weight, labels32)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(
        fused_linear_cross_entropy(hidden, weight, labels32, chunk_size=CHUNK), want
    )


def test_z_loss_is_palm_mean_of_squared_lse(path):
    hidden, weight, _, labels = _inputs(bias=False)
    z = 3e-2
    with torch.no_grad():
        _, z_loss = fused_linear_cross_entropy(
            hidden, weight, labels, z_loss_weight=z, chunk_size=CHUNK, return_z_loss=True
        )
        lse = torch.logsumexp(hidden @ weight.T, dim=-1)[labels != -100]
    torch.testing.assert_close(z_loss, z * lse.square().mean())
    path.assert_ran(N_CHUNKS)
    assert path.calls[path.name] == [False] * N_CHUNKS  # no_grad: loss only, no gradient work


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_matches_torch(path, reduction):
    hidden, weight, bias, labels = _inputs()
    labels.fill_(-100)
    kwargs = {"reduction": reduction, "label_smoothing": 0.1, "z_loss_weight": 1e-2}
    loss, _, grads = _loss_and_grads(
        fused_linear_cross_entropy, hidden, weight, bias, labels, chunk_size=CHUNK, **kwargs
    )
    ref_loss, _, _ = _loss_and_grads(
        fused_linear_cross_entropy_reference, hidden, weight, bias, labels, **kwargs
    )
    # torch: mean over zero rows is nan (0/0), sum is 0, none is all zeros; gradients are zero.
    torch.testing.assert_close(loss, ref_loss, equal_nan=True)
    if reduction == "mean":
        assert loss.isnan()
    else:
        assert not loss.any()
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g)), "all-ignored batch must give zero gradients"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_matches_reference(path, dtype, reduction):
    hidden, weight, bias, labels = _inputs(dtype=dtype)
    kwargs = {"reduction": reduction, "label_smoothing": 0.1, "z_loss_weight": 1e-3}
    kwargs["logit_softcap"] = 8.0
    loss, _, grads = _loss_and_grads(
        fused_linear_cross_entropy, hidden, weight, bias, labels, chunk_size=CHUNK, **kwargs
    )
    ref_loss, _, ref_grads = _loss_and_grads(
        fused_linear_cross_entropy_reference, hidden, weight, bias, labels, **kwargs
    )
    path.assert_ran(N_CHUNKS * (2 if reduction == "none" else 1))
    assert loss.dtype == torch.float32  # loss math in fp32 whatever the input dtype
    # Same low-precision logits on both sides: the loss differs only by fp32 rounding.
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=1e-3)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == dtype
        scale = want.float().abs().max().item()
        # dlogits rounded to the input dtype on both sides; grad_weight also accumulates chunks
        # in that dtype here (a few roundings more than the reference's single GEMM).
        tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * scale)


def test_frozen_weight_and_leading_dims(path):
    hidden, weight, _, labels = _inputs(bias=False, n=30)
    weight.requires_grad_(False)
    hidden_bld = hidden.detach().reshape(2, 15, H).requires_grad_(True)
    labels_bl = labels.reshape(2, 15)
    loss_fn = FusedLinearCrossEntropyLoss(reduction="none", chunk_size=7, label_smoothing=0.05)
    loss = loss_fn(hidden_bld, weight, labels_bl)
    assert loss.shape == (2, 15)
    (grad,) = torch.autograd.grad(loss, hidden_bld, torch.ones_like(loss))
    ref = fused_linear_cross_entropy_reference(
        hidden_bld, weight, labels_bl, reduction="none", label_smoothing=0.05
    )
    (ref_grad,) = torch.autograd.grad(ref, hidden_bld, torch.ones_like(ref))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)


def test_backward_twice_raises(path):
    hidden, weight, bias, labels = _inputs()
    loss = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=CHUNK)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


class _LargestAllocation(TorchDispatchMode):
    """Records the largest storage (in bytes) behind any tensor an aten op produced."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > self.largest:
                self.largest, self.op = t.untyped_storage().nbytes(), func
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_never_materializes_full_logits(path, reduction):
    # N*V is larger than every legitimate tensor (hidden N*H, weight V*H, a chunk of logits).
    n, h, v = 64, 16, 96
    chunk = auto_chunk_size(n, h, v)
    assert chunk == 16
    hidden, weight, bias, labels = _inputs(n=n, h=h, v=v)
    fp32 = 4  # bytes
    legit = max(n * h, v * h, chunk * v) * fp32
    assert legit < n * v * fp32

    with _LargestAllocation() as ref_mode:
        ref = fused_linear_cross_entropy_reference(hidden, weight, labels, bias=bias)
        ref.backward()
    assert ref_mode.largest >= n * v * fp32  # the detector does see materialized logits

    with _LargestAllocation() as mode:
        loss = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, reduction=reduction)
        loss.sum().backward()
    assert mode.largest <= legit, f"{mode.op}: {mode.largest} bytes (full logits: {n * v * fp32})"
    path.assert_ran((n // chunk) * (2 if reduction == "none" else 1))


@pytest.mark.skipif(not TRITON_RUNS_ON_CPU, reason="needs TRITON_INTERPRET=1 on CPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_streams_vocab_in_blocks(dtype):
    """The online logsumexp across several vocabulary blocks (one partial) equals the eager twin."""
    from forge_kernels.loss import cross_entropy_kernels

    g = torch.Generator().manual_seed(3)
    rows = 6
    logits = (torch.randn(rows, V, generator=g) * 4).to(dtype)
    logits[0, 100] = 30.0  # the max sits in the last, partial block
    labels = torch.tensor([100, 0, -100, 57, 99, 31])
    scale = torch.rand(rows, generator=g) + 0.5
    opts = flce_mod._LossOptions(
        ignore_index=-100,
        label_smoothing=0.1,
        z_loss_weight=1e-2,
        logit_softcap=20.0,
        reduction="none",
    )
    want_logits = logits.clone()
    want_loss, want_z = torch.empty(rows), torch.empty(rows)
    flce_mod._loss_and_grad_chunk_torch(
        want_logits, labels, want_loss, want_z, scale, opts=opts, compute_grad=True
    )
    got_loss, got_z = torch.empty(rows), torch.empty(rows)
    cross_entropy_kernels.cross_entropy_loss_and_grad_(
        logits,
        labels,
        got_loss,
        got_z,
        scale,
        ignore_index=-100,
        label_smoothing=0.1,
        z_loss_weight=1e-2,
        logit_softcap=20.0,
        compute_grad=True,
        block_v=32,  # 4 blocks over V=101
    )
    torch.testing.assert_close(got_loss, want_loss)
    torch.testing.assert_close(got_z, want_z)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(logits.float(), want_logits.float(), rtol=tol, atol=tol * 1e-2)
    assert not logits[2].any()


def test_auto_chunk_size():
    # Liger's rule (a chunk of logits about the size of hidden) would give 8192 / 32 = 256 rows;
    # at least 1024 keep the weight-gradient update compute-bound.
    assert auto_chunk_size(8192, 4096, 128256) == 1024
    assert auto_chunk_size(65536, 1024, 32000) == 2048  # Liger's rule: 65536 / 32
    assert auto_chunk_size(2048, 4096, 128256) == 512  # a quarter of the tokens at most
    assert auto_chunk_size(N, H, V) == 16  # max(ceil(37 / 5), 37 // 4) = 9 -> 16
    assert auto_chunk_size(5, 4096, 1000) == 8  # fewer tokens than a chunk: one chunk


def test_dispatches_through_registry():
    assert (
        registry.get_reference("fused_linear_cross_entropy") is fused_linear_cross_entropy_reference
    )
    hidden, weight, _, labels = _inputs(bias=False)
    sentinel = torch.tensor(42.0)
    with registry.overridden("fused_linear_cross_entropy", lambda *a, **k: sentinel, source="test"):
        assert registry.implementation_of("fused_linear_cross_entropy") == "test"
        assert fused_linear_cross_entropy(hidden, weight, labels) is sentinel
    assert registry.implementation_of("fused_linear_cross_entropy") == "default"


def test_autocast_casts_like_f_linear(monkeypatch):
    monkeypatch.setattr(flce_mod, "can_use_triton", lambda *tensors: False)  # fast path only
    hidden, weight, bias, labels = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=CHUNK)
        ref = fused_linear_cross_entropy_reference(hidden, weight, labels, bias=bias)
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    loss.backward()
    assert hidden.grad.dtype == torch.float32
    assert weight.grad.dtype == torch.float32


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"reduction": "avg"}, "reduction"),
        ({"label_smoothing": 1.5}, "label_smoothing"),
        ({"logit_softcap": 0.0}, "logit_softcap"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"labels": torch.full((N,), V)}, r"labels must be in \[0, 101\)"),
        ({"labels": torch.zeros(N + 1, dtype=torch.long)}, "labels shape"),
        ({"weight": torch.randn(V, H, dtype=torch.float64)}, "share a dtype"),
    ],
)
def test_rejects_bad_arguments(change, match):
    hidden, weight, _, labels = _inputs(bias=False)
    kwargs = {"hidden": hidden, "weight": weight, "labels": labels} | change
    with pytest.raises(ValueError, match=match):
        fused_linear_cross_entropy(
            kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("labels"), **kwargs
        )


def test_import_and_fallback_without_triton():
    """``import forge_kernels.loss`` works with Triton absent, and the eager chunked path runs."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # any `import triton` now raises ImportError
        import torch
        from forge_kernels.loss import fused_linear_cross_entropy, fused_linear_cross_entropy_reference
        torch.manual_seed(0)
        h = torch.randn(19, 8, requires_grad=True)
        w = torch.randn(33, 8, requires_grad=True)
        y = torch.randint(0, 33, (19,))
        loss = fused_linear_cross_entropy(h, w, y, chunk_size=4, label_smoothing=0.1)
        ref = fused_linear_cross_entropy_reference(h, w, y, label_smoothing=0.1)
        torch.testing.assert_close(loss, ref)
        g, = torch.autograd.grad(loss, h)
        g_ref, = torch.autograd.grad(ref, h)
        torch.testing.assert_close(g, g_ref)
        assert "forge_kernels.loss.cross_entropy_kernels" not in sys.modules
        print("ok")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_matches_reference_with_less_memory():
    n, h, v = 2048, 512, 32000
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, h, device="cuda", generator=g, dtype=torch.bfloat16)
    weight = torch.randn(v, h, device="cuda", generator=g, dtype=torch.bfloat16) / h**0.5
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    labels[::7] = -100
    peaks, results = [], []
    for fn in (fused_linear_cross_entropy, fused_linear_cross_entropy_reference):
        hid, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = fn(hid, w, labels, label_smoothing=0.1, z_loss_weight=1e-4)
        loss.backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        results.append((loss.detach(), hid.grad.float(), w.grad.float()))
    (loss, gh, gw), (ref_loss, ref_gh, ref_gw) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(gh, ref_gh, rtol=2e-2, atol=2e-2 * ref_gh.abs().max().item())
    torch.testing.assert_close(gw, ref_gw, rtol=2e-2, atol=2e-2 * ref_gw.abs().max().item())
    assert peaks[0] < peaks[1] / 2, peaks
