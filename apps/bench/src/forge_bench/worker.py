"""One implementation's measurement, run inside its own process (see :mod:`forge_bench.isolate`).

The process loads the model from the shared Hugging Face folder (so every contender starts from
the same weights), applies its options (recompute, FP8, Liger-Kernel), then runs ``warmup`` and
``steps`` training steps: forward with labels (next-token loss), backward, ``torch.optim.AdamW``
step, gradients set to ``None``. Throughput is the timed steps' tokens over their wall time
(CUDA synchronized); peak memory is ``torch.cuda.max_memory_allocated`` from the first step on
(weights, gradients, optimizer state, activations) on CUDA. On CPU it is how far the process's
resident set rose above where it started (:class:`RssPeak`): the job's process is forked from a
server that already holds torch and the peers (hundreds of MB), and its plain peak resident set
(``ru_maxrss``) starts from that, so every small job showed the same figure.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import forge_kernels
import forge_models
import forge_parallel
from forge_bench.data import packed_batch
from forge_bench.plan import Impl
from forge_models import TransformerConfig

__all__ = ["Job", "RssPeak", "run_job"]

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True, kw_only=True)
class Job:
    """Everything a child process needs (picklable)."""

    impl: Impl
    hf_dir: str
    moe: bool
    rows: int
    seq: int
    vocab_size: int
    device: str
    dtype: str
    warmup: int
    steps: int
    lr: float = 1e-5
    #: The case's architecture: the peers that build their own model (torchtitan, Megatron-Core)
    #: build it from this and load the shared weights into it.
    config: TransformerConfig | None = None


def _forge(job: Job, device: torch.device) -> tuple[torch.nn.Module, Callable, list[str]]:
    impl, notes = job.impl, []
    model = forge_models.from_pretrained(job.hf_dir, dtype=DTYPES[job.dtype], device=device)
    if impl.recompute:
        blocks = [(f"layers.{i}", block) for i, block in enumerate(model.layers)]
        forge_parallel.apply_recompute(blocks, forge_parallel.RecomputeConfig(mode="full"))
        notes.append("full recompute per block")
    if impl.fp8_recipe:
        forge_kernels.convert_to_fp8(model, recipe=impl.fp8_recipe, backend=impl.fp8_backend)
        converted = sum(isinstance(m, forge_kernels.Fp8Linear) for m in model.modules())
        if converted == 0:
            raise ValueError(f"no linear layer is eligible for FP8 recipe {impl.fp8_recipe!r}")
        notes.append(f"{converted} linears in FP8")
    inputs = packed_batch(rows=job.rows, seq=job.seq, vocab_size=job.vocab_size).forge_inputs(
        device
    )
    extra = {"output_router_logits": False} if job.moe else {}
    notes.append("packed (cu_seqlens)")

    def step() -> torch.Tensor:
        return model(**inputs, **extra)

    return model, step, notes


def transformers_packs_with_sdpa() -> bool:
    """Whether this transformers builds a block-diagonal mask from restarting ``position_ids``
    for SDPA (``masking_utils.find_packed_sequence_indices``, transformers >= 4.56)."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return False
    return True


def _transformers(job: Job, device: torch.device) -> tuple[torch.nn.Module, Callable, list[str]]:
    impl, notes = job.impl, []
    if impl.liger:
        from liger_kernel.transformers import AutoLigerKernelForCausalLM as Auto
    else:
        from transformers import AutoModelForCausalLM as Auto
    model = Auto.from_pretrained(job.hf_dir, dtype=DTYPES[job.dtype], attn_implementation="sdpa")
    model.to(device)
    if impl.recompute:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        notes.append("gradient checkpointing per layer")
    packed = transformers_packs_with_sdpa()
    batch = packed_batch(rows=job.rows, seq=job.seq, vocab_size=job.vocab_size)
    inputs = batch.hf_inputs(device, packed=packed)
    # No KV cache in training; with one, transformers also stops treating the rows as packed.
    extra = {"use_cache": False, **({"output_router_logits": False} if job.moe else {})}
    notes.append(
        "packed (position_ids -> block-diagonal SDPA mask)"
        if packed
        else "unpacked at the same token count: this transformers has no packed SDPA path"
    )

    def step() -> torch.Tensor:
        return model(**inputs, **extra).loss

    return model, step, notes


def _torchtitan(job: Job, device: torch.device) -> tuple[torch.nn.Module, Callable, list[str]]:
    from forge_bench.titan import build_torchtitan

    return build_torchtitan(job, device, dtype=DTYPES[job.dtype])


def _megatron(job: Job, device: torch.device) -> tuple[torch.nn.Module, Callable, list[str]]:
    from forge_bench.megatron import build_megatron

    return build_megatron(job, device, dtype=DTYPES[job.dtype])


#: ``Impl.runner`` -> the function that builds the model and its step.
BUILDERS = {
    "forge": _forge,
    "transformers": _transformers,
    "torchtitan": _torchtitan,
    "megatron-core": _megatron,
}


class RssPeak:
    """The peak resident memory a process gains from now on (Linux; elsewhere unavailable).

    Resets the process's resident-set high-water mark (``5`` written to ``/proc/self/clear_refs``,
    Linux >= 4.0) and notes the resident set at that moment; :meth:`gained` is the high-water
    mark (``VmHWM``) since, less that start: what the job added (weights, gradients, optimizer
    state, activations, allocator slack), not the modules the fork server had imported. Without
    the reset the high-water mark would be the inherited one (the server's, or an earlier
    allocation's), so :meth:`gained` is ``None`` where the reset is unavailable.
    """

    def __init__(self, proc: Path = Path("/proc/self")) -> None:
        self.proc = proc
        try:
            (proc / "clear_refs").write_text("5")
            self.start: int | None = self._status_bytes("VmRSS")
        except OSError:  # not Linux, or /proc not writable: no honest figure
            self.start = None

    def _status_bytes(self, key: str) -> int:
        for line in (self.proc / "status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0]) * 1024  # "VmHWM:   123456 kB"
        raise OSError(f"no {key} in {self.proc / 'status'}")

    def gained(self) -> int | None:
        """Bytes the resident set rose above its start at its highest, or ``None``."""
        if self.start is None:
            return None
        try:
            return max(0, self._status_bytes("VmHWM") - self.start)
        except OSError:
            return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_job(job: Job) -> dict:
    """Build ``job.impl``, train ``warmup + steps`` steps; returns the measured figures."""
    device = torch.device(job.device)
    if device.type == "cuda":  # an explicit index: torch.cuda's memory calls need one
        device = torch.device(
            "cuda", torch.cuda.current_device() if device.index is None else device.index
        )
        torch.cuda.set_device(device)
    rss = RssPeak() if device.type != "cuda" else None  # before the model: weights count
    torch.manual_seed(0)
    if job.impl.runner not in BUILDERS:
        raise ValueError(f"unknown runner {job.impl.runner!r}; known: {', '.join(BUILDERS)}")
    model, step, notes = BUILDERS[job.impl.runner](job, device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=job.lr, fused=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, start = [], 0.0
    for i in range(job.warmup + job.steps):
        if i == job.warmup:
            _sync(device)
            start = time.perf_counter()
        loss = step()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    _sync(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if rss is None else rss.gained()
    values = [float(v) for v in losses]
    return {
        "tokens_per_s": job.rows * job.seq * job.steps / elapsed,
        "peak_bytes": peak,
        "loss_first": values[0],
        "loss_last": values[-1],
        "notes": notes,
    }
