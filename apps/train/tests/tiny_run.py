"""Shared helpers of forge-train's tests: overrides for a tiny, fast run."""

from __future__ import annotations

import json
from pathlib import Path

from forge_kernels.registry import default_implementations, reference_implementations
from forge_train.compose import compose_run_config
from forge_train.trainer import train

#: A ~0.6M-parameter Llama (plus the 8192-token embedding) ...
TINY_MODEL = [
    "model.config.hidden_size=32",
    "model.config.intermediate_size=64",
    "model.config.num_layers=2",
    "model.config.num_heads=4",
    "model.config.num_kv_heads=2",
]
#: ... on a few stdlib files, with quick settings for any model.
TINY_RUN = [
    "data.stdlib_files=24",
    "data.stdlib_val_files=4",
    "data.seq_len=64",
    "data.global_batch_rows=4",
    "data.micro_batch_rows=2",
    "optim.warmup_steps=2",
    "optim.lr=1e-2",
    "train.eval_batches=2",
    "logging.progress=plain",
    "logging.tensorboard=false",
    "logging.log_every=5",
]
TINY = TINY_MODEL + TINY_RUN
#: Two steps of 2 micro-batches per data-parallel rank (4 ranks: dp 2 beside pp, tp or cp 2),
#: nothing evaluated or saved: the layout comparisons' runs.
TWO_STEPS = [
    "data.global_batch_rows=8",
    "data.micro_batch_rows=2",
    "train.steps=2",
    "train.eval_batches=0",
    "checkpoint.export_hf=false",
    "checkpoint.interval=0",
    "checkpoint.save_final=false",
]


def tiny_config(output_dir: str | Path, *overrides: str):
    return compose_run_config([*TINY, f"train.output_dir={output_dir}", *overrides])


def run_losses(output_dir: str, *overrides: str) -> list[float]:
    """Losses of a tiny run (also a worker-pool job: every rank runs it)."""
    return train_losses(*TINY, f"train.output_dir={output_dir}", *overrides)


def train_losses(*overrides: str) -> list[float]:
    """Losses of the run composed from ``overrides`` alone, on forge-kernels' eager references
    (also a worker-pool job)."""
    with reference_kernels():
        return train(compose_run_config(list(overrides))).losses


def train_losses_and_norms(*overrides: str, fused: bool = False) -> list[list[float]]:
    """Per-step ``[loss, gradient norm]`` of the run composed from ``overrides`` (rank 0's
    metrics.jsonl; other ranks of a pool job return ``[]``). Gradient norms catch a wrong
    gradient that Adam's normalized update hides from the losses for a few steps.
    ``fused``: with forge-kernels' Triton kernels (interpreted on a CPU, slow), not their eager
    references."""
    import json

    with fused_kernels() if fused else reference_kernels():
        result = train(compose_run_config([*overrides, "logging.log_every=1"]))
    path = Path(result.run_dir) / "metrics.jsonl"
    if not path.exists():  # only rank 0 writes metrics
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [[r["loss"], r["grad_norm"]] for r in rows if "grad_norm" in r]


#: forge-kernels' eager references instead of its Triton kernels: without a GPU the suite runs
#: Triton under its interpreter, which took ~90% of a tiny training step (the fused
#: cross-entropy alone 65%); the kernels are tested against the references in their own suite.
reference_kernels = reference_implementations


#: forge-kernels' own dispatch (the Triton kernels) inside, also within a test that runs under
#: :data:`reference_kernels`.
fused_kernels = default_implementations


def chat_file(path: Path, n: int = 40) -> Path:
    """A jsonl file of ``n`` two-turn chats (``{"messages": [...]}``) for SFT runs."""
    with open(path, "w") as f:
        for i in range(n):
            messages = [
                {"role": "user", "content": f"What is {i} plus {i}? Answer briefly please."},
                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path
