"""Benchmark: fused linear + cross-entropy vs eager, torch.compile and Liger-Kernel.

Times forward + backward of ``loss(hidden @ weight.T, labels)`` and reports peak memory, the
ratio to eager, and achieved TFLOP/s against the three GEMMs' FLOPs (``6 * N * H * V``: logits,
grad_hidden, grad_weight). Fused methods follow Liger-Kernel (arXiv:2410.10989) and Wijmans et
al. 2024, "Cut Your Losses in Large-Vocabulary Language Models" (arXiv:2411.09009).

    # a GPU, Llama-3-sized vocabulary
    python packages/forge-kernels/benchmarks/bench_fused_linear_cross_entropy.py
    # a quick check that the script runs (tiny sizes, CPU)
    python packages/forge-kernels/benchmarks/bench_fused_linear_cross_entropy.py --device cpu --smoke

On CPU peak memory is not measured ("n/a"); the Triton path runs there only with
``TRITON_INTERPRET=1`` (slowly), otherwise forge uses its eager chunked fallback.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from forge_kernels.loss import fused_linear_cross_entropy

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True, kw_only=True)
class Shape:
    n_tokens: int
    hidden: int
    vocab: int

    @property
    def gemm_flops(self) -> int:
        return 6 * self.n_tokens * self.hidden * self.vocab


def eager_loss(hidden, weight, labels):
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, labels, ignore_index=-100)


def forge_loss(hidden, weight, labels):
    return fused_linear_cross_entropy(hidden, weight, labels, ignore_index=-100)


def liger_loss_or_reason() -> Callable | str:
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return "skipped: liger-kernel not installed"
    module = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")

    def liger_loss(hidden, weight, labels):
        out = module(weight, hidden, labels)  # Liger's order: (lin_weight, input, target)
        return out[0] if isinstance(out, tuple) else getattr(out, "loss", out)

    return liger_loss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, hidden, weight, labels, *, warmup: int, iters: int) -> dict:
    """Median fwd+bwd seconds, peak extra bytes (CUDA only) and the loss of the last run."""
    device = hidden.device
    hidden = hidden.detach().requires_grad_(True)
    weight = weight.detach().requires_grad_(True)

    def step():
        hidden.grad = weight.grad = None
        loss = fn(hidden, weight, labels)
        loss.backward()
        return loss

    for _ in range(warmup):
        step()
    _sync(device)
    hidden.grad = weight.grad = None
    peak = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        loss = step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "peak": peak, "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(eager)")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes and 1 iteration: check the script runs"
    )
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.hidden, args.vocab = 64, 32, 500
        args.warmup, args.iters = 1, 1

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    shape = Shape(n_tokens=args.tokens, hidden=args.hidden, vocab=args.vocab)
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(shape.n_tokens, shape.hidden, device=device, dtype=dtype, generator=gen)
    weight = torch.randn(shape.vocab, shape.hidden, device=device, dtype=dtype, generator=gen)
    weight /= shape.hidden**0.5
    labels = torch.randint(0, shape.vocab, (shape.n_tokens,), device=device, generator=gen)
    labels[::10] = -100

    methods: dict[str, Callable | str] = {"forge": forge_loss, "eager": eager_loss}
    methods["torch.compile(eager)"] = (
        "skipped: --no-compile" if args.no_compile else torch.compile(eager_loss)
    )
    methods["liger"] = liger_loss_or_reason()

    print(
        f"N={shape.n_tokens} H={shape.hidden} V={shape.vocab} dtype={args.dtype} "
        f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'})"
    )
    results: dict[str, dict | str] = {}
    for name, fn in methods.items():
        if isinstance(fn, str):
            results[name] = fn
            continue
        try:
            results[name] = measure(
                fn, hidden, weight, labels, warmup=args.warmup, iters=args.iters
            )
        except Exception as exc:  # a benchmark reports a contender's failure and goes on
            results[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"

    eager = results.get("eager")
    header = f"{'method':<22}{'ms fwd+bwd':>12}{'x eager':>9}{'peak MiB':>11}{'mem x eager':>13}{'TFLOP/s':>9}{'loss':>11}"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        if isinstance(r, str):
            print(f"{name:<22}{r}")
            continue
        speedup = f"{eager['seconds'] / r['seconds']:.2f}" if isinstance(eager, dict) else "-"
        peak = f"{r['peak'] / 2**20:.0f}" if r["peak"] is not None else "n/a"
        mem_ratio = (
            f"{r['peak'] / eager['peak']:.2f}"
            if isinstance(eager, dict) and r["peak"] and eager["peak"]
            else "n/a"
        )
        tflops = shape.gemm_flops / r["seconds"] / 1e12
        print(
            f"{name:<22}{r['seconds'] * 1e3:>12.2f}{speedup:>9}{peak:>11}{mem_ratio:>13}"
            f"{tflops:>9.2f}{r['loss']:>11.5f}"
        )
    if isinstance(eager, dict) and isinstance(results["forge"], dict):
        diff = abs(results["forge"]["loss"] - eager["loss"])
        print(f"|loss(forge) - loss(eager)| = {diff:.2e}")


if __name__ == "__main__":
    main()
