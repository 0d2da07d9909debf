"""Benchmark: keyed dropout (Triton, mask hashed in the kernel) vs the torch path it replaces
in forge-train's LoRA dropout, ``torch.compile`` of that path and plain ``F.dropout``.

For each shape, times the forward and the forward + backward of every contender in the same
run and prints bench_norms.py's table (median milliseconds, speed-up over the old torch path,
achieved GB/s against the minimal traffic: read x and write y forward, read dy and write dx
backward; peak extra memory on CUDA), then what each contender's autograd saves for backward,
measured with ``torch.autograd.graph.saved_tensors_hooks`` (on any device).

    # a GPU (bf16, 16k tokens, Llama-3-8B hidden and intermediate sizes)
    python packages/forge-kernels/benchmarks/bench_keyed_dropout.py
    # a quick check that the script runs (tiny sizes, CPU, Triton interpreted)
    python packages/forge-kernels/benchmarks/bench_keyed_dropout.py --device cpu --smoke --no-compile

"eager" is forge-kernels' ``keyed_dropout_reference``: forge-train's LoRA dropout before the
kernel (an int64 hash of ``[tokens, features]`` lanes, then ``x * keep / (1 - p)``, saving the
mask in x's dtype). ``F.dropout`` draws a generator mask (not keyed: a different mask, so its
``max|out-eager|`` is large by design) and saves a bool mask. On CPU the forge row times the
Triton interpreter (meaningless as speed; it checks the code path).
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

P, SALT = 0.1, 0x2545F491


def saved_mib(fn, x: torch.Tensor) -> float:
    """MiB of distinct storages autograd saves for the backward of ``fn(x)``."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    leaf = x.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x=leaf)
    storages.pop(leaf.untyped_storage().data_ptr(), None)  # the input is held anyway
    return sum(storages.values()) / 2**20


def dropout_cases(args: argparse.Namespace, device: torch.device) -> list[Case]:
    from forge_kernels.dropout import keyed_dropout, keyed_dropout_reference

    dtype = DTYPES[args.dtype]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    gen = torch.Generator(device=device).manual_seed(0)
    cases = []
    for rows, cols in parse_shapes(args.shapes):
        x = torch.randn((rows, cols), device=device, dtype=dtype, generator=gen)
        keys = torch.randint(0, 2**32, (rows,), device=device, generator=gen)

        def forge(x, keys=keys):
            return keyed_dropout(x, keys, p=P, salt=SALT)

        def old_torch_path(x, keys=keys):
            return keyed_dropout_reference(x, keys, p=P, salt=SALT)

        def plain_dropout(x):
            return F.dropout(x, P, True)

        providers: dict[str, Provider] = {
            "forge": forge,
            "eager": old_torch_path,
            "torch.compile(eager)": compiled_or_reason(old_torch_path, args),
            "F.dropout": plain_dropout,
        }
        tensor_bytes = rows * cols * itemsize
        cases.append(
            Case(
                name=f"keyed_dropout {rows}x{cols}",
                inputs={"x": x},
                providers=providers,
                fwd_bytes=2 * tensor_bytes + 8 * rows,
                bwd_bytes=2 * tensor_bytes + 8 * rows,
            )
        )
    return cases


def print_saved(cases: list[Case]) -> None:
    print(f"{'saved for backward (the input not counted)':<56}{'MiB':>12}{'bytes/element':>15}")
    for case in cases:
        x = case.inputs["x"]
        for provider, fn in case.providers.items():
            if isinstance(fn, str):
                continue
            try:
                mib = saved_mib(fn, x)
                text = f"{mib:>12.4f}{mib * 2**20 / x.numel():>15.3f}"
            except Exception as exc:  # report a contender's failure and go on
                text = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
            print(f"{case.name:<34}{provider:<22}{text}")


def main() -> None:
    args = base_parser(__doc__.split("\n")[0]).parse_args()
    device = prepare_environment(
        args, default_shapes="16384x4096,16384x14336", smoke_shapes="24x96,5x257"
    )
    cases = dropout_cases(args, device)
    run_benchmarks(cases, args, device)
    print_saved(cases)


if __name__ == "__main__":
    main()
