"""Benchmark: forge's Llama vs transformers' ``LlamaForCausalLM``, forward + backward, one run.

Both models are loaded from the same Hugging Face folder (random weights, written once by this
script), run the same batch with labels (next-token loss), same dtype, and transformers with
``attn_implementation="sdpa"``. Each is measured in a process of its own, so peak memory is
that model's alone: on CUDA ``torch.cuda.max_memory_allocated`` (weights, gradients,
activations), on CPU the process's peak resident set. The table gives median milliseconds per
step (forward + backward), tokens per second, achieved TFLOP/s by
``forge_models.flops_per_token`` (the same count for both), MFU when ``--peak-tflops`` is given,
peak memory, the loss (the two agree up to the dtype's rounding) and forge / transformers
ratios.

    # GPU: ~1B Llama (Llama 3.2 1B: 1.24B parameters), bf16, 4 x 2048 tokens
    python packages/forge-models/benchmarks/bench_llama.py --peak-tflops 989
    # check that the script runs (tiny model, CPU, seconds)
    python packages/forge-models/benchmarks/bench_llama.py --smoke

The forge model computes the loss with ``forge_kernels.fused_linear_cross_entropy`` (no
``[tokens, vocab]`` logits), fuses gate/up into one GEMM and runs forge-kernels' RMSNorm, RoPE
and SwiGLU; transformers materializes the fp32 logits for its loss.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", default="llama3.2-1b", help="forge size name (default: llama3.2-1b)")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="default: bfloat16 on cuda, float32 on cpu",
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="device peak for MFU (H100 SXM bf16 dense: 989)",
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny model on CPU: checks that the script runs"
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.device, args.batch, args.seq = "llama-debug", "cpu", 2, 64
        args.warmup, args.steps = 1, 2
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(impl: str, hf_dir: str, args: argparse.Namespace) -> dict:
    """Load ``impl`` from ``hf_dir``, time ``args.steps`` forward + backward steps."""
    import forge_models

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if impl == "forge":
        model = forge_models.from_pretrained(hf_dir, dtype=dtype, device=device)

        def step(ids):
            return model(ids, labels=ids)

    else:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation="sdpa")
        model.to(device)

        def step(ids):
            return model(input_ids=ids, labels=ids).loss

    model.train()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(device)
    loss_value = None
    for _ in range(args.warmup):
        loss = step(ids)
        loss.backward()
        loss_value = loss.item()
        model.zero_grad(set_to_none=True)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step(ids)
        loss.backward()
        _sync(device)
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:  # Linux reports KiB
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"ms": 1e3 * statistics.median(times), "peak": peak, "loss": loss_value}


def _child(queue, impl, hf_dir, args) -> None:
    try:
        queue.put(measure(impl, hf_dir, args))
    except BaseException as exc:  # report, do not hang the parent
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def run_isolated(impl: str, hf_dir: str, args: argparse.Namespace) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, impl, hf_dir, args))
    proc.start()
    result = queue.get()
    proc.join()
    if "error" in result:
        raise RuntimeError(f"{impl} failed: {result['error']}")
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import forge_models

    overrides = {"num_layers": args.layers} if args.layers else {}
    config = forge_models.get_config(args.size, **overrides)
    if config.family != "llama":
        raise SystemExit(f"--size must be a Llama size, got {args.size} ({config.family})")
    tokens = args.batch * args.seq
    flops = forge_models.flops_per_token(config, args.seq) * tokens
    print(
        f"{args.size}{' (' + str(args.layers) + ' layers)' if args.layers else ''}: "
        f"{forge_models.count_params(config) / 1e9:.3f}B parameters | {args.device} "
        f"{torch.cuda.get_device_name() if args.device.startswith('cuda') else ''} | {args.dtype} | "
        f"batch {args.batch} x seq {args.seq} | torch {torch.__version__}"
    )
    with tempfile.TemporaryDirectory(prefix="bench_llama_") as tmp:
        hf_dir = str(Path(tmp) / "weights")
        torch.manual_seed(0)
        model = forge_models.build_model(config, dtype=DTYPES[args.dtype])
        forge_models.save_pretrained(model, hf_dir)
        del model
        results = {impl: run_isolated(impl, hf_dir, args) for impl in ("forge", "transformers")}

    header = f"{'model':<14}{'ms/step':>10}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}{'loss':>10}"
    print(header)
    print("-" * len(header))
    for impl, r in results.items():
        tflops = flops / (r["ms"] / 1e3) / 1e12
        mfu = f"{100 * tflops / args.peak_tflops:.1f}%" if args.peak_tflops else "-"
        print(
            f"{impl:<14}{r['ms']:>10.1f}{tokens / (r['ms'] / 1e3):>12.0f}{tflops:>10.2f}{mfu:>8}"
            f"{r['peak'] / 2**30:>10.2f}{r['loss']:>10.4f}"
        )
    f, t = results["forge"], results["transformers"]
    memory = "peak GPU memory" if args.device.startswith("cuda") else "peak process RSS"
    print(
        f"forge / transformers: time {f['ms'] / t['ms']:.2f}x, speed-up {t['ms'] / f['ms']:.2f}x, "
        f"{memory} {f['peak'] / t['peak']:.2f}x"
    )


if __name__ == "__main__":
    sys.exit(main())
