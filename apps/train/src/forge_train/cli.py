"""``forge-train``: the command-line entry point.

With no arguments it runs the default job (see :mod:`forge_train.bootstrap`). Under ``torchrun``
every process runs it as one data-parallel job::

    uv run forge-train
    uv run torchrun --nproc-per-node 2 -m forge_train --steps 200
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import fields, replace

from forge_train.bootstrap import BootstrapConfig, run
from forge_train.tiny_lm import TinyLMConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forge-train",
        description="Train a small Llama-style model on the Python standard library's source (the default Forge job).",
    )
    for f in fields(BootstrapConfig):
        if f.name == "model":
            continue
        kind = float if f.type in ("float", "float | None") else int if f.type == "int" else str
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=kind,
            default=f.default,
            help=f"(default: {f.default})",
        )
    for f in fields(TinyLMConfig):
        kind = float if f.type == "float" else int
        parser.add_argument(
            f"--model-{f.name.replace('_', '-')}",
            type=kind,
            default=f.default,
            help=f"(default: {f.default})",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    model = TinyLMConfig(**{f.name: args.pop(f"model_{f.name}") for f in fields(TinyLMConfig)})
    cfg = replace(BootstrapConfig(**args), model=model)
    result = run(cfg)
    return 0 if result["final_loss"] < result["initial_loss"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
