"""Single-device overhead of forge-parallel's wrappers against the plain model.

    python packages/forge-parallel/benchmarks/bench_single_device.py            # GPU, Llama 3.2 1B
    python packages/forge-parallel/benchmarks/bench_single_device.py --layers 4 --steps 5
    python packages/forge-parallel/benchmarks/bench_single_device.py --smoke    # CPU, seconds

One process group of size 1 (``forge_core.init_distributed``: nccl on CUDA, gloo on the CPU)
and one forge_models model (default ``llama3.2-1b``, 4 x 2048 tokens). Each variant runs in
its own child process on a fresh model built from the same seed and trains ``--warmup`` +
``--steps`` steps of forward, backward and AdamW on the same batches:

- ``plain``: the model as built, no wrapper;
- ``ddp``: ``parallelize(data_parallel="ddp")`` on one rank (PyTorch's FSDP2-based
  ``replicate``: the all-reduce of a single rank is skipped, the hooks remain);
- ``fsdp``: ``parallelize(data_parallel="fsdp")`` on one rank, with bf16 parameters and fp32
  reductions (``FSDPConfig``) when ``--precision bf16``;
- ``recompute-full`` / ``recompute-selective`` (the ``"attention"`` preset: the attention
  core only, Korthikanti et al. 2022) / ``recompute-pointwise`` (matmul and attention outputs
  kept, the ops between them recomputed: torchtitan's per-op policy, forge-train's
  ``selective``) / ``recompute-modules`` (``attn`` and ``mlp`` checkpointed whole:
  Megatron-Core's ``--recompute-modules``) / ``recompute-auto``: ``RecomputeConfig``; the
  automatic policy gets a per-block budget of half the bytes the plain model's block keeps for
  backward (measured with ``forge_parallel.measure_block`` on the first block);
- ``offload``: ``OffloadConfig()`` (saved activations to host memory, overlapped on CUDA);
- ``compile``: ``parallelize(compile=CompileConfig(...))``, regional ``torch.compile``.

With ``--precision bf16`` the parameters and optimizer state are fp32 and compute runs in bf16:
under ``torch.autocast`` for every variant except ``fsdp``, whose mixed-precision policy casts
the parameters instead. Printed per variant: the median step time and its ratio to ``plain``;
peak memory and its ratio (CUDA: ``torch.cuda.max_memory_allocated`` over the steps, so
parameters, gradients, optimizer state and activations; CPU: the rise of the child's peak
resident set size over its size before the first step, so gradients, optimizer state,
activations and allocator slack); the bytes one step keeps for its backward, measured exactly
after one more forward (``forge_parallel.memory_probe``: storages allocated in the forward and
still alive, on the compute device, so offloaded activations do not count) and its ratio; the
FLOPs of that step's forward and backward relative to ``plain`` (``torch.utils.flop_counter``,
which counts matmuls and attention, not pointwise ops: recomputed matmuls show as extra, a
policy that recomputes only pointwise ops shows 1.00); the loss after the last step and its distance to ``plain``'s (only
dtype rounding should separate them). Kept bytes and FLOPs are not measured under ``compile``
(a dispatch mode does not see inside compiled graphs).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import time
import traceback

VARIANTS = (
    "plain",
    "ddp",
    "fsdp",
    "recompute-full",
    "recompute-selective",
    "recompute-pointwise",
    "recompute-modules",
    "recompute-auto",
    "offload",
    "compile",
)
SEED = 0


# -- memory of this process --------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- one variant, in a child process ------------------------------------------------------------
def _autocast(args):
    """A factory of the compute-precision context: bf16 autocast, or nothing for fp32."""
    import contextlib

    import torch

    if args.precision == "bf16":
        return lambda: torch.autocast(device_type=args.device, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _auto_budget(model, ids, autocast) -> tuple[int, int]:
    """Half the bytes the plain model's first block keeps for backward, and that measure."""
    import torch

    from forge_parallel import find_blocks, measure_block

    _, block = find_blocks(model)[0]
    captured = {}

    def grab(module, args, kwargs):
        captured.setdefault("call", (args, kwargs))

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), autocast():
            model(ids, labels=ids)
    finally:
        handle.remove()
    call_args, call_kwargs = captured["call"]
    with autocast():
        saved = measure_block(block, *call_args, **call_kwargs).saved_bytes
    return saved // 2, saved


def _wrap(variant: str, model, args, ids, autocast):
    """Apply the variant's wrapper; returns (model, note, uses_autocast)."""
    import torch

    from forge_core import ParallelDims
    from forge_parallel import (
        CompileConfig,
        FSDPConfig,
        OffloadConfig,
        RecomputeConfig,
        parallelize,
    )

    if variant == "plain":
        return model, "", True
    if variant == "ddp":
        mesh = ParallelDims(world_size=1).build_mesh(args.device)
        return parallelize(model, mesh, data_parallel="ddp").model, "replicate, 1 rank", True
    if variant == "fsdp":
        mesh = ParallelDims(world_size=1).build_mesh(args.device)
        bf16 = args.precision == "bf16"
        config = FSDPConfig(param_dtype=torch.bfloat16 if bf16 else None)
        note = "fully_shard, 1 rank" + (", bf16 params / fp32 reduce" if bf16 else "")
        return parallelize(model, mesh, data_parallel="fsdp", fsdp=config).model, note, not bf16
    if variant == "recompute-full":
        return parallelize(model, recompute=RecomputeConfig(mode="full")).model, "", True
    if variant == "recompute-selective":
        config = RecomputeConfig(mode="selective", ops="attention")
        return parallelize(model, recompute=config).model, "attention core", True
    if variant == "recompute-pointwise":
        config = RecomputeConfig(mode="selective", ops="pointwise")
        return parallelize(model, recompute=config).model, "matmuls kept", True
    if variant == "recompute-modules":
        config = RecomputeConfig(mode="selective", modules=("attn", "mlp"))
        return parallelize(model, recompute=config).model, "attn, mlp whole", True
    if variant == "recompute-auto":
        budget, saved = _auto_budget(model, ids, autocast)
        config = RecomputeConfig(mode="auto", memory_budget=budget)
        note = f"budget {budget / 2**20:.1f} of {saved / 2**20:.1f} MiB/block"
        return parallelize(model, recompute=config).model, note, True
    if variant == "offload":
        return parallelize(model, offload=OffloadConfig()).model, "", True
    if variant == "compile":
        config = CompileConfig(backend=args.compile_backend)
        return parallelize(model, compile=config).model, args.compile_backend, True
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def _kept_and_flops(model, ids, autocast, device) -> tuple[int | None, int | None]:
    """Bytes one step keeps for backward (on ``device``) and its forward + backward FLOPs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from forge_parallel.memory_probe import CreatedStorages

    with FlopCounterMode(display=False) as flops:
        with CreatedStorages() as probe, autocast():
            loss = model(ids, labels=ids)
        kept = probe.alive_bytes(device=device, exclude=(loss,))
        loss.backward()
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return kept, flops.get_total_flops()


def _skip_reason(variant: str) -> str | None:
    import torch._dynamo

    if variant == "compile" and not torch._dynamo.is_dynamo_supported():
        return f"torch.compile is not supported on Python {sys.version.split()[0]} here"
    return None


def _run_variant(variant: str, args) -> dict:
    import torch

    import forge_models
    from forge_core import init_distributed, set_accelerator, shutdown_distributed

    reason = _skip_reason(variant)
    if reason is not None:
        return {"skipped": reason}
    if args.threads:
        torch.set_num_threads(args.threads)
    set_accelerator(args.device)
    init_distributed()
    try:
        device = torch.device(args.device)
        torch.manual_seed(SEED)
        overrides = {"num_layers": args.layers} if args.layers else {}
        model = forge_models.build_model(args.size, device=device, **overrides)
        params = sum(p.numel() for p in model.parameters())
        generator = torch.Generator().manual_seed(SEED + 1)
        vocab = model.config.vocab_size
        shape = (args.batch, args.seq)
        batches = [
            torch.randint(0, vocab, shape, generator=generator).to(device)
            for _ in range(args.warmup + args.steps)
        ]
        autocast = _autocast(args)
        model, note, use_autocast = _wrap(variant, model, args, batches[0], autocast)
        if not use_autocast:
            import contextlib

            autocast = contextlib.nullcontext
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        cuda = device.type == "cuda"
        baseline = _rss_bytes()
        rss_reset = _reset_peak_rss()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times, loss = [], None
        for i, ids in enumerate(batches):
            start = time.perf_counter()
            with autocast():
                loss = model(ids, labels=ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        if cuda:
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _peak_rss_bytes() - (baseline if rss_reset else 0)
        kept, flops = (None, None)
        if variant != "compile":
            kept, flops = _kept_and_flops(model, batches[-1], autocast, device)
        if variant == "recompute-auto":
            from forge_parallel import find_blocks

            chosen = sorted({str(b._forge_recompute) for _, b in find_blocks(model)})
            note += "; " + " | ".join(chosen)
        return {
            "ms": statistics.median(times) * 1e3,
            "peak": peak,
            "kept": kept,
            "flops": flops,
            "loss": float(loss.detach().float().item()),
            "params": params,
            "note": note,
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if cuda else "",
        }
    finally:
        shutdown_distributed()


def _child(variant: str, args, conn) -> None:
    try:
        result = _run_variant(variant, args)
    except Exception as exc:  # reported as a failed row; the traceback goes to stderr
        traceback.print_exc()
        first_line = (str(exc).splitlines() or [""])[0][:160]
        result = {"failed": f"{type(exc).__name__}: {first_line}"}
    conn.send(result)
    conn.close()


def _spawn(variant: str, args) -> dict:
    # fork on the CPU (the parent has imported torch: no second import), spawn on CUDA (a
    # CUDA context does not survive a fork; the parent never creates one).
    ctx = mp.get_context("spawn" if args.device == "cuda" else "fork")
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(variant, args, child))
    process.start()
    child.close()
    result = parent.recv() if parent.poll(args.timeout) else None
    process.join(10)
    if process.is_alive():
        process.kill()
        process.join()
    if result is None:
        return {"failed": f"child exited with code {process.exitcode} and no result"}
    return result


# -- the table ----------------------------------------------------------------------------------
def _print_header(args, first: dict) -> None:
    tokens = args.batch * args.seq
    device = first.get("gpu") or args.device
    print(
        f"{args.size} layers={args.layers or 'default'} params={first.get('params', 0) / 1e6:.1f}M "
        f"tokens/step={args.batch}x{args.seq}={tokens} precision={args.precision} "
        f"device={device} torch={first.get('torch', '?')} steps={args.steps} "
        f"warmup={args.warmup}"
    )
    metric = "max_memory_allocated" if args.device == "cuda" else "peak RSS rise"
    print(
        f"{'variant':<20} {'ms/step':>9} {'x plain':>7} {'peak MiB':>9} {'x plain':>7} "
        f"{'kept MiB':>9} {'x plain':>7} {'FLOPs x':>7} {'loss':>9} {'|dloss|':>8}  "
        f"note (peak = {metric}; kept = activations held for backward)",
        flush=True,
    )


def _print_row(variant: str, r: dict, plain: dict | None) -> None:
    """One variant's row, printed as soon as it finished (a run cut short keeps its rows)."""
    if "skipped" in r or "failed" in r:
        label = "skipped" if "skipped" in r else "failed"
        print(f"{variant:<20} {label}: {r.get('skipped') or r.get('failed')}", flush=True)
        return
    ratio_t = f"{r['ms'] / plain['ms']:.2f}" if plain else "-"
    ratio_m = f"{r['peak'] / plain['peak']:.2f}" if plain and plain["peak"] > 0 else "-"
    dloss = f"{abs(r['loss'] - plain['loss']):.2e}" if plain else "-"
    kept = f"{r['kept'] / 2**20:.1f}" if r["kept"] is not None else "-"
    ratio_k = _ratio(r["kept"], plain and plain["kept"])
    ratio_f = _ratio(r["flops"], plain and plain["flops"])
    print(
        f"{variant:<20} {r['ms']:>9.1f} {ratio_t:>7} {r['peak'] / 2**20:>9.1f} "
        f"{ratio_m:>7} {kept:>9} {ratio_k:>7} {ratio_f:>7} {r['loss']:>9.5f} {dloss:>8}  "
        f"{r['note']}".rstrip(),
        flush=True,
    )


def _print_footer(results: dict[str, dict]) -> int:
    ok = {v: r for v, r in results.items() if "ms" in r}
    plain = ok.get("plain")
    if plain and len(ok) > 1:
        worst = max(abs(r["loss"] - plain["loss"]) for r in ok.values())
        print(f"max |loss - plain| over {len(ok)} variants: {worst:.3e}")
    return sum("failed" in r for r in results.values())


def _ratio(value: int | None, baseline: int | None) -> str:
    return f"{value / baseline:.2f}" if value is not None and baseline else "-"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, fp32")
    parser.add_argument("--size", default=None, help="forge_models size (llama3.2-1b)")
    parser.add_argument("--layers", type=int, default=None, help="override num_layers")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (4)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (2048)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (10)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (3)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=None)
    parser.add_argument("--compile-backend", default=None, help="inductor (smoke: aot_eager)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (smoke: 1)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per variant")
    args = parser.parse_args(argv)
    smoke = {
        "size": "llama-debug",
        "batch": 2,
        "seq": 128,
        "steps": 3,
        "warmup": 1,
        "device": "cpu",
        "compile_backend": "aot_eager",
        # One thread: a tiny model gains nothing from two, and spinning OpenMP threads on a
        # shared machine make step times erratic.
        "threads": 1,
    }
    full = {
        "size": "llama3.2-1b",
        "batch": 4,
        "seq": 2048,
        "steps": 10,
        "warmup": 3,
        "device": "cuda",
        "compile_backend": "inductor",
    }
    for key, value in (smoke if args.smoke else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.precision is None:
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if "plain" not in args.variants:
        args.variants.insert(0, "plain")  # the baseline of every ratio
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"need --steps >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import torch

    # The children are spawned on CUDA, so asking here creates no context they would inherit.
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "no CUDA device is visible: run with --smoke (tiny model on the CPU) or --device cpu"
        )
    if args.device == "cpu":  # imported once here, inherited by the forked children
        import torch._dynamo  # the optimizers import it: seconds

        import forge_models  # noqa: F401
        import forge_parallel  # noqa: F401
    results: dict[str, dict] = {}
    for variant in args.variants:  # "plain" first: every ratio's baseline
        start = time.perf_counter()
        results[variant] = result = _spawn(variant, args)
        status = next(k for k in ("ms", "skipped", "failed") if k in result)
        wall = time.perf_counter() - start
        print(f"[{variant}: {status}, {wall:.1f} s]", file=sys.stderr, flush=True)
        if len(results) == 1:
            _print_header(args, result)
        plain = results["plain"] if "ms" in results["plain"] else None
        _print_row(variant, result, plain)
    return 1 if _print_footer(results) else 0


if __name__ == "__main__":
    sys.exit(main())
