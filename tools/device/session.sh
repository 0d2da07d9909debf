#!/usr/bin/env bash
# Run THERE (the lent GPU machine), one part per `device` call, each well inside the 10-minute
# limit of a call; logs and result tables go to $OUT (the files that come back):
#   run(carry=[".whl"], command="source .whl/device-env.sh && bash tools/device/session.sh PART")
# Parts, in the order a session with 30 minutes of device time should run them:
#   kernels  forge-kernels' GPU tests, then the packed FlexAttention check with its traceback
#   bench    forge-kernels' benchmark scripts (FP8 policy calibration included)
#   llm      forge-bench: Llama 1B at 4096, forge vs the peers installed there (--record)
#   moe      forge-bench: the Qwen3-MoE-style workload, and forge-parallel's single-device
#            wrapper overhead
# `session.sh --list` prints the parts. Copy the figures into the BENCHMARKS.md files by hand,
# with the date, GPU, torch version and the command (the logs carry all four).
set -uo pipefail
OUT="${OUT:-/tmp/forge-device-out}"
mkdir -p "$OUT"
PARTS="kernels bench llm moe"
part="${1:-}"

env_report() {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
}

case "$part" in
--list) echo "$PARTS" ;;
kernels)
    env_report 2>&1 | tee "$OUT/env.log"
    timeout 420 python3 -m pytest packages/forge-kernels -m gpu -q -p no:cacheprovider \
        --durations=15 2>&1 | tee "$OUT/kernels_gpu_tests.log"
    timeout 120 python3 - <<'PY' 2>&1 | tee "$OUT/flex_packed.log"
import traceback
import torch
from forge_kernels.attention import attention
lengths = [3839, 2000, 1500, 777]
cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
q, k, v = (torch.randn(sum(lengths), h, 128, device="cuda", dtype=torch.bfloat16) for h in (32, 8, 8))
reference = attention(q, k, v, causal=True, cu_seqlens=cu, max_seqlen=max(lengths), backend="sdpa")
try:
    out = attention(q, k, v, causal=True, cu_seqlens=cu, max_seqlen=max(lengths), backend="flex")
    print("flex packed: max|d| against sdpa", (out - reference).abs().max().item())
except Exception:
    traceback.print_exc()
PY
    ;;
bench)
    env_report 2>&1 | tee "$OUT/env.log"
    # One log for all scripts: at most 8 files come back from $OUT.
    for script in bench_norms bench_glu bench_rope bench_fused_linear_cross_entropy \
            bench_attention bench_moe bench_keyed_dropout; do
        echo "=== $script"
        timeout 60 python3 "packages/forge-kernels/benchmarks/$script.py" 2>&1
    done | tee "$OUT/kernel_benchmarks.log"
    timeout 120 python3 packages/forge-kernels/benchmarks/bench_fp8.py \
        --write-policy "$OUT/fp8_policy.json" 2>&1 | tee "$OUT/bench_fp8.log"
    ;;
llm)
    timeout 560 python3 -m forge_bench --workloads llm --sizes 1b --seq 4096 --timeout 100 \
        --record "$OUT/BENCHMARKS-llm.md" 2>&1 | tee "$OUT/forge_bench_llm.log"
    ;;
moe)
    timeout 360 python3 -m forge_bench --workloads moe --seq 4096 --timeout 240 \
        --record "$OUT/BENCHMARKS-moe.md" 2>&1 | tee "$OUT/forge_bench_moe.log"
    timeout 180 python3 packages/forge-parallel/benchmarks/bench_single_device.py 2>&1 \
        | tee "$OUT/bench_single_device.log"
    ;;
*)
    echo "usage: session.sh {$(echo $PARTS | tr ' ' '|')|--list}" >&2
    exit 2
    ;;
esac
