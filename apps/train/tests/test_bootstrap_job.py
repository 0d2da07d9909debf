"""The default job (the README's first command) trains, lowers the loss and saves a checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from forge_train.cli import main
from forge_train.stdlib_corpus import load_stdlib_corpus
from forge_train.tiny_lm import TinyLM, TinyLMConfig

SMALL = [
    "--steps",
    "25",
    "--batch-size",
    "8",
    "--seq-len",
    "64",
    "--warmup-steps",
    "5",
    "--eval-batches",
    "2",
    "--model-hidden-size",
    "64",
    "--model-num-heads",
    "4",
    "--model-num-layers",
    "2",
    "--model-intermediate-size",
    "128",
]


@pytest.fixture(autouse=True)
def eager_kernels(monkeypatch):
    """Kernels run as their eager references here: under the root conftest's TRITON_INTERPRET=1
    the Triton interpreter would make a training run minutes long (forge-kernels tests them)."""
    monkeypatch.setenv("FORGE_KERNELS_IMPL", "reference")


def test_default_job_lowers_the_loss_and_saves(tmp_path, capsys):
    assert main([*SMALL, "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "held-out loss:" in out
    config = json.loads((tmp_path / "config.json").read_text())
    model = TinyLM(TinyLMConfig(**config["model"]))
    model.load_state_dict(load_file(tmp_path / "model.safetensors"))
    assert torch.load(tmp_path / "optimizer.pt")["step"] == 25


def test_corpus_is_real_and_deterministic():
    a, b = load_stdlib_corpus(max_bytes=2**20), load_stdlib_corpus(max_bytes=2**20)
    assert torch.equal(a.train, b.train)
    assert b"def " in bytes(a.train[:200_000].tolist())
    x, y = a.sample_batch(batch_size=2, seq_len=16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_bad_model_config_is_explained():
    with pytest.raises(ValueError, match="hidden_size 65 must be divisible by num_heads 4"):
        TinyLMConfig(hidden_size=65, num_heads=4)


@pytest.mark.multiprocess
def test_torchrun_data_parallel_job(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "forge_train",
            *SMALL,
            "--out-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "cpu x 2 | data parallel 2" in result.stdout
    assert (tmp_path / "model.safetensors").exists()
