"""``forge-bench``: run the workloads, print one table, optionally append it to BENCHMARKS.md.

forge-bench                                   # llm + moe on this machine's GPU
forge-bench --workloads kernels               # forge-kernels' benchmark scripts
forge-bench --sizes 1b --seq 4096 --record BENCHMARKS.md
forge-bench --smoke                           # every workload, tiny, CPU, under a minute
forge-bench --deadline 520 --timeout 200      # inside a 560 s limit: rows that no longer fit
                                              # are reported as skipped, not cut off
forge-bench --workloads llm --list-rows       # the rows this would run or skip, run nothing

Each row prints a one-line summary as it finishes and --record is rewritten after every row
(the rows done and "(incomplete: N rows not run yet)"), so an outer kill keeps what was
measured; SIGTERM stops the running row, writes the table and the record, and exits with 143.

Exit status: 0 when every row that ran was measured (rows skipped for a missing peer, for
--kernel-scripts or, beside measured rows, for --deadline do not count against it); 1 when a
row failed (an error row); 3 when no row was measured at all (e.g. --deadline left time for
none: the table is all skipped rows); 143 on SIGTERM, 130 on Ctrl-C (the rows done are still
printed and recorded); 2 when the flags are refused.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from forge_bench import progress
from forge_bench.isolate import JobRunner

__all__ = ["EXIT_NOTHING_MEASURED", "exit_status", "main", "parse_args"]

WORKLOADS = ("llm", "moe", "kernels")

#: The exit status of a run that measured no row: told apart from 0, which a CI job or the GPU
#: session script would read as success, and from 1 (a row failed).
EXIT_NOTHING_MEASURED = 3


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
    p.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                   help="wall-clock budget of the whole run: a row is started only while its "
                        "--timeout fits in what is left (else it is reported as skipped; exit "
                        "status 3 if no row was measured at all), and gets at most what is "
                        "left (default: no bound)")  # fmt: skip
    p.add_argument("--kernel-scripts", default=None,
                   help="kernels workload: script names (bench_fp8,...) or 'all' "
                        "(default: all; with --smoke: bench_fused_linear_cross_entropy)")  # fmt: skip
    p.add_argument("--list-rows", action="store_true",
                   help="print the rows these flags plan, one per line, tab-separated: "
                        "workload, case, implementation, and 'run' or 'skipped: <reason>' "
                        "(a missing peer, --kernel-scripts); run nothing")  # fmt: skip
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
    if args.timeout <= 0:
        p.error(f"--timeout must be > 0 seconds, got {args.timeout:g}")
    if args.deadline is not None and args.deadline < args.timeout:
        p.error(
            f"--deadline {args.deadline:g} is less than --timeout {args.timeout:g}: no row "
            "could start; pass a --deadline of at least --timeout (a few rows' worth) or a "
            "smaller --timeout"
        )
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


def _model_rows(cases) -> list:
    """One row per (case, implementation), in table order; a missing peer's row is skipped."""
    from forge_bench.table import Row

    rows = []
    for case in cases:
        for impl in case.impls:
            row = Row(workload=case.workload, case=f"{case.label} {case.rows}x{case.seq}",
                      impl=impl.name)  # fmt: skip
            if impl.skip:
                row.status = f"skipped: {impl.skip}"
            rows.append((row, case, impl))
    return rows


def _run_cases(todo, args, runner: JobRunner, device, dtype_name: str, peak, run) -> None:
    """Run the (row, case, impl) entries of ``todo`` one by one, filling their rows; ``run`` is
    the :class:`forge_bench.progress.Progress` that decides whether each may start and shows it
    when it is done."""
    import forge_models
    from forge_bench.worker import DTYPES, Job

    with tempfile.TemporaryDirectory(prefix="forge_bench_") as tmp:
        weights: dict = {}
        for row, case, impl in todo:
            if not run.admit(row):
                continue
            key = repr(case.config)
            if key not in weights:
                weights[key] = _save_weights(case.config, DTYPES[dtype_name], Path(tmp))
            limit = run.allowance(row)  # the save took some of what was left
            if limit is None:
                continue
            job = Job(impl=impl, hf_dir=weights[key], moe=case.workload == "moe",
                      rows=case.rows, seq=case.seq, vocab_size=case.config.vocab_size,
                      device=str(device), dtype=dtype_name, warmup=args.warmup,
                      steps=args.steps, config=case.config)  # fmt: skip
            run.start(row, f"{case.workload} {row.case}: {impl.name} ...")
            started = time.perf_counter()
            result = runner.run(job, timeout_s=limit)
            seconds = time.perf_counter() - started
            row.peak_bytes = result.get("peak_bytes")
            if "error" in result:
                error = result["error"]
                if limit < args.timeout and error.startswith("timed out"):
                    error = f"stopped at the run's --deadline after {limit:.0f} s"
                row.status = f"error: {error}"
                run.finish(row, row.status)
                continue
            row.tokens_per_s = result["tokens_per_s"]
            row.loss_first, row.loss_last = result["loss_first"], result["loss_last"]
            row.notes = list(result["notes"])
            if peak:
                flops = forge_models.flops_per_token(case.config, case.seq)
                row.mfu = row.tokens_per_s * flops / (peak * 1e12)
            mfu = "" if row.mfu is None else f", MFU {100 * row.mfu:.1f}%"
            run.finish(row, f"{row.tokens_per_s:,.0f} tokens/s{mfu}, loss {row.loss_first:.4f}"
                            f" -> {row.loss_last:.4f}, {seconds:.0f} s")  # fmt: skip


def _kernel_rows(args, device: str):
    """Rows for the kernels workload and the (row, script) pairs to run (see forge_bench.kernels)."""
    from forge_bench.kernels import SMOKE_SCRIPTS, find_scripts
    from forge_bench.table import Row

    scripts, reason = find_scripts()
    if reason:
        return [Row(workload="kernels", case="-", impl="forge-kernels benchmarks",
                    status=f"skipped: {reason}")], []  # fmt: skip
    wanted = args.kernel_scripts or (",".join(SMOKE_SCRIPTS) if args.smoke else "all")
    names = None if wanted == "all" else {n.removesuffix(".py") for n in _csv(wanted)}
    unknown = sorted((names or set()) - {script.stem for script in scripts})
    if unknown:  # a typo would skip the script silently and measure the others
        known = ", ".join(script.stem for script in scripts)
        print(f"forge-bench: error: --kernel-scripts names no benchmark script {unknown}; "
              f"choose from: {known} (or 'all')", file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    rows, todo = [], []
    for script in scripts:
        row = Row(workload="kernels", case=device, impl=script.name)
        rows.append(row)
        if names is not None and script.stem not in names:
            row.status = f"skipped: not in --kernel-scripts ({wanted})"
            continue
        todo.append((row, script))
    return rows, todo


def _finish_kernels(todo, args, device: str, run, running=None) -> None:
    """Run (or, with ``running``: row -> started script, wait for) the scripts of ``todo``;
    fills their rows and hands their output to ``run`` (a Progress)."""
    from forge_bench.kernels import finish_script, start_script

    for row, script in todo:
        if running is not None:
            if id(row) not in running:  # not started: the deadline was already too close
                continue
            handle = running[id(row)]
            run.start(row, f"kernels: {script.name} (started beside the model rows) ...")
        else:
            if not run.admit(row):
                continue
            run.start(row, f"kernels: {script.name} ...")
            handle = start_script(script, device=device)
        result = finish_script(handle, timeout_s=args.timeout, budget_s=run.left())
        if result.error:
            row.status = f"error: {result.error}"
        row.notes = [f"{result.seconds:.1f} s; its output is below the table"]
        summary = f"kernels {script.name}: {row.status}, {result.seconds:.1f} s"
        run.finish(row, summary, output=f"### {script.name}\n\n{result.output.rstrip()}")


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
    started = progress.clock()  # --deadline counts from here
    args = parse_args(argv)
    if args.list_rows:
        return _list_rows(args)
    with progress.stop_on_sigterm() as sigterm:
        return _main(args, argv, started, sigterm)


def _main(args, argv, started: float, sigterm) -> int:
    runner = JobRunner(start_method=args.start_method, timeout_s=args.timeout)
    run, running = None, {}  # running: the kernel scripts started beside the model rows (CPU)
    try:
        if {"llm", "moe"} & set(args.workloads):
            runner.start()  # the server imports torch & co. while this process does the same
        run, plan = _setup(args, argv, started, running)
        _run_cases(plan.todo, args, runner, plan.device, plan.dtype_name, plan.peak, run)
        _finish_kernels(plan.kernel_todo, args, str(plan.device), run,
                        running if plan.device.type != "cuda" else None)  # fmt: skip
    except (progress.Stopped, KeyboardInterrupt) as exc:
        sigterm.raising = False  # a second SIGTERM must not cut the writing short
        from forge_bench.kernels import stop_script

        for handle in running.values():
            stop_script(handle)
        reason = "SIGTERM" if isinstance(exc, progress.Stopped) else "Ctrl-C"
        if run is None:
            print(f"[forge-bench] stopped by {reason} before any row ran", flush=True)
            return 143 if reason == "SIGTERM" else 130
        run.stop(reason)
    sigterm.raising = False
    print(run.report())
    for out in run.outputs:
        print(f"\n{out}")
    if run.record is not None:
        run.save()
        print(f"[forge-bench] appended to {args.record}")
    skipped = sum(r.status.startswith("skipped: deadline") for r in run.rows)
    if skipped:
        print(f"[forge-bench] --deadline {args.deadline:g}: {skipped} row(s) not started (too "
              "little time left for their --timeout); see the table", flush=True)  # fmt: skip
    code = exit_status(run.done(), stopped=run.stopped, sigterm_received=sigterm.received)
    if code == EXIT_NOTHING_MEASURED:
        print(f"[forge-bench] no row was measured, every row was skipped (see the table): "
              f"exit status {code}", flush=True)  # fmt: skip
    return code


def exit_status(done: list, *, stopped: str | None, sigterm_received: bool) -> int:
    """forge-bench's exit status from the rows ``done`` (finished, failed or skipped; not those
    never reached) and how the run ended (``stopped``: :attr:`forge_bench.progress.Progress.
    stopped`; ``sigterm_received``: a SIGTERM came while the results were being written).

    A script or CI job that runs forge-bench reads 0 as "measured": a run whose rows were all
    skipped (a ``--deadline`` that left time for none, a ``--kernel-scripts`` that names no
    script) used to exit 0 with nothing measured, so it gets :data:`EXIT_NOTHING_MEASURED`.
    In order: stopped by SIGTERM 143 (also when it came during the writing: the results are
    complete, but the caller asked to stop), by Ctrl-C 130; an error row 1; no measured row
    :data:`EXIT_NOTHING_MEASURED`; else 0, skipped rows beside measured ones included (a
    missing peer is the machine's, not the run's, failure; rows past ``--deadline`` are
    reported in the table and the log)."""
    if stopped is not None:
        return 143 if "SIGTERM" in stopped else 130
    if sigterm_received:
        return 143
    if any(r.status.startswith("error") for r in done):
        return 1
    if not any(r.ok for r in done):
        return EXIT_NOTHING_MEASURED
    return 0


def _list_rows(args) -> int:
    """``--list-rows``: the rows :func:`_setup` would plan for these flags, one per line
    (tab-separated workload, case, implementation, ``run`` or ``skipped: <reason>``), nothing
    run. The GPU session script sizes its per-row ``--timeout`` from the number of ``run``
    rows; it used to re-derive this plan with its own copy of the calls below."""
    device = _device(args)
    entries, _, kernel_rows, _ = _plan_rows(args, device)
    for row in [row for row, _, _ in entries] + kernel_rows:
        plan = "run" if row.ok else row.status
        print("\t".join((row.workload, row.case, row.impl, plan)), flush=True)
    return 0


def _device(args):
    """``--device`` (default: cuda if available, else cpu), checked by :func:`_check_device`."""
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _check_device(device)
    return device


def _plan_rows(args, device):
    """The run's rows for these flags on ``device``: the model rows (row, case, impl), those of
    them to run, the kernel rows and the (row, script) pairs to run. Rows skipped here (a
    missing peer, --kernel-scripts) carry their reason; the deadline is decided as rows start.
    The one plan both a run (:func:`_setup`) and ``--list-rows`` use."""
    from forge_bench.peers import find_peers
    from forge_bench.plan import llm_cases, moe_cases

    peers = find_peers(device_type=device.type)
    cases = []
    if "llm" in args.workloads:
        cases += llm_cases(sizes=args.sizes, seqs=args.seq, peers=peers, smoke=args.smoke,
                           tokens=args.tokens)  # fmt: skip
    if "moe" in args.workloads:
        cases += moe_cases(seqs=args.seq, peers=peers, smoke=args.smoke, tokens=args.tokens)
    entries = _model_rows(cases)
    todo = [entry for entry in entries if not entry[0].status.startswith("skipped")]
    kernel_rows, kernel_todo = [], []
    if "kernels" in args.workloads:
        kernel_rows, kernel_todo = _kernel_rows(args, str(device))
    return entries, todo, kernel_rows, kernel_todo


@dataclass(frozen=True, kw_only=True)
class _Plan:
    """What :func:`_setup` decided: the device, its dtype and peak TFLOP/s, the model rows to
    run (row, case, impl) and the kernel scripts to run (row, script)."""

    device: object
    dtype_name: str
    peak: float | None
    todo: list
    kernel_todo: list


def _setup(args, argv, started: float, running: dict):
    """The device, the cases and their rows, the table header and the record: the run's
    :class:`forge_bench.progress.Progress` and :class:`_Plan`. On CPU the kernel scripts start
    here, beside the model workloads, and go into ``running`` (row id -> started script; filled
    in place so that a SIGTERM meanwhile still finds them to stop)."""
    from forge_bench.record import Record, environment
    from forge_bench.table import FLOP_FORMULA, peak_tflops_for

    device = _device(args)
    dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    env = environment(device)
    peak = args.peak_tflops or (peak_tflops_for(env["device"]) if device.type == "cuda" else None)
    entries, todo, kernel_rows, kernel_todo = _plan_rows(args, device)
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
    record = None
    if args.record:
        command = "forge-bench " + shlex.join(sys.argv[1:] if argv is None else argv)
        record = Record(args.record, env=env, command=command)
    run = progress.Progress(
        rows=[row for row, _, _ in entries] + kernel_rows,
        pending=[r for r, _, _ in todo] + [r for r, _ in kernel_todo],
        header=header,
        record=record,
        timeout_s=args.timeout,
        deadline_s=args.deadline,
        started=started,
    )
    if record is not None:
        run.save()
        print(f"[forge-bench] recording to {args.record} (rewritten after every row)", flush=True)
    if device.type != "cuda":  # CPU figures mean nothing: run beside the model workloads
        from forge_bench.kernels import start_script

        for row, script in kernel_todo:
            if run.admit(row):
                running[id(row)] = start_script(script, device=str(device))
    return run, _Plan(device=device, dtype_name=dtype_name, peak=peak, todo=todo,
                      kernel_todo=kernel_todo)  # fmt: skip
