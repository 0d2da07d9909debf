"""``--device cuda:N`` reaches every part of a run, and the CPU peak-memory column is each job's
own. No GPU needed: the CUDA queries and the subprocess launcher are faked, and the CPU memory
figure is measured on a small job in this process."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from forge_bench import cli, kernels, worker
from forge_bench.kernels import cuda_visible_devices, start_script
from forge_bench.plan import Impl
from forge_bench.worker import Job, RssPeak, run_job

GPU_NAMES = {0: "NVIDIA A100-SXM4-80GB", 1: "NVIDIA H100 80GB HBM3"}  # peaks 312 and 989


@pytest.fixture
def fake_two_gpus(monkeypatch):
    """This process sees two GPUs (0: an A100, 1: an H100); Popen records what a kernel script
    would be started with (command, environment) and finishes at once."""
    launched: list[tuple[list[str], dict[str, str]]] = []

    class FakePopen:
        def __init__(self, cmd, *, env, **_):
            launched.append((list(cmd), dict(env)))
            self.returncode = 0

        def communicate(self, timeout=None):
            return "bench table\n", ""

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(GPU_NAMES))
    monkeypatch.setattr(
        torch.cuda, "get_device_name", lambda d=None: GPU_NAMES[torch.device(d).index or 0]
    )
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the test session may set it
    return launched


def test_cuda_visible_devices_counts_within_what_this_process_sees():
    assert cuda_visible_devices(1, None) == "1"
    assert cuda_visible_devices(1, "4,6") == "6"
    assert cuda_visible_devices(0, "GPU-aa11, GPU-bb22") == "GPU-aa11"
    with pytest.raises(ValueError, match=r"cuda:2.*'4,6' makes 2 GPU\(s\) visible"):
        cuda_visible_devices(2, "4,6")


@pytest.mark.parametrize(("inherited", "expected"), [(None, "1"), ("4,6", "6")])
def test_kernel_scripts_run_on_the_chosen_gpu(fake_two_gpus, monkeypatch, capsys, inherited,
                                              expected):  # fmt: skip
    if inherited is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", inherited)
    code = cli.main(["--workloads", "kernels", "--device", "cuda:1", "--start-method", "spawn",
                     "--kernel-scripts", "bench_fused_linear_cross_entropy"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    [(cmd, env)] = fake_two_gpus
    assert cmd[1].endswith("bench_fused_linear_cross_entropy.py")
    assert cmd[2:] == []  # the script's CUDA defaults, on the one GPU it sees
    assert env["CUDA_VISIBLE_DEVICES"] == expected
    assert "TRITON_INTERPRET" not in env
    # The header names GPU 1 and takes its peak; the kernel rows say which device.
    assert "NVIDIA H100 80GB HBM3" in out
    assert "peak TFLOP/s 989.0" in out
    assert "bfloat16 on cuda:1" in out
    assert "kernels   cuda:1" in out


def test_a_device_this_process_does_not_see_is_refused(fake_two_gpus):
    with pytest.raises(ValueError, match=r"cuda:2, but this process sees 2 CUDA device\(s\)"):
        cli.main(["--workloads", "kernels", "--device", "cuda:2", "--start-method", "spawn"])
    assert fake_two_gpus == []


def test_cpu_kernel_scripts_keep_the_visible_gpus(fake_two_gpus, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    script = kernels.scripts_dir() / "bench_fused_linear_cross_entropy.py"
    start_script(Path(script), device="cpu")
    [(cmd, env)] = fake_two_gpus
    assert cmd[2:4] == ["--device", "cpu"]
    assert env["TRITON_INTERPRET"] == "1"
    assert env["CUDA_VISIBLE_DEVICES"] == "3"


# -- CPU peak memory ----------------------------------------------------------------------------


def _raise_high_water_mark(nbytes: int) -> None:
    """Touch ``nbytes`` and free them: the process's peak resident set stays that high, as a
    forked job's starts at the fork server's."""
    block = torch.ones(nbytes // 4)
    del block


def test_rss_peak_counts_only_what_comes_after_it(tmp_path):
    _raise_high_water_mark(256 * 2**20)
    peak = RssPeak()
    assert peak.gained() is not None
    assert peak.gained() < 64 * 2**20
    block = torch.ones(128 * 2**20 // 4)
    gained = peak.gained()
    del block
    assert 120 * 2**20 < gained < 256 * 2**20, gained
    assert RssPeak(proc=tmp_path / "no-proc").gained() is None  # not Linux: no figure


def _linear_builder(job, device):
    """A 16 MiB linear layer: weights + gradients + AdamW's two moments come to 64 MiB."""
    model = torch.nn.Linear(2048, 2048, bias=False, device=device)
    x = torch.randn(job.rows, 2048, device=device)

    def step() -> torch.Tensor:
        return model(x).square().mean()

    return model, step, []


def test_a_cpu_job_reports_its_own_peak_not_the_process_floor(monkeypatch):
    monkeypatch.setitem(worker.BUILDERS, "forge", _linear_builder)
    _raise_high_water_mark(512 * 2**20)
    job = Job(impl=Impl(name="forge", runner="forge"), hf_dir="-", moe=False, rows=4, seq=1,
              vocab_size=1, device="cpu", dtype="float32", warmup=0, steps=2)  # fmt: skip
    peak = run_job(job)["peak_bytes"]
    # The job's 64 MiB (and some allocator slack), not the 512 MiB this process had already
    # touched, which a forked job inherits as its starting ru_maxrss.
    assert 60 * 2**20 < peak < 256 * 2**20, peak / 2**20
