"""``forge-bench``: run the workloads, print one table, optionally append it to BENCHMARKS.md.

forge-bench                                   # llm + moe on this machine's GPU
forge-bench --workloads kernels               # forge-kernels' benchmark scripts
forge-bench --sizes 1b --seq 4096 --record BENCHMARKS.md
forge-bench --smoke                           # every workload, tiny, CPU, under a minute
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

from forge_bench.isolate import JobRunner

__all__ = ["main", "parse_args"]

WORKLOADS = ("llm", "moe", "kernels")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="forge-bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--workloads",
        default=None,
        help="comma-separated: llm,moe,kernels (default: llm,moe; with --smoke all three)",
    )
    p.add_argument("--smoke", action="store_true", help="every workload, tiny, on CPU, 2 steps")
    p.add_argument("--record", metavar="PATH", help="append the results to this Markdown file")
    p.add_argument("--steps", type=int, default=10, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--seq", default="4096,8192", help="row lengths (moe: the first)")
    p.add_argument("--sizes", default="1b,3b", help="llm sizes: 1b (llama3.2-1b), 3b (llama3.2-3b)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per step (default per size)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for MFU (default: known GPUs' dense bf16 figure)")  # fmt: skip
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--start-method", choices=("forkserver", "spawn"), default="forkserver")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per implementation")
    p.add_argument("--kernel-scripts", default=None,
                   help="kernels workload: script names (bench_fp8,...) or 'all' "
                        "(default: all; with --smoke: bench_fused_linear_cross_entropy)")  # fmt: skip
    args = p.parse_args(argv)
    args.workloads = _csv(args.workloads or ("llm,moe,kernels" if args.smoke else "llm,moe"))
    unknown = sorted(set(args.workloads) - set(WORKLOADS))
    if unknown:
        p.error(f"unknown workload(s) {unknown}; choose from {','.join(WORKLOADS)}")
    if args.smoke:
        args.device, args.steps, args.warmup = "cpu", 2, 0
    args.seq = [int(s) for s in _csv(args.seq)]
    args.sizes = _csv(args.sizes)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def _save_weights(config, dtype, folder: Path) -> str:
    """Random weights (seed 0) for ``config``, as a Hugging Face folder every contender loads."""
    import torch

    import forge_models

    torch.manual_seed(0)
    model = forge_models.build_model(config, dtype=dtype)
    out = folder / f"{config.family}-{len(list(folder.iterdir()))}"
    forge_models.save_pretrained(model, out)
    return str(out)


def _run_cases(cases, args, runner: JobRunner, device, dtype_name: str, peak) -> list:
    import forge_models
    from forge_bench.table import Row
    from forge_bench.worker import DTYPES, Job

    rows = []
    with tempfile.TemporaryDirectory(prefix="forge_bench_") as tmp:
        weights: dict = {}
        for case in cases:
            label = f"{case.label} {case.rows}x{case.seq}"
            flops = forge_models.flops_per_token(case.config, case.seq)
            for impl in case.impls:
                row = Row(workload=case.workload, case=label, impl=impl.name)
                rows.append(row)
                if impl.skip:
                    row.status = f"skipped: {impl.skip}"
                    continue
                key = repr(case.config)
                if key not in weights:
                    weights[key] = _save_weights(case.config, DTYPES[dtype_name], Path(tmp))
                job = Job(impl=impl, hf_dir=weights[key], moe=case.workload == "moe",
                          rows=case.rows, seq=case.seq, vocab_size=case.config.vocab_size,
                          device=str(device), dtype=dtype_name, warmup=args.warmup,
                          steps=args.steps, config=case.config)  # fmt: skip
                print(f"[forge-bench] {case.workload} {label}: {impl.name} ...", flush=True)
                started = time.perf_counter()
                result = runner.run(job)
                result["seconds"] = time.perf_counter() - started
                row.peak_bytes = result.get("peak_bytes")
                if "error" in result:
                    row.status = f"error: {result['error']}"
                    print(f"[forge-bench]   {row.status}", flush=True)
                    continue
                row.tokens_per_s = result["tokens_per_s"]
                row.loss_first, row.loss_last = result["loss_first"], result["loss_last"]
                row.notes = list(result["notes"])
                print(f"[forge-bench]   {row.tokens_per_s:,.0f} tokens/s, loss {row.loss_first:.4f}"
                      f" -> {row.loss_last:.4f}, {result['seconds']:.0f} s", flush=True)  # fmt: skip
                if peak:
                    row.mfu = row.tokens_per_s * flops / (peak * 1e12)
    return rows


def _start_kernels(args, device: str):
    """Rows for the kernels workload and the scripts started for it (see forge_bench.kernels)."""
    from forge_bench.kernels import SMOKE_SCRIPTS, find_scripts
    from forge_bench.table import Row

    scripts, reason = find_scripts()
    if reason:
        return [Row(workload="kernels", case="-", impl="forge-kernels benchmarks",
                    status=f"skipped: {reason}")], []  # fmt: skip
    wanted = args.kernel_scripts or (",".join(SMOKE_SCRIPTS) if args.smoke else "all")
    names = None if wanted == "all" else {n.removesuffix(".py") for n in _csv(wanted)}
    rows, todo = [], []
    for script in scripts:
        row = Row(workload="kernels", case=device, impl=script.name)
        rows.append(row)
        if names is not None and script.stem not in names:
            row.status = f"skipped: not in --kernel-scripts ({wanted})"
            continue
        todo.append((row, script))
    return rows, todo


def _finish_kernels(todo, args, device: str, running=None) -> list[str]:
    """Run (or, with ``running``, wait for) the scripts of ``todo``; fills their rows."""
    from forge_bench.kernels import finish_script, start_script

    outputs = []
    for n, (row, script) in enumerate(todo):
        if running is None:
            print(f"[forge-bench] kernels: {script.name} ...", flush=True)
        handle = running[n] if running else start_script(script, device=device)
        result = finish_script(handle, timeout_s=args.timeout)
        if result.error:
            row.status = f"error: {result.error}"
        row.notes = [f"{result.seconds:.1f} s; its output is below the table"]
        outputs.append(f"### {script.name}\n\n{result.output.rstrip()}")
    return outputs


def _check_device(device) -> None:
    """``--device cuda:N`` names a GPU this process sees: otherwise every row would fail with
    the same CUDA error (and ``cuda:N`` is what each part is pinned to: the workers'
    ``torch.cuda.set_device``, the kernel scripts' ``CUDA_VISIBLE_DEVICES``, the header's name
    and peak TFLOP/s)."""
    import torch

    if device.type != "cuda":
        return
    count = torch.cuda.device_count()
    if count == 0:
        raise ValueError(f"--device {device}: no CUDA device is visible; pass --device cpu")
    if device.index is not None and device.index >= count:
        raise ValueError(
            f"--device {device}, but this process sees {count} CUDA device(s) (cuda:0 to "
            f"cuda:{count - 1}): pick one of those or check CUDA_VISIBLE_DEVICES"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runner = JobRunner(start_method=args.start_method, timeout_s=args.timeout)
    if {"llm", "moe"} & set(args.workloads):
        runner.start()  # the server imports torch & co. while this process does the same

    import torch

    from forge_bench.peers import find_peers
    from forge_bench.plan import llm_cases, moe_cases
    from forge_bench.record import append_record, environment
    from forge_bench.table import FLOP_FORMULA, fill_ratios, format_table, peak_tflops_for

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _check_device(device)
    dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    env = environment(device)
    peak = args.peak_tflops or (peak_tflops_for(env["device"]) if device.type == "cuda" else None)
    peers = find_peers(device_type=device.type)
    cases = []
    if "llm" in args.workloads:
        cases += llm_cases(sizes=args.sizes, seqs=args.seq, peers=peers, smoke=args.smoke,
                           tokens=args.tokens)  # fmt: skip
    if "moe" in args.workloads:
        cases += moe_cases(seqs=args.seq, peers=peers, smoke=args.smoke, tokens=args.tokens)
    kernel_rows, todo, running = [], [], None
    if "kernels" in args.workloads:
        kernel_rows, todo = _start_kernels(args, str(device))
        if device.type != "cuda":  # CPU figures mean nothing: run beside the model workloads
            from forge_bench.kernels import start_script

            running = [start_script(script, device=str(device)) for _, script in todo]
    rows = _run_cases(cases, args, runner, device, dtype_name, peak) + kernel_rows
    outputs = _finish_kernels(todo, args, str(device), running)
    fill_ratios(rows)

    header = [
        "forge-bench: " + " | ".join(f"{k} {v}" for k, v in env.items()),
        f"{dtype_name} on {device}, {args.warmup} warmup + {args.steps} timed steps of "
        "forward + backward + "
        f"AdamW; peak TFLOP/s {peak if peak else 'unknown (pass --peak-tflops)'}",
        FLOP_FORMULA,
        "ratio: peer rows forge/peer (same recompute setting); forge rows forge/transformers; "
        "fp8 rows fp8/bf16 forge. peak GiB: " + (
            f"torch.cuda.max_memory_allocated({device})" if device.type == "cuda" else
            "the job process's peak resident set above its start (Linux VmHWM after a "
            "clear_refs reset; the fork server's imports excluded; '-' where /proc has no reset)"
        ),
    ]  # fmt: skip
    report = "\n".join([*header, "", format_table(rows)])
    print(report)
    for out in outputs:
        print(f"\n{out}")
    if args.record:
        command = "forge-bench " + shlex.join(sys.argv[1:] if argv is None else argv)
        body = "\n\n".join([report, *outputs])
        append_record(args.record, env=env, command=command, body=body)
        print(f"[forge-bench] appended to {args.record}")
    return 1 if any(r.status.startswith("error") for r in rows) else 0
