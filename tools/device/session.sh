#!/usr/bin/env bash
# Run THERE (the lent GPU machine), one part per `device` call; logs and result tables go to $OUT
# (the files that come back, at most 8 per call):
#   run(carry=[".whl"], command="source .whl/device-env.sh && bash tools/device/session.sh PART")
# Parts, in the order of their value; each part's commands run under `timeout`, and the bound
# is the most the part can take (a call may run 600 s, device-env.sh's wheel install included):
#   kernels  <= 480 s  forge-kernels' tests on CUDA: the `gpu`-marked ones, the packed
#                      FlexAttention check (two calls with the same cu_seqlens, then backward),
#                      then the whole suite but `sm90_compile` (pytest-xdist, per-test timeout)
#   llm      <= 560 s  forge-bench: Llama 1B at 4096, forge vs the peers installed there (MFU)
#   vlm      <= 480 s  forge-train on a Qwen2.5-VL-3B-shaped VLM (random init, bf16, vision
#                      frozen, full recompute) over synthetic webdataset shards written there:
#                      tokens/s, MFU with the encoder counted, the loader's wait per step; then
#                      bench_vlm_prefetch.py at GPU-sized images
#   bench    <= 440 s  kernel benchmarks owed first: attention, fused linear CE, FP8 + policy
#   bench2   <= 540 s  kernel benchmarks: norms, GLU, RoPE, MoE, keyed dropout
#   moe      <= 550 s  forge-bench's Qwen3-MoE-style workload; forge-parallel's single-device
#                      wrapper overhead
# kernels + llm stay under 1050 s; then vlm or bench (the first owed VLM figures, or the kernel
# benchmarks): kernels + llm + vlm (or bench) stay under 1530 s, which fits a 30-minute session
# with the machine's start. Run the rest only while the device's budget_left_s exceeds the
# part's bound + 60.
# `session.sh --list` prints the parts. Copy the figures into the BENCHMARKS.md files by hand,
# with the date, GPU, torch version and the command (env.log and the logs carry all four).
#
# SESSION_DRY_RUN=1 runs the same commands on a machine without a GPU (tiny sizes: each
# script's --smoke, forge-bench --smoke) to check the parts before a session spends device
# time on them. KERNEL_TESTS (default packages/forge-kernels) narrows the kernels part's tests,
# e.g. to one file for a dry run or a re-run.
set -uo pipefail
OUT="${OUT:-/tmp/forge-device-out}"
mkdir -p "$OUT"
PARTS="kernels llm vlm bench bench2 moe"
part="${1:-}"
DRY="${SESSION_DRY_RUN:-0}"
KERNEL_TESTS="${KERNEL_TESTS:-packages/forge-kernels}"
export PYTHONUNBUFFERED=1
if [ "$DRY" != 1 ]; then
    # conftest.py switches the interpreter on when it finds no /dev/nvidiactl; here the kernels
    # must run compiled whatever the machine's device files look like. (A dry run leaves it to
    # conftest.py and the scripts, as their CPU commands do.)
    export TRITON_INTERPRET=0
fi

env_report() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    else
        echo "nvidia-smi: not found"
    fi
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    echo "TRITON_INTERPRET=${TRITON_INTERPRET:-unset} SESSION_DRY_RUN=$DRY"
}

# Pytest under a limit: SIGINT first, so that pytest (and xdist's workers) print the summary of
# what ran, then SIGKILL 10 s later. The whole verbose log goes to $OUT/LOG; the console shows
# the failures and the summary lines.
run_pytest() {  # LIMIT LOG PYTEST-ARGS...
    local limit=$1 log=$2
    shift 2
    echo "=== pytest $* (limit ${limit} s)" | tee "$OUT/$log"
    timeout -s INT -k 10 "$limit" python3 -m pytest -p no:cacheprovider -v -rfE --durations=15 \
        "$@" 2>&1 | tee -a "$OUT/$log" \
        | grep -E --line-buffered '(^| )(FAILED|ERROR)( |$)|^=+ .*(passed|failed|error|skipped|deselected|no tests ran)|Timeout|KeyboardInterrupt'
    local rc=${PIPESTATUS[0]}
    echo "=== pytest exit $rc$([ "$rc" = 124 ] && echo " (cut off at ${limit} s)")" \
        | tee -a "$OUT/$log"
}

# pytest-xdist and pytest-timeout are on the GPU machine's image (not in uv.lock): used when
# importable, so the part also runs where they are missing (slower, bounded by `timeout` alone).
pytest_extras() {  # WORKERS PER-TEST-SECONDS
    python3 -c "import xdist" 2>/dev/null && [ "$1" -gt 0 ] && printf -- '-n\n%s\n' "$1"
    python3 -c "import pytest_timeout" 2>/dev/null && printf -- '--timeout\n%s\n' "$2"
}

# One benchmark script under its own limit, appending to its log. SIZE-ARGS (one string) are the
# GPU run's size flags, dropped in a dry run for the script's --smoke (and --no-compile where it
# has one: torch.compile of interpreted Triton kernels is not what a dry run checks).
run_script() {  # LIMIT SCRIPT SIZE-ARGS [OTHER-ARGS...]
    local limit=$1 script=$2 sizes=$3
    shift 3
    local path="packages/forge-kernels/benchmarks/$script.py" args
    # shellcheck disable=SC2206
    args=($sizes)
    if [ "$DRY" = 1 ]; then
        args=(--device cpu --smoke)
        python3 "$path" --help | grep -q -- --no-compile && args+=(--no-compile)
    fi
    echo "=== $script ${args[*]} $* (limit ${limit} s)"
    timeout -k 10 "$limit" python3 "$path" "${args[@]}" "$@" 2>&1
    local rc=$?
    echo "=== $script: exit $rc$([ "$rc" = 124 ] && echo " (cut off at ${limit} s)")"
}

# How many forge-bench rows will run here (skipped ones cost nothing): forge-bench's own plan for
# these flags (--list-rows: a row a line, tab-separated, 'run' or 'skipped: ...' last). Prints
# nothing usable (0 or an error) when that cannot be found out; the caller then assumes 8.
bench_rows() {  # FORGE-BENCH-ARGS...
    python3 -m forge_bench "$@" --list-rows | awk -F '\t' '$4 == "run"' | wc -l
}

# forge-bench bounds itself with --deadline (a row whose --timeout no longer fits what is left
# is reported as skipped, not started), prints each row as it finishes and rewrites --record
# after every row, and on the outer timeout's SIGTERM writes what is done. So a row may take
# twice its share of the limit (a cold first row compiles Triton and FlexAttention kernels),
# 60-200 s, and the deadline keeps the whole run 20 s inside the outer `timeout`.
run_forge_bench() {  # LIMIT SETUP NAME FORGE-BENCH-ARGS...
    local limit=$1 setup=$2 name=$3
    shift 3
    local smoke=()
    [ "$DRY" = 1 ] && smoke=(--smoke)
    local rows per_row deadline=$((limit - 20))
    rows=$(bench_rows "$@" "${smoke[@]}")
    rows=${rows//[[:space:]]/}
    if ! [[ "$rows" =~ ^[1-9][0-9]*$ ]]; then
        echo "=== forge-bench --list-rows found no row to run ('$rows'): 8 rows assumed"
        rows=8
    fi
    per_row=$((2 * (limit - setup) / rows))
    [ "$per_row" -gt 200 ] && per_row=200
    [ "$per_row" -lt 60 ] && per_row=60
    echo "=== forge-bench $*: $rows rows run here; --timeout $per_row --deadline $deadline" \
        "(outer limit $limit s)"
    timeout -k 10 "$limit" python3 -m forge_bench "$@" "${smoke[@]}" --timeout "$per_row" \
        --deadline "$deadline" --record "$OUT/BENCHMARKS-$name.md" 2>&1
    local rc=$? why=""
    # 124: the outer timeout (forge-bench wrote the rows done on its SIGTERM); forge-bench's own
    # non-zero statuses: 1 a row failed, 3 nothing measured (e.g. every row past --deadline).
    [ "$rc" = 124 ] && why=" (cut off at ${limit} s)"
    [ "$rc" = 1 ] && why=" (a row failed: see the table)"
    [ "$rc" = 3 ] && why=" (nothing measured: every row was skipped)"
    echo "=== forge-bench exit $rc$why"
}

case "$part" in
--list) echo "$PARTS" ;;
kernels)
    env_report 2>&1 | tee "$OUT/env.log"
    mapfile -t extras < <(pytest_extras 0 100)
    # The gpu-marked tests first, alone: their log is complete whatever happens after.
    run_pytest 150 kernels_gpu_tests.log "$KERNEL_TESTS" -m gpu "${extras[@]}"
    timeout 60 python3 - <<'PY' 2>&1 | tee "$OUT/flex_packed.log"
# Packed documents through FlexAttention: on CUDA with torch 2.11 the second call with the same
# cu_seqlens tensor failed (its block-mask cache compared tensors with ==), so: two calls with
# the same tensor, then the backward, each against SDPA with its dense block-diagonal mask.
import traceback

import torch

from forge_kernels.attention import attention

cuda = torch.cuda.is_available()
device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
lengths = [3839, 2000, 1500, 777] if cuda else [96, 50, 37, 20]  # CPU: a dry run, small
cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
gen = torch.Generator(device=device).manual_seed(0)
q, k, v = (
    torch.randn(sum(lengths), h, 128, device=device, dtype=dtype, generator=gen).requires_grad_(cuda)
    for h in (32, 8, 8)
)  # FlexAttention has no backward on CPU: a dry run checks the forward calls alone
grad_out = torch.randn(q.shape, device=device, dtype=dtype, generator=gen)
kwargs = dict(causal=True, cu_seqlens=cu, max_seqlen=max(lengths))
reference = attention(q, k, v, backend="sdpa", **kwargs)
ref_grads = torch.autograd.grad(reference, (q, k, v), grad_out) if cuda else None
print(f"device={device} dtype={dtype} lengths={lengths} torch {torch.__version__}")
out = None
for call in (1, 2):
    try:
        out = attention(q, k, v, backend="flex", **kwargs)
        diff = (out - reference).abs().max().item()
        print(f"flex packed, call {call} (same cu_seqlens): max|d| against sdpa {diff:.3e}")
    except Exception:
        print(f"flex packed, call {call} (same cu_seqlens): failed")
        traceback.print_exc()
        out = None
if out is not None and cuda:
    try:
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        diffs = ", ".join(
            f"d{n} {(g - r).abs().max().item():.3e}"
            for n, g, r in zip("qkv", grads, ref_grads, strict=True)
        )
        print(f"flex packed, backward of call 2: max|d| against sdpa: {diffs}")
    except Exception:
        print("flex packed, backward of call 2: failed")
        traceback.print_exc()
PY
    mapfile -t extras < <(pytest_extras 8 100)
    run_pytest 270 kernels_cuda_tests.log "$KERNEL_TESTS" -m "not gpu and not sm90_compile" \
        "${extras[@]}"
    ;;
llm)
    env_report 2>&1 | tee "$OUT/env.log"
    run_forge_bench 560 40 llm --workloads llm --sizes 1b --seq 4096 2>&1 \
        | tee "$OUT/forge_bench_llm.log"
    ;;
vlm)
    env_report 2>&1 | tee "$OUT/env.log"
    # 1. A synthetic shard set on the local disk (no network there): 8 shards of 64 samples,
    #    photo-like JPEG / PNG images of 448-1344 px with chat or caption text.
    bench=apps/train/benchmarks
    shards=$(mktemp -d /tmp/forge-vlm-shards.XXXXXX)
    smoke=()
    [ "$DRY" = 1 ] && smoke=(--smoke)
    echo "=== make_vlm_shards --out $shards ${smoke[*]} (limit 45 s)" | tee "$OUT/vlm_shards.log"
    timeout -k 5 45 python3 $bench/make_vlm_shards.py --out "$shards" "${smoke[@]}" 2>&1 \
        | tee -a "$OUT/vlm_shards.log"
    echo "=== make_vlm_shards: exit ${PIPESTATUS[0]}" | tee -a "$OUT/vlm_shards.log"
    # 2. forge-train recipe=vlm data=vlm-shards: model=qwen2_5-vl-3b (3.75B, random init, bf16,
    #    vision frozen, parallel.recompute=full: without it a 4096-token row does not fit 78 GiB,
    #    see the script's docstring), 8 rows x 4096 tokens per step, 40 steps, a row every 5.
    #    --deadline stops the steps 30 s inside the limit, the summary still printed. SIGINT:
    #    forge-train's SIGTERM handler would save a checkpoint (3.75B + AdamW) before exiting.
    echo "=== bench_vlm_train ${smoke[*]} --deadline 230 (limit 260 s)" \
        | tee "$OUT/forge_train_vlm.log"
    timeout -s INT -k 10 260 python3 $bench/bench_vlm_train.py --shards "$shards" \
        --deadline 230 --metrics-copy "$OUT/vlm_metrics.jsonl" "${smoke[@]}" 2>&1 \
        | tee -a "$OUT/forge_train_vlm.log"
    rc=${PIPESTATUS[0]}
    why=""
    [ "$rc" = 124 ] && why=" (cut off at 260 s)"
    [ "$rc" = 3 ] && why=" (CUDA out of memory: see above)"
    echo "=== bench_vlm_train: exit $rc$why" | tee -a "$OUT/forge_train_vlm.log"
    rm -rf "$shards"
    # 3. The loader alone (its own shards), at the run's sizes: 4 rows x 4096 tokens per step,
    #    images of 448-1344 px at a 1,003,520-pixel budget (qwen2_5-vl-tiny's processor: 320
    #    windows of 56 px; the 3B's is 80 of 112, the same pixels and tokens); few steps, one
    #    repeat: it writes its shards in one process and decodes in the step first; beside
    #    the in-process variants, 4 decode worker processes (data.decode_workers=4).
    prefetch=(--rows 4 --seq-len 4096 --max-tiles 320 --pack-buffer 64 --shards 4 --per-shard 32
        --min-px 448 --max-px 1344 --steps 8 --repeats 1 --decode-workers 4)
    if [ "$DRY" = 1 ]; then
        prefetch=(--rows 2 --seq-len 256 --max-tiles 8 --pack-buffer 8 --shards 2 --per-shard 8
            --min-px 64 --max-px 128 --steps 3 --repeats 1)
    fi
    echo "=== bench_vlm_prefetch ${prefetch[*]} (limit 140 s)" | tee "$OUT/bench_vlm_prefetch.log"
    timeout -k 10 140 python3 $bench/bench_vlm_prefetch.py "${prefetch[@]}" 2>&1 \
        | tee -a "$OUT/bench_vlm_prefetch.log"
    rc=${PIPESTATUS[0]}
    echo "=== bench_vlm_prefetch: exit $rc$([ "$rc" = 124 ] && echo " (cut off at 140 s)")" \
        | tee -a "$OUT/bench_vlm_prefetch.log"
    ;;
bench)
    env_report 2>&1 | tee "$OUT/env.log"
    run_script 170 bench_attention "" | tee "$OUT/bench_attention.log"
    run_script 90 bench_fused_linear_cross_entropy "" \
        | tee "$OUT/bench_fused_linear_cross_entropy.log"
    run_script 180 bench_fp8 "" --write-policy "$OUT/fp8_policy.json" | tee "$OUT/bench_fp8.log"
    ;;
bench2)
    env_report 2>&1 | tee "$OUT/env.log"
    # bench_norms and bench_glu compile every case afresh (torch.compile and the Triton
    # kernels): the shapes of BENCHMARKS.md's summary, not all four / both defaults.
    run_script 150 bench_norms "--shapes 16384x4096,16384x5120" | tee "$OUT/bench_norms.log"
    run_script 120 bench_glu "--shapes 8192x14336" | tee "$OUT/bench_glu.log"
    run_script 90 bench_rope "" | tee "$OUT/bench_rope.log"
    run_script 90 bench_moe "" | tee "$OUT/bench_moe.log"
    run_script 90 bench_keyed_dropout "" | tee "$OUT/bench_keyed_dropout.log"
    ;;
moe)
    env_report 2>&1 | tee "$OUT/env.log"
    run_forge_bench 340 60 moe --workloads moe --seq 4096 2>&1 | tee "$OUT/forge_bench_moe.log"
    # A row per variant as each finishes; compile (the one never run on a GPU yet) right after
    # the baseline, each variant bounded by its own --timeout.
    variants=plain,compile,fsdp,ddp,recompute-full,recompute-selective,recompute-pointwise
    variants=$variants,recompute-modules,recompute-auto,offload
    smoke=()
    [ "$DRY" = 1 ] && smoke=(--smoke)
    echo "=== bench_single_device --variants $variants --timeout 90 ${smoke[*]} (limit 210 s)" \
        | tee "$OUT/bench_single_device.log"
    timeout -k 10 210 python3 packages/forge-parallel/benchmarks/bench_single_device.py \
        --variants "$variants" --timeout 90 "${smoke[@]}" 2>&1 | tee -a "$OUT/bench_single_device.log"
    ;;
*)
    echo "usage: session.sh {$(echo $PARTS | tr ' ' '|')|--list}" >&2
    exit 2
    ;;
esac
