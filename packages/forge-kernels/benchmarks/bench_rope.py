"""Benchmark RoPE apply: forge's Triton kernel vs eager PyTorch vs torch.compile vs Liger-Kernel.

For each shape it prints, side by side: time (median), achieved GB/s and the fraction of the
HBM bandwidth measured in the same run with a large device copy, the speed-up over eager, and the
peak extra memory; forward only and forward + backward.

    python packages/forge-kernels/benchmarks/bench_rope.py                  # CUDA, bf16
    TRITON_INTERPRET=1 python packages/forge-kernels/benchmarks/bench_rope.py --device cpu --smoke

Bytes counted are what the op must move: out of place, q and k read and written once plus
cos/sin read once (backward: the same for the gradients); in place, only the rotated channels.
On CPU (``--smoke``) the figures only show the script works: the kernel runs interpreted.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from forge_kernels.benchmarking import copy_bandwidth_gbps, peak_memory_mib, time_ms
from forge_kernels.rope import (
    apply_rope,
    apply_rope_,
    apply_rope_reference,
    rope_cos_sin,
    rope_inv_freq,
)


@dataclass(frozen=True, kw_only=True)
class Case:
    name: str
    tokens: int
    q_heads: int
    k_heads: int
    head_dim: int
    rotary_dim: int
    layout: str
    q_view_of: int | None = None  # q is the last head_dim channels of a wider head (MLA)


CASES = [
    Case(name="llama3-8b", tokens=16384, q_heads=32, k_heads=8, head_dim=128, rotary_dim=128, layout="half"),
    Case(name="qwen2.5-vl-7b", tokens=16384, q_heads=28, k_heads=4, head_dim=128, rotary_dim=128, layout="half"),
    Case(name="wan2.1-14b", tokens=32760, q_heads=40, k_heads=40, head_dim=128, rotary_dim=128, layout="interleaved"),
    Case(name="phi-2-partial", tokens=16384, q_heads=32, k_heads=32, head_dim=80, rotary_dim=32, layout="half"),
    Case(name="deepseek-v3-mla-rope", tokens=8192, q_heads=128, k_heads=1, head_dim=64, rotary_dim=64, layout="interleaved", q_view_of=192),
]  # fmt: skip

SMOKE_CASES = [
    Case(name="smoke-gqa", tokens=64, q_heads=4, k_heads=2, head_dim=32, rotary_dim=32, layout="half"),
    Case(name="smoke-partial-interleaved", tokens=48, q_heads=3, k_heads=3, head_dim=40, rotary_dim=16, layout="interleaved", q_view_of=56),
]  # fmt: skip


# --------------------------------------------------------------------------------------------
# Timing and memory.
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Implementations.
# --------------------------------------------------------------------------------------------


def load_liger():
    try:
        from liger_kernel.ops.rope import LigerRopeFunction
    except ImportError:
        return None
    return LigerRopeFunction


def make_inputs(case: Case, device: str, dtype: torch.dtype, requires_grad: bool):
    t, d = case.tokens, case.head_dim
    if case.q_view_of is None:
        q = torch.randn(t, case.q_heads, d, device=device, dtype=dtype)
    else:  # the rope part of a wider head: a strided view
        q = torch.randn(t, case.q_heads, case.q_view_of, device=device, dtype=dtype)[..., -d:]
    k = torch.randn(t, case.k_heads, d, device=device, dtype=dtype)
    if requires_grad:
        q.requires_grad_()
        k.requires_grad_()
    return q, k


def cos_sin_for(case: Case, device: str):
    # Packed batch of 4 documents: positions restart per document.
    pos = torch.arange(case.tokens, device=device) % max(1, case.tokens // 4)
    return rope_cos_sin(pos, rope_inv_freq(case.rotary_dim, theta=500000.0, device=device))


def implementations(case: Case, cos, sin, compiled_reference, liger):
    layout = case.layout

    def forge(q, k, cos, sin):
        return apply_rope(q, k, cos, sin, layout=layout)

    def forge_inplace(q, k, cos, sin):
        return apply_rope_(q, k, cos, sin, layout=layout)

    def eager(q, k, cos, sin):
        return apply_rope_reference(q, k, cos, sin, layout=layout)

    impls = {"forge": forge, "forge in-place": forge_inplace, "eager": eager}
    impls["torch.compile"] = compiled_reference
    if liger is None:
        impls["liger"] = "skipped: liger-kernel not installed"
    elif layout != "half":
        impls["liger"] = "n/a: liger rope supports the half layout only"
    else:
        # Liger wants [batch, heads, seq, head_dim] and transformers-style cos/sin of width
        # rotary_dim (built once, outside the timing); it rotates in place.
        cos_full = torch.cat((cos, cos), -1).unsqueeze(0)
        sin_full = torch.cat((sin, sin), -1).unsqueeze(0)

        def liger_rope(q, k, cos, sin):
            qo, ko = liger.apply(
                q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2), cos_full, sin_full
            )
            return qo.transpose(1, 2)[0], ko.transpose(1, 2)[0]

        impls["liger"] = liger_rope
    return impls


def make_compiled_reference(layout_cache: dict, layout: str):
    if layout not in layout_cache:

        def eager(q, k, cos, sin):
            return apply_rope_reference(q, k, cos, sin, layout=layout)

        layout_cache[layout] = torch.compile(eager, dynamic=False)
    return layout_cache[layout]


# --------------------------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------------------------


def bytes_moved(case: Case, q, k, cos, inplace: bool) -> int:
    elt = q.element_size()
    cos_bytes = 2 * cos.numel() * cos.element_size()
    if inplace:
        rot = case.rotary_dim * case.tokens * (case.q_heads + case.k_heads)
        return 2 * rot * elt + cos_bytes
    return 2 * (q.numel() + k.numel()) * elt + cos_bytes


def fmt(x: float | None, width: int, precision: int, suffix: str = "") -> str:
    text = "-" if x is None else f"{x:.{precision}f}{suffix}"
    return text.rjust(width)


def run_case(case, args, bw_gbs, compile_cache, liger) -> None:
    device, dtype = args.device, getattr(torch, args.dtype)
    cos, sin = cos_sin_for(case, device)
    compiled = (
        "skipped: --no-compile"
        if args.no_compile
        else make_compiled_reference(compile_cache, case.layout)
    )
    impls = implementations(case, cos, sin, compiled, liger)
    print(
        f"\n{case.name}: tokens={case.tokens} heads q/k={case.q_heads}/{case.k_heads} "
        f"head_dim={case.head_dim} rotary_dim={case.rotary_dim} layout={case.layout} "
        f"{'(q strided view) ' if case.q_view_of else ''}{args.dtype}"
    )
    header = (
        f"{'impl':<16}{'fwd ms':>10}{'GB/s':>9}{'%BW':>6}{'x eager':>9}"
        f"{'fwd+bwd ms':>12}{'GB/s':>9}{'%BW':>6}{'x eager':>9}"
        f"{'fwd MiB':>9}{'f+b MiB':>9}"
    )
    print(header)
    print("-" * len(header))
    rows = {}
    for name, fn in impls.items():
        if isinstance(fn, str):
            rows[name] = fn
            continue
        inplace = name in ("forge in-place", "liger")
        try:
            q, k = make_inputs(case, device, dtype, requires_grad=False)
            fwd_ms = time_ms(lambda fn=fn, q=q, k=k: fn(q, k, cos, sin), device, iters=args.iters)
            fwd_bytes = bytes_moved(case, q, k, cos, inplace=inplace)
            peak_fwd = peak_memory_mib(lambda fn=fn, q=q, k=k: fn(q, k, cos, sin), device)
            bwd_ms = bwd_bytes = peak_fb = None
            if name != "forge in-place":  # in place cannot rotate a leaf that requires grad
                qg, kg = make_inputs(case, device, dtype, requires_grad=True)
                gq, gk = torch.randn_like(qg), torch.randn_like(kg)

                def fwd_bwd(fn=fn, qg=qg, kg=kg, gq=gq, gk=gk):
                    qo, ko = fn(qg, kg, cos, sin)
                    torch.autograd.backward((qo, ko), (gq, gk))
                    qg.grad = kg.grad = None

                bwd_ms = time_ms(fwd_bwd, device, iters=args.iters)
                bwd_bytes = 2 * bytes_moved(case, qg, kg, cos, inplace=False)
                peak_fb = peak_memory_mib(fwd_bwd, device)
        except Exception as e:  # a baseline that cannot run here is reported, not fatal
            rows[name] = f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
            continue
        rows[name] = (fwd_ms, fwd_bytes, bwd_ms, bwd_bytes, peak_fwd, peak_fb)

    eager = rows.get("eager")
    for name, row in rows.items():
        if isinstance(row, str):
            print(f"{name:<16}{row}")
            continue
        fwd_ms, fwd_bytes, bwd_ms, bwd_bytes, peak_fwd, peak_fb = row
        fwd_gbs = fwd_bytes / (fwd_ms * 1e-3) / 1e9
        bwd_gbs = None if bwd_ms is None else bwd_bytes / (bwd_ms * 1e-3) / 1e9
        fwd_x = eager[0] / fwd_ms if isinstance(eager, tuple) else None
        bwd_x = eager[2] / bwd_ms if isinstance(eager, tuple) and bwd_ms else None
        fwd_bw = 100 * fwd_gbs / bw_gbs
        bwd_bw = None if bwd_gbs is None else 100 * bwd_gbs / bw_gbs
        print(
            f"{name:<16}{fmt(fwd_ms, 10, 4)}{fmt(fwd_gbs, 9, 1)}{fmt(fwd_bw, 6, 0, '%')}"
            f"{fmt(fwd_x, 9, 2, 'x')}{fmt(bwd_ms, 12, 4)}{fmt(bwd_gbs, 9, 1)}"
            f"{fmt(bwd_bw, 6, 0, '%')}{fmt(bwd_x, 9, 2, 'x')}{fmt(peak_fwd, 9, 1)}{fmt(peak_fb, 9, 1)}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few iterations")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--cases", nargs="*", default=None, help="names of the cases to run")
    args = parser.parse_args(argv)
    if args.iters is None:
        args.iters = 3 if args.smoke else 100

    torch.manual_seed(0)
    bw = copy_bandwidth_gbps(args.device, smoke=args.smoke)
    device_name = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"{args.device} (interpreted)"
    )
    print(
        f"device: {device_name}; torch {torch.__version__}; measured copy bandwidth {bw:.1f} GB/s"
    )
    liger = load_liger()
    if liger is None:
        print("liger: skipped: liger-kernel not installed")
    cases = SMOKE_CASES if args.smoke else CASES
    if args.cases:
        cases = [c for c in cases if c.name in args.cases]
    compile_cache: dict = {}
    for case in cases:
        run_case(case, args, bw, compile_cache, liger)


if __name__ == "__main__":
    main()
