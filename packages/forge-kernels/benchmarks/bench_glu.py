"""Benchmark: fused SwiGLU / GeGLU vs eager, torch.compile and Liger-Kernel.

For each op, shape and input layout, times the forward and the forward + backward of every
contender in the same run, and prints a table: median milliseconds, speed-up over eager, peak extra
memory, achieved GB/s against the op's minimal memory traffic (forward reads gate and up and
writes the product; backward reads the output gradient, gate and up and writes both gradients)
and that as a fraction of the HBM bandwidth measured here with a large device-to-device copy.

    # a GPU (bf16, 8k tokens, Llama-2-7B / Llama-3-8B intermediate sizes)
    python packages/forge-kernels/benchmarks/bench_glu.py
    # a quick check that the script runs (tiny sizes, CPU, Triton interpreted)
    python packages/forge-kernels/benchmarks/bench_glu.py --device cpu --smoke --no-compile

Layouts: ``separate`` gives gate and up as two tensors (separate projections, as transformers'
Llama MLP); ``chunked`` gives the two halves of one fused ``gate_up`` projection
(``torch.chunk``), which forge reads in place through their strides. Eager is what a transformers
model runs in the activation dtype: ``F.silu(gate) * up`` / ``F.gelu(gate) * up``. Liger-Kernel's
GeGLU is tanh-only. The harness and table are bench_norms.py's.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from bench_norms import (  # the shared harness; this script's folder is on sys.path
    DTYPES,
    Case,
    Provider,
    base_parser,
    compiled_or_reason,
    parse_shapes,
    prepare_environment,
    run_benchmarks,
)


def eager_swiglu(gate, up):
    return F.silu(gate) * up


def eager_geglu_tanh(gate, up):
    return F.gelu(gate, approximate="tanh") * up


def eager_geglu_erf(gate, up):
    return F.gelu(gate) * up


def liger_providers() -> dict[str, Provider]:
    """Liger-Kernel's fused SiLU/GELU-and-multiply, or why they are skipped."""
    try:
        from liger_kernel.ops.geglu import LigerGELUMulFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError:
        reason = "skipped: liger-kernel not installed"
        return {"swiglu": reason, "geglu_tanh": reason, "geglu_erf": reason}
    # autograd.Function.apply takes no keywords; the harness passes gate= and up=.
    return {
        "swiglu": lambda gate, up: LigerSiLUMulFunction.apply(gate, up),
        "geglu_tanh": lambda gate, up: LigerGELUMulFunction.apply(gate, up),
        "geglu_erf": "skipped: liger-kernel's GeGLU is tanh-only",
    }


def glu_cases(args: argparse.Namespace, device: torch.device) -> list[Case]:
    from forge_kernels.activations import geglu, swiglu

    ops = {
        "swiglu": (swiglu, eager_swiglu),
        "geglu_tanh": (lambda gate, up: geglu(gate, up, approximate="tanh"), eager_geglu_tanh),
        "geglu_erf": (lambda gate, up: geglu(gate, up, approximate="none"), eager_geglu_erf),
    }
    dtype = DTYPES[args.dtype]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    liger = liger_providers()
    gen = torch.Generator(device=device).manual_seed(0)
    cases = []
    for rows, cols in parse_shapes(args.shapes):
        for layout in ("separate", "chunked"):
            for op, (forge_fn, eager_fn) in ops.items():
                gate_up = torch.randn((rows, 2 * cols), device=device, dtype=dtype, generator=gen)
                if layout == "separate":
                    gate, up = (t.contiguous() for t in gate_up.chunk(2, dim=-1))
                    inputs = {"gate": gate, "up": up}

                    def prepare(leaves):
                        return leaves

                else:
                    inputs = {"gate_up": gate_up}

                    def prepare(leaves):
                        gate, up = leaves["gate_up"].chunk(2, dim=-1)
                        return {"gate": gate, "up": up}

                providers: dict[str, Provider] = {
                    "forge": forge_fn,
                    "eager": eager_fn,
                    "torch.compile(eager)": compiled_or_reason(eager_fn, args),
                    "liger": liger[op],
                }
                tensor_bytes = rows * cols * itemsize
                cases.append(
                    Case(
                        name=f"{op} {layout} {rows}x{cols}",
                        inputs=inputs,
                        providers=providers,
                        prepare=prepare,
                        fwd_bytes=3 * tensor_bytes,
                        bwd_bytes=5 * tensor_bytes,
                    )
                )
    return cases


def main() -> None:
    args = base_parser(__doc__.split("\n")[0]).parse_args()
    device = prepare_environment(
        args, default_shapes="8192x11008,8192x14336", smoke_shapes="24x96,5x257"
    )
    run_benchmarks(glu_cases(args, device), args, device)


if __name__ == "__main__":
    main()
