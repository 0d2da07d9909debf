"""Benchmark: a dropless MoE layer (routing, permute, grouped GEMMs, unpermute) three ways.

A Qwen3-MoE-like sparse block (router, top-k softmax routing with ``norm_topk_prob``, SwiGLU experts
with transformers' ``[E, out, in]`` weights, weighted combine) is run by:

- ``forge``: ``moe_topk_routing`` + ``moe_permute`` + ``grouped_mm`` (backend ``auto``: the
  ``torch._grouped_mm`` CUTLASS kernel on sm90/sm100 bf16, else Triton) + ``swiglu`` +
  ``moe_unpermute`` (MegaBlocks-style dropless, Gale et al. 2022, arXiv:2211.15841);
- ``forge[triton]``: the same with the Triton grouped GEMM forced;
- ``loop (transformers)``: ``Qwen3MoeExperts``' loop over the experts that got tokens, with
  ``torch.where`` on a one-hot mask, two ``F.linear`` per expert and ``index_add_``;
- ``torch._grouped_mm``: the torchtitan-style direct use: ``argsort`` permutation,
  ``torch._grouped_mm`` with int32 offsets (its own autograd), a weighted ``index_add_`` back.

It also times the gate/up grouped GEMM alone for the same contenders. Times are medians (CUDA
events, L2 flushed; the harness of bench_norms.py); TFLOP/s count the expert GEMMs only (forward
``6 * T * k * H * I``, backward twice that); ratios are against the loop.

    # a GPU (bf16; 8192 tokens, hidden 2048, moe_intermediate 768, top-8 of 128 and of 64 experts)
    python packages/forge-kernels/benchmarks/bench_moe.py
    # a quick check that the script runs (tiny sizes, CPU, Triton interpreted)
    python packages/forge-kernels/benchmarks/bench_moe.py --device cpu --smoke

Off sm90/sm100 GPUs ``torch._grouped_mm`` runs torch's portable fallback (a loop with a host sync).
On CPU the forge rows time the Triton interpreter (meaningless as speed; it checks the code path).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from bench_norms import DTYPES, time_ms  # the shared harness; this script's folder is on sys.path


@dataclass(frozen=True, kw_only=True)
class LayerShape:
    tokens: int
    hidden: int
    inter: int
    experts: int
    top_k: int

    @property
    def fwd_flops(self) -> int:
        """Expert GEMM FLOPs of one forward: gate/up (2I outputs) and down, per routed row."""
        return 6 * self.tokens * self.top_k * self.hidden * self.inter

    def __str__(self) -> str:
        return f"T={self.tokens} H={self.hidden} I={self.inter} E={self.experts} k={self.top_k}"


# ============================================================================================
# Contenders: (hidden, router_weight, gate_up_proj, down_proj) -> out
# ============================================================================================


def _route(hidden, router_weight, top_k):
    """Qwen3-MoE routing in plain torch (shared by the non-forge contenders)."""
    probs = F.linear(hidden, router_weight).softmax(dim=-1, dtype=torch.float32)
    weights, indices = probs.topk(top_k, dim=-1)
    weights = (weights / weights.sum(dim=-1, keepdim=True)).to(hidden.dtype)
    return weights, indices


def forge_layer(top_k: int, backend: str) -> Callable:
    from forge_kernels.activations import swiglu
    from forge_kernels.moe import grouped_mm, moe_permute, moe_topk_routing, moe_unpermute

    def run(hidden, router_weight, gate_up_proj, down_proj):
        routing = moe_topk_routing(
            F.linear(hidden, router_weight), top_k=top_k, norm_topk_prob=True
        )
        perm = moe_permute(hidden, routing.indices, num_experts=gate_up_proj.shape[0])
        counts = perm.tokens_per_expert
        gate_up = grouped_mm(
            perm.hidden, gate_up_proj, counts, transpose_weight=True, backend=backend
        )
        act = swiglu(*gate_up.chunk(2, dim=-1))
        out = grouped_mm(act, down_proj, counts, transpose_weight=True, backend=backend)
        return moe_unpermute(out, perm.slot_positions, routing_weights=routing.weights)

    return run


def loop_layer(top_k: int) -> Callable:
    """transformers' ``Qwen3MoeExperts.forward`` (5.x), after its router."""

    def run(hidden, router_weight, gate_up_proj, down_proj):
        weights, indices = _route(hidden, router_weight, top_k)
        num_experts = gate_up_proj.shape[0]
        final = torch.zeros_like(hidden)
        with torch.no_grad():
            mask = F.one_hot(indices, num_classes=num_experts).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert in hit:
            e = expert[0]
            slot, token = torch.where(mask[e])
            gate, up = F.linear(hidden[token], gate_up_proj[e]).chunk(2, dim=-1)
            h = F.linear(F.silu(gate) * up, down_proj[e]) * weights[token, slot, None]
            final.index_add_(0, token, h.to(final.dtype))
        return final

    return run


def torch_grouped_layer(top_k: int) -> Callable:
    """torch._grouped_mm used directly, torchtitan-style."""

    def run(hidden, router_weight, gate_up_proj, down_proj):
        weights, indices = _route(hidden, router_weight, top_k)
        num_experts = gate_up_proj.shape[0]
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(num_experts, dtype=torch.int64, device=hidden.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        tokens = order // top_k
        x = hidden.index_select(0, tokens)
        gate, up = torch._grouped_mm(x, gate_up_proj.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
        h = torch._grouped_mm(F.silu(gate) * up, down_proj.transpose(-2, -1), offs=offs)
        h = h * weights.reshape(-1)[order, None]
        return torch.zeros_like(hidden).index_add_(0, tokens, h)

    return run


def gemm_only(kind: str) -> Callable:
    """The gate/up grouped GEMM alone, on pre-sorted rows."""
    from forge_kernels.moe import grouped_mm

    if kind.startswith("forge"):
        backend = "triton" if kind == "forge[triton]" else "auto"
        return lambda x, w, counts: grouped_mm(x, w, counts, transpose_weight=True, backend=backend)
    if kind == "torch._grouped_mm":
        return lambda x, w, counts: torch._grouped_mm(
            x, w.transpose(-2, -1), offs=torch.cumsum(counts, dim=0, dtype=torch.int32)
        )

    def loop(x, w, counts):
        return torch.cat([F.linear(x_e, w[e]) for e, x_e in enumerate(x.split(counts.tolist()))])

    return loop


# ============================================================================================
# Measurement
# ============================================================================================


def _measure(fn, inputs: dict, device, args, *, grad_keys) -> dict | str:
    """Median ms of the forward and of forward + backward, and the forward's output."""
    try:
        leaves = {
            k: v.detach().requires_grad_(k in grad_keys) if v.is_floating_point() else v
            for k, v in inputs.items()
        }
        with torch.no_grad():
            out = fn(**inputs)
        grad_out = torch.randn_like(out)
        params = [leaves[k] for k in grad_keys]

        def fwd():
            with torch.no_grad():
                return fn(**leaves)

        def fwd_bwd():
            return torch.autograd.grad(fn(**leaves), params, grad_out)

        return {
            "fwd": time_ms(fwd, device, warmup=args.warmup, iters=args.iters),
            "fwd+bwd": time_ms(fwd_bwd, device, warmup=args.warmup, iters=args.iters),
            "out": out,
        }
    except Exception as exc:  # a benchmark reports a contender's failure and goes on
        return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"


def _print_table(title: str, results: dict, fwd_flops: int) -> None:
    print(title)
    header = (
        f"{'provider':<22}{'fwd ms':>10}{'x loop':>8}{'TFLOP/s':>9}"
        f"{'fwd+bwd ms':>12}{'x loop':>8}{'TFLOP/s':>9}{'max|out-loop|':>15}"
    )
    print(header)
    print("-" * len(header))
    base = results.get("loop (transformers)")
    for name, r in results.items():
        if isinstance(r, str):
            print(f"{name:<22}{r}")
            continue
        cells = []
        for mode, flops in (("fwd", fwd_flops), ("fwd+bwd", 3 * fwd_flops)):
            ratio = f"{base[mode] / r[mode]:.2f}" if isinstance(base, dict) else "-"
            cells.append((r[mode], ratio, flops / (r[mode] * 1e-3) / 1e12))
        diff = (
            (r["out"].float() - base["out"].float()).abs().max().item()
            if isinstance(base, dict)
            else float("nan")
        )
        (f_ms, f_x, f_tf), (b_ms, b_x, b_tf) = cells
        print(
            f"{name:<22}{f_ms:>10.3f}{f_x:>8}{f_tf:>9.1f}{b_ms:>12.3f}{b_x:>8}{b_tf:>9.1f}"
            f"{diff:>15.2e}"
        )
    print()


def run_shape(shape: LayerShape, args, device, dtype) -> None:
    from forge_kernels.moe import grouped_mm_backend, moe_permute, moe_topk_routing

    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*size, scale=1.0):
        return (
            torch.randn(size, device=device, dtype=torch.float32, generator=gen)
            .mul(scale)
            .to(dtype)
        )

    e, h, i = shape.experts, shape.hidden, shape.inter
    inputs = {
        "hidden": randn(shape.tokens, h),
        "router_weight": randn(e, h, scale=h**-0.5),
        "gate_up_proj": randn(e, 2 * i, h, scale=h**-0.5),
        "down_proj": randn(e, h, i, scale=i**-0.5),
    }
    has_grouped_mm = hasattr(torch, "_grouped_mm")
    no_grouped_mm = "skipped: this torch has no torch._grouped_mm"
    layers: dict[str, Callable | str] = {
        "loop (transformers)": loop_layer(shape.top_k),
        "forge": forge_layer(shape.top_k, "auto"),
        "forge[triton]": forge_layer(shape.top_k, "triton"),
        "torch._grouped_mm": torch_grouped_layer(shape.top_k) if has_grouped_mm else no_grouped_mm,
    }
    grad_keys = ("hidden", "router_weight", "gate_up_proj", "down_proj")
    results = {
        name: fn if isinstance(fn, str) else _measure(fn, inputs, device, args, grad_keys=grad_keys)
        for name, fn in layers.items()
    }

    with torch.no_grad():  # the gate/up GEMM's sorted input, as the layer builds it
        routing = moe_topk_routing(
            F.linear(inputs["hidden"], inputs["router_weight"]), top_k=shape.top_k
        )
        perm = moe_permute(inputs["hidden"], routing.indices, num_experts=e)
    gemm_inputs = {"x": perm.hidden, "w": inputs["gate_up_proj"], "counts": perm.tokens_per_expert}
    backend = grouped_mm_backend(perm.hidden, inputs["gate_up_proj"], transpose_weight=True)
    counts = perm.tokens_per_expert
    print(
        f"{shape}  grouped_mm auto backend: {backend}  "
        f"tokens per expert min/max: {counts.min().item()}/{counts.max().item()}"
    )
    _print_table(
        "whole layer (router + routing + permute + 2 grouped GEMMs + SwiGLU + unpermute)",
        results,
        shape.fwd_flops,
    )

    gemms: dict[str, Callable | str] = {
        "loop (transformers)": gemm_only("loop"),
        "forge": gemm_only("forge"),
        "forge[triton]": gemm_only("forge[triton]"),
        "torch._grouped_mm": gemm_only("torch._grouped_mm") if has_grouped_mm else no_grouped_mm,
    }
    gemm_results = {
        name: fn
        if isinstance(fn, str)
        else _measure(fn, gemm_inputs, device, args, grad_keys=("x", "w"))
        for name, fn in gemms.items()
    }
    # gate/up alone: 2 * rows * H * 2I = 4 T k H I of the layer's 6 T k H I.
    _print_table("gate/up grouped GEMM alone", gemm_results, shape.fwd_flops * 2 // 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=768, help="moe_intermediate_size")
    parser.add_argument("--experts", default="128,64", help="comma-separated expert counts")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes and 1 iteration: check the script runs"
    )
    args = parser.parse_args()
    # On CPU, TRITON_INTERPRET=1 was set when bench_norms was imported (the first import of
    # forge_kernels is that module's): bench_norms.interpret_triton_on_cpu.
    device = torch.device(args.device)
    if args.smoke:
        args.tokens, args.hidden, args.inter, args.experts, args.top_k = 37, 24, 16, "6", 2
        args.warmup, args.iters = 1, 1
    dtype = DTYPES[args.dtype]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device={device} ({name})  dtype={args.dtype}")
    for experts in (int(e) for e in args.experts.split(",")):
        shape = LayerShape(
            tokens=args.tokens,
            hidden=args.hidden,
            inter=args.inter,
            experts=experts,
            top_k=args.top_k,
        )
        run_shape(shape, args, device, dtype)


if __name__ == "__main__":
    main()
