"""Benchmark: bf16 vs FP8 linear layers (per-tensor, delayed, block-wise, Transformer Engine).

For Llama-like GEMM shapes (8192 tokens; hidden 4096 -> 4096 / 1024 / 14336 and 14336 -> 4096,
the projections of Llama-3-8B) times the forward + backward of one linear layer (three GEMMs,
plus the FP8 casts) for each contender and prints, side by side: median milliseconds, achieved
TFLOP/s (3 GEMMs x 2*M*N*K flops), that as a fraction of the GPU's dense peak for the contender's
precision, the speed-up over bf16 and the output's relative error against an fp32 linear.

    # a GPU (Hopper for block-wise; Ada/Hopper/Blackwell for per-tensor)
    python packages/forge-kernels/benchmarks/bench_fp8.py
    # also calibrate and write the FP8 policy table for this GPU
    python packages/forge-kernels/benchmarks/bench_fp8.py --write-policy fp8_policy.json
    # a quick check that the script runs (tiny sizes, CPU, FP8 emulated: says nothing of speed)
    python packages/forge-kernels/benchmarks/bench_fp8.py --device cpu --smoke

Contenders: ``bf16`` (``F.linear``), ``fp8-current`` / ``fp8-delayed`` (per-tensor scales,
``torch._scaled_mm``), ``fp8-blockwise`` (DeepSeek-V3 1x128 / 128x128 scales, sm90 only),
and ``te-current`` / ``te-delayed`` / ``te-blockwise`` (``te.Linear`` under Transformer
Engine's FP8 autocast) when transformer-engine is installed. All take bf16 activations and bf16
weights (as under FSDP mixed precision). Peak figures are NVIDIA's dense (no sparsity) tensor
core numbers from the product datasheets.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from forge_kernels.benchmarking import peak_tflops as peak_tflops_of
from forge_kernels.benchmarking import time_ms

LLAMA_SHAPES = "8192x4096x4096,8192x1024x4096,8192x14336x4096,8192x4096x14336"
SMOKE_SHAPES = "64x256x128,48x128x256"
POLICY_TOKENS = "256,512,1024,2048,4096,8192,16384"


def peak_tflops(device: torch.device) -> tuple[float, float] | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)  # forge-kernels' one table, by name token
    bf16, fp8 = peak_tflops_of(name), peak_tflops_of(name, dtype="fp8")
    return None if bf16 is None else (bf16, fp8)


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """``MxNxK`` items: M tokens, N out_features, K in_features."""
    shapes = []
    for item in text.split(","):
        m, n, k = (int(v) for v in item.lower().split("x"))
        shapes.append((m, n, k))
    return shapes


def contenders(device: torch.device, n: int, k: int, weight: torch.Tensor) -> dict:
    """name -> (precision, ``f(x) -> y`` with its own leaf weight) or a "skipped: ..." string."""
    from forge_kernels.fp8 import (
        DelayedScalingState,
        Fp8Linear,
        fp8_linear,
        resolve_recipe,
        scaled_mm_unsupported_reason,
    )
    from forge_kernels.fp8.te_backend import transformer_engine_available

    out: dict = {}
    w_bf16 = weight.detach().clone().requires_grad_()
    out["bf16"] = ("bf16", lambda x: F.linear(x, w_bf16), [w_bf16])
    for name in ("current", "delayed", "blockwise"):
        recipe = resolve_recipe(name)
        reason = scaled_mm_unsupported_reason(recipe, device, in_features=k, out_features=n)
        if device.type == "cuda" and reason is not None:
            out[f"fp8-{name}"] = f"skipped: {reason}"
            continue
        gemm = "scaled_mm" if device.type == "cuda" else "emulate"
        w = weight.detach().clone().requires_grad_()
        state = DelayedScalingState.create(3, 1024, device) if name == "delayed" else None

        def run(x, w=w, recipe=recipe, state=state, gemm=gemm):
            return fp8_linear(x, w, recipe=recipe, state=state, gemm=gemm)

        out[f"fp8-{name}"] = ("fp8", run, [w])
    for name in ("current", "delayed", "blockwise"):
        if device.type != "cuda" or not transformer_engine_available():
            out[f"te-{name}"] = "skipped: needs CUDA and transformer-engine"
            continue
        try:
            layer = Fp8Linear(
                k, n, bias=False, recipe=name, backend="te", device=device, dtype=torch.bfloat16
            )
            with torch.no_grad():
                layer.weight.copy_(weight)
        except Exception as exc:  # a benchmark reports a contender's failure and goes on
            out[f"te-{name}"] = f"skipped: {type(exc).__name__}: {exc}"[:120]
            continue
        out[f"te-{name}"] = ("fp8", layer, [layer.weight])
    return out


def run_case(m: int, n: int, k: int, device: torch.device, args) -> None:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, generator=gen).to(torch.bfloat16)
    weight = (torch.randn(n, k, device=device, generator=gen) / k**0.5).to(torch.bfloat16)
    dy = torch.randn(m, n, device=device, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        reference = F.linear(x.float(), weight.float())
    flops = 3 * 2 * m * n * k
    peaks = peak_tflops(device)
    bf16_ms = None
    for name, contender in contenders(device, n, k, weight).items():
        label = f"{m}x{n}x{k}"
        if isinstance(contender, str):
            print(f"{label:<20}{name:<16}{contender}")
            continue
        precision, fn, params = contender
        xl = x.detach().clone().requires_grad_()

        def step(fn=fn, xl=xl, params=params):
            torch.autograd.grad(fn(xl), [xl, *params], dy)

        try:
            ms = time_ms(step, device, warmup=args.warmup, iters=args.iters)
            with torch.no_grad():
                err = ((fn(x).float() - reference).norm() / reference.norm()).item()
        except Exception as exc:  # a benchmark reports a contender's failure and goes on
            print(f"{label:<20}{name:<16}failed: {type(exc).__name__}: {str(exc)[:80]}")
            continue
        if name == "bf16":
            bf16_ms = ms
        tflops = flops / (ms * 1e-3) / 1e12
        peak = None if peaks is None else peaks[0 if precision == "bf16" else 1]
        frac = f"{100 * tflops / peak:.1f}" if peak else "n/a"
        speedup = f"{bf16_ms / ms:.2f}" if bf16_ms else "n/a"
        print(f"{label:<20}{name:<16}{ms:>10.3f}{tflops:>10.1f}{frac:>9}{speedup:>9}{err:>10.4f}")


def write_policy(path: str, shapes, device: torch.device, args) -> None:
    from forge_kernels.fp8 import calibrate_fp8_policy, scaled_mm_unsupported_reason

    tokens = [int(t) for t in args.policy_tokens.split(",")]
    pairs = sorted({(n, k) for _, n, k in shapes})
    grid = [(m, n, k) for n, k in pairs for m in tokens]
    emulate = device.type != "cuda"
    if not emulate:  # calibrate only the shapes the recipe can run in FP8 here
        grid = [
            s
            for s in grid
            if scaled_mm_unsupported_reason(
                args.policy_recipe, device, in_features=s[2], out_features=s[1]
            )
            is None
        ]
    policy = calibrate_fp8_policy(
        grid,
        device=device,
        recipe=args.policy_recipe,
        margin=args.margin,
        warmup=args.warmup,
        iters=args.iters,
        emulate=emulate,
    )
    policy.save(path)
    print(f"\nFP8 policy ({policy.device_name}, recipe {policy.recipe}) written to {path}")
    print(f"{'N x K':<16}{'min tokens for FP8':>20}   speed-ups by tokens")
    for (n, k), threshold in policy.thresholds().items():
        speedups = " ".join(
            f"{e.m}:{e.speedup:.2f}" for e in policy.entries if (e.n, e.k) == (n, k)
        )
        print(f"{f'{n}x{k}':<16}{threshold if threshold else 'never':>20}   {speedups}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", help=f"comma-separated MxNxK (default {LLAMA_SHAPES})")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1-2 iterations")
    parser.add_argument("--write-policy", metavar="PATH", help="calibrate and save a policy")
    parser.add_argument("--policy-recipe", default="current", help="recipe to calibrate")
    parser.add_argument("--policy-tokens", default=POLICY_TOKENS, help="token counts to time")
    parser.add_argument("--margin", type=float, default=0.05, help="policy speed-up margin")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.smoke:
        args.warmup, args.iters = 1, 2
        args.policy_tokens = "16,64"
    shapes = parse_shapes(args.shapes or (SMOKE_SHAPES if args.smoke else LLAMA_SHAPES))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "FP8 emulated"
    peaks = peak_tflops(device)
    peak_text = (
        f"dense peak bf16 {peaks[0]:.0f}, fp8 {peaks[1] or 'n/a'} TFLOP/s" if peaks else "peak n/a"
    )
    print(f"device={device} ({name}), torch {torch.__version__}, {peak_text}")
    print("fwd+bwd of one linear layer (3 GEMMs + FP8 casts); bf16 activations and weights")
    header = f"{'MxNxK':<20}{'contender':<16}{'ms':>10}{'TFLOP/s':>10}{'% peak':>9}{'x bf16':>9}{'rel err':>10}"
    print(header)
    print("-" * len(header))
    for m, n, k in shapes:
        run_case(m, n, k, device, args)
    if args.write_policy:
        write_policy(args.write_policy, shapes, device, args)


if __name__ == "__main__":
    main()
