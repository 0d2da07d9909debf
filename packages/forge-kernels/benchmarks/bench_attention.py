"""Benchmark attention: forge's auto dispatch vs each backend forced (flash-attn, SDPA, FlexAttention)
vs the eager reference, forward and forward + backward.

    # a GPU (bf16, Llama-3-8B heads: 32 query / 8 key-value heads of 128, 16k tokens per batch)
    python packages/forge-kernels/benchmarks/bench_attention.py
    # a quick check that the script runs (tiny sizes, CPU)
    python packages/forge-kernels/benchmarks/bench_attention.py --device cpu --smoke

Cases, for each sequence length S (default 4096 and 8192) at ``--tokens`` tokens per batch:
``causal`` (``[tokens / S, S, H, D]``, causal, GQA), ``packed`` (the same tokens packed as
documents of random lengths up to S, ``cu_seqlens``, causal, GQA); optionally ``full``
(bidirectional) and ``multimodal`` (causal text with bidirectional image blocks, a block mask).

FLOPs counted, as FlashAttention's benchmarks do: a forward is two matmuls (``q kᵀ`` and
``p v``) of 2 FLOP per multiply-add, ``4 * B * Sq * Sk * Hq * D`` for full attention, halved
for causal (``2 * B * S² * Hq * D``); packed documents count ``Σ 4 * Lᵢ² * Hq * D`` (halved for
causal); the multimodal mask counts its allowed (query, key) pairs. A backward is 2.5 forwards
(five matmuls), so forward + backward is 3.5 forwards. Achieved TFLOP/s are also shown as a
fraction of the GPU's dense bf16 peak (a table by device name, or ``--peak-tflops``); masked-out
work that a backend computes anyway (SDPA with a dense mask, eager) is not credited.

Columns: median ms (CUDA events, L2 flushed, from bench_norms.py's harness), TFLOP/s, % of peak,
speed-up over eager (``x eager``) and over forge auto (``x auto``), peak extra memory, and the
largest output difference from eager (from SDPA where eager would not fit).
"""

from __future__ import annotations

import argparse
import random

import torch
from bench_norms import DTYPES, peak_mib, time_ms  # the shared harness (this script's folder)

from forge_kernels.attention import (
    attention,
    dense_mask,
    multimodal_mask,
    record_attention_backends,
)
from forge_kernels.benchmarking import peak_tflops as peak_tflops_of

PROVIDERS = ["forge auto", "flash_attn", "sdpa", "flex", "eager"]


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    return peak_tflops_of(torch.cuda.get_device_name(device))  # forge-kernels' one table


def document_lengths(total: int, max_len: int, seed: int) -> list[int]:
    """Random document lengths in [max_len / 8, max_len] that add up to ``total``."""
    rng = random.Random(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(min(rng.randint(max(1, max_len // 8), max_len), total - sum(lengths)))
    return lengths


def image_block_ids(seq: int, seed: int) -> torch.Tensor:
    """Text with images: blocks of seq / 8 tokens after text runs of seq / 16 to seq / 4."""
    rng = random.Random(seed)
    ids, pos, block = torch.full((seq,), -1, dtype=torch.long), 0, 0
    while True:
        pos += rng.randint(max(1, seq // 16), max(1, seq // 4))
        end = min(pos + max(1, seq // 8), seq)
        if pos >= seq:
            return ids
        ids[pos:end] = block
        pos, block = end, block + 1


def build_cases(args, device, dtype) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim

    def randn(*shape):
        return torch.randn(shape, device=device, dtype=dtype, generator=gen)

    cases = []
    for seq in args.seqs:
        batch = max(1, args.tokens // seq)
        for kind in args.cases:
            if kind in ("causal", "full"):
                inputs = [
                    randn(batch, seq, hq, d),
                    randn(batch, seq, hkv, d),
                    randn(batch, seq, hkv, d),
                ]
                kwargs = {"causal": kind == "causal"}
                pairs = batch * seq * seq / (2 if kind == "causal" else 1)
                name = f"{kind} B={batch} S={seq}"
            elif kind == "packed":
                total = batch * seq
                lengths = document_lengths(total, seq, seed=seq)
                cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
                inputs = [randn(total, hq, d), randn(total, hkv, d), randn(total, hkv, d)]
                kwargs = {"causal": True, "cu_seqlens": cu.to(device), "max_seqlen": max(lengths)}
                pairs = sum(n * n for n in lengths) / 2
                name = f"packed T={total} docs={len(lengths)} max={max(lengths)}"
            elif kind == "multimodal":
                blocks = image_block_ids(seq, seed=seq).to(device)
                mask = multimodal_mask(block_ids=blocks)
                inputs = [
                    randn(batch, seq, hq, d),
                    randn(batch, seq, hkv, d),
                    randn(batch, seq, hkv, d),
                ]
                kwargs = {"block_mask": mask}
                pairs = batch * dense_mask(mask, seq, seq).sum().item()
                name = f"multimodal B={batch} S={seq} images={int(blocks.max()) + 1}"
            else:
                raise SystemExit(
                    f"unknown case {kind!r}; choose from causal, packed, full, multimodal"
                )
            q_len = inputs[0].shape[-3]
            eager_gib = 3 * 4 * batch * hq * q_len * inputs[1].shape[-3] / 2**30  # fp32 scores
            cases.append(
                {
                    "name": name,
                    "inputs": inputs,
                    "kwargs": kwargs,
                    "fwd_flops": 4 * pairs * hq * d,
                    "eager_gib": eager_gib,
                }
            )
    return cases


def run_case(case, args, device, peak) -> None:
    kwargs = case["kwargs"]
    providers = {}
    for provider in PROVIDERS:
        backend = "auto" if provider == "forge auto" else provider
        if provider == "eager" and case["eager_gib"] > args.eager_max_gib:
            providers[provider] = (
                f"skipped: its fp32 scores need ~{case['eager_gib']:.0f} GiB "
                f"(> --eager-max-gib {args.eager_max_gib:g})"
            )
            continue
        providers[provider] = lambda q, k, v, backend=backend: attention(
            q, k, v, backend=backend, **kwargs
        )

    # What auto chooses, and the reference output. A failing auto call (packed FlexAttention on
    # CUDA with torch 2.11 did) is reported here and again in each mode's row; the other
    # providers still run.
    q, k, v = case["inputs"]
    try:
        with torch.no_grad(), record_attention_backends() as log:
            providers["forge auto"](q, k, v)
        auto_choice = log.backends[0] if log.backends else "nothing recorded"
    except Exception as exc:
        first_line = (str(exc).splitlines() or [""])[0][:100]
        auto_choice = f"failed: {type(exc).__name__}: {first_line}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    reference_name, reference = None, None
    for name in ("eager", "sdpa"):
        if callable(providers[name]):
            try:
                with torch.no_grad():
                    reference = providers[name](q, k, v).float()
                reference_name = name
                break
            except Exception:  # e.g. out of memory: fall back to SDPA
                torch.cuda.empty_cache() if device.type == "cuda" else None
    print(f"== {case['name']}: auto -> {auto_choice}; max|Δ| against {reference_name}")

    gen = torch.Generator(device=device).manual_seed(1)
    grad_out = torch.randn(q.shape[:-1] + v.shape[-1:], device=device, dtype=q.dtype, generator=gen)
    for mode in ("fwd", "fwd+bwd"):
        flops = case["fwd_flops"] * (1.0 if mode == "fwd" else 3.5)
        results = {}
        for provider, fn in providers.items():
            if isinstance(fn, str):
                results[provider] = fn
                continue
            leaves = [t.detach().requires_grad_() for t in case["inputs"]]

            def step(fn=fn, leaves=leaves, mode=mode):
                out = fn(*leaves)
                if mode == "fwd+bwd":
                    return torch.autograd.grad(out, leaves, grad_out)
                return out

            try:
                ms = time_ms(step, device, warmup=args.warmup, iters=args.iters)
                mem = peak_mib(step, device)
                with torch.no_grad():
                    out = fn(*case["inputs"]).float()
                diff = (
                    (out - reference).abs().max().item() if reference is not None else float("nan")
                )
                results[provider] = (ms, mem, diff)
            except Exception as exc:  # report a contender's failure (unsupported, OOM) and go on
                message = str(exc).split("cannot run this attention call: ")[-1]
                first_line = (message.splitlines() or [""])[0][:100]
                status = "skipped" if isinstance(exc, ImportError | ValueError) else "failed"
                results[provider] = f"{status}: {first_line}"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        eager = results.get("eager")
        auto = results.get("forge auto")
        for provider, r in results.items():
            prefix = f"  {mode:<8}{provider:<12}"
            if isinstance(r, str):
                print(prefix + r)
                continue
            ms, mem, diff = r
            tflops = flops / (ms * 1e-3) / 1e12
            pct = f"{100 * tflops / peak:>6.1f}%" if peak else f"{'n/a':>7}"
            x_eager = f"{eager[0] / ms:>8.2f}" if isinstance(eager, tuple) else f"{'-':>8}"
            x_auto = f"{auto[0] / ms:>8.2f}" if isinstance(auto, tuple) else f"{'-':>8}"
            mem_text = f"{mem:>10.0f}" if mem is not None else f"{'n/a':>10}"
            print(
                prefix + f"{ms:>10.3f}{tflops:>9.1f}{pct}{x_eager}{x_auto}{mem_text}{diff:>12.2e}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--seqs", default="4096,8192", help="comma-separated sequence lengths")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per batch")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--cases", default="causal,packed", help="causal,packed,full,multimodal")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, help="override the peak bf16 TFLOP/s")
    parser.add_argument(
        "--eager-max-gib", type=float, default=24.0, help="skip eager above this score memory"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes and 1 iteration: check the script runs"
    )
    args = parser.parse_args()
    if args.smoke:
        args.seqs, args.tokens, args.heads, args.kv_heads, args.head_dim = "64,96", 96, 4, 2, 32
        args.cases = "causal,packed,full,multimodal"
        args.warmup, args.iters = 1, 2
    args.seqs = [int(s) for s in args.seqs.split(",")]
    args.cases = args.cases.split(",")

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    peak = peak_tflops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak_text = f"{peak:g} TFLOP/s" if peak else "unknown (pass --peak-tflops)"
    print(
        f"device={device} ({name})  dtype={args.dtype}  heads={args.heads}/{args.kv_heads} "
        f"head_dim={args.head_dim}  peak bf16 dense={peak_text}"
    )
    print(
        f"  {'mode':<8}{'provider':<12}{'ms':>10}{'TFLOP/s':>9}{'% peak':>7}{'x eager':>8}"
        f"{'x auto':>8}{'peak MiB':>10}{'max|Δ|':>12}"
    )
    for case in build_cases(args, device, dtype):
        run_case(case, args, device, peak)


if __name__ == "__main__":
    main()
