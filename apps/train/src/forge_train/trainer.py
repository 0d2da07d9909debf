"""The training loop: one process or many under ``torchrun``, every layout forge-parallel offers.

Order of a run: validate the layout against the world size (before any compute), load the
tokenizer and data, build the model (meta device when large), apply LoRA, parallelize
(forge_parallel), materialize, build AdamW + schedule, resume from the newest checkpoint, then
train. Each step: this rank's micro-batches with gradient accumulation (gradient sync only on
the last), a loss normalized by the number of predicted tokens of the whole global batch (so
any data-parallel size and micro-batching gives the single-process gradient), MoE auxiliary
losses added, autocast in bf16/fp16 (fp16 with loss scaling), gradient clipping, a
non-finite guard, the optimizer and LR schedule. SIGTERM saves a checkpoint and stops.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from forge_train.config import ConfigError, RunConfig
from forge_train.data import (
    IGNORE_INDEX,
    build_data,
    build_loader,
    load_run_tokenizer,
    model_inputs,
)
from forge_train.metrics import MetricsLogger, peak_flops
from forge_train.modeling import build_model, export_hf, model_config
from forge_train.optim import LRSchedule, build_optimizer

__all__ = ["NonFiniteError", "TrainResult", "train"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class NonFiniteError(RuntimeError):
    """The loss or gradient norm was NaN/Inf and ``train.nan_policy`` said stop."""


@dataclass
class TrainResult:
    run_dir: Path
    losses: list[float] = field(default_factory=list)
    start_step: int = 0
    steps_done: int = 0
    initial_eval: float | None = None
    final_eval: float | None = None
    stopped: str | None = None
    checkpoint: Path | None = None
    hf_dir: Path | None = None
    tokens_per_s: float | None = None
    skipped_steps: list[int] = field(default_factory=list)


class _Progress:
    """Loop counters saved with the checkpoint."""

    def __init__(self) -> None:
        self.step = 0
        self.tokens = 0
        self.skipped: list[int] = []

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "skipped": list(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.skipped = [int(s) for s in state["skipped"]]


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step (then checkpoint and exit)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _Preemption:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _run_dir(cfg: RunConfig) -> Path:
    if cfg.train.output_dir is not None:
        return Path(cfg.train.output_dir)
    stamp = [datetime.now().strftime("%Y%m%d-%H%M%S")]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(stamp, src=0)
    return Path("runs") / stamp[0]


def _all_reduce(value: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(value, op=op, group=group)
    return value


def _local(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a (replicated) DTensor loss."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def _recompute(cfg: RunConfig):
    if cfg.parallel.recompute == "none":
        return None
    from forge_parallel import RecomputeConfig

    return RecomputeConfig(mode=cfg.parallel.recompute)


class _Trainer:
    def __init__(self, cfg: RunConfig) -> None:
        from forge_core import current_accelerator

        self.cfg = cfg
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.is_main = self.rank == 0
        # The layout must fit the world size before anything is loaded or computed.
        self.degrees = cfg.parallel.resolve(self.world_size)
        if self.world_size > 1 and cfg.parallel.data_parallel is None and self.degrees["tp"] == 1:
            raise ConfigError(
                f"parallel.data_parallel: {self.world_size} processes need a data-parallel mode "
                "(ddp, fsdp, hsdp, zero1, zero2); use parallel=ddp or parallel=fsdp"
            )
        self.accelerator = current_accelerator()
        self.device = self.accelerator.device()
        self.run_dir = _run_dir(cfg)
        self.log = MetricsLogger(
            cfg.logging, self.run_dir if not cfg.train.benchmark else None, enabled=self.is_main
        )

    # -- set-up -----------------------------------------------------------------------------
    def _build(self) -> None:
        import forge_models
        from forge_core import ParallelDims
        from forge_parallel import parallelize

        cfg = self.cfg
        self.tokenizer = load_run_tokenizer(cfg.data, cfg.model.hf_path)
        self.model_config = model_config(cfg.model, self.tokenizer.vocab_size)
        if self.tokenizer.vocab_size > self.model_config.vocab_size:
            raise ConfigError(
                f"model.vocab_size: the tokenizer has {self.tokenizer.vocab_size} tokens but the "
                f"model only {self.model_config.vocab_size}; set data.tokenizer to the model's "
                "own tokenizer folder"
            )
        self.data = build_data(cfg.data, self.tokenizer)
        model, on_meta = build_model(cfg.model, self.model_config, seed=cfg.train.seed)
        self.lora_targets: list[str] = []
        if cfg.lora is not None:
            from forge_train.lora import apply_lora

            self.lora_targets = apply_lora(
                model,
                targets=cfg.lora.targets,
                rank=cfg.lora.rank,
                alpha=cfg.lora.alpha,
                dropout=cfg.lora.dropout,
            )
        if not on_meta:
            model.to(self.device)
        dims = None
        if self.world_size > 1:
            dims = ParallelDims(world_size=self.world_size, **self.degrees)
        plan = None
        if self.degrees["tp"] > 1:
            plan = model.parallel_plan(sequence_parallel=cfg.parallel.sequence_parallel)
        self.parallel = parallelize(
            model,
            dims,
            plan=plan,
            data_parallel=cfg.parallel.data_parallel if dims is not None else None,
            recompute=_recompute(cfg),
            compile=cfg.train.compile,
        )
        self.model = self.parallel.model
        if on_meta:
            torch.manual_seed(cfg.train.seed)
            forge_models.materialize(self.model, self.device)
            from forge_train.lora import LoRALinear

            for m in self.model.modules():
                if isinstance(m, LoRALinear):
                    m.reset_parameters()
        mesh = self.parallel.mesh
        self.dp_group = mesh.group("dp") if mesh is not None else None
        self.dp_rank = mesh.local_rank("dp") if mesh is not None else 0
        self.dp_size = mesh.size("dp") if mesh is not None else 1
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        self.pad_id = pad
        self.loader = build_loader(
            self.data.train,
            cfg.data,
            seed=cfg.train.seed,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            pad_id=pad,
        )
        self.optimizer = build_optimizer(
            self.model,
            cfg.optim,
            device_type=self.device.type,
            build=self.parallel.build_optimizer,
        )
        self.schedule = LRSchedule(self.optimizer, cfg.optim, cfg.train.steps)
        self.scaler = None
        if cfg.train.precision == "fp16":
            self.scaler = torch.amp.GradScaler(self.device.type)
        self.progress = _Progress()
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.n_trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.flops_per_token = forge_models.flops_per_token(
            self.model_config, cfg.data.seq_len, causal=True
        )
        self.peak = peak_flops(cfg.logging, self.device)
        moe = self.model_config.moe
        self.aux_coef = moe.router_aux_loss_coef if moe is not None else 0.0

    def _checkpoints(self):
        from forge_ckpt.training import CheckpointConfig, CheckpointManager

        c = self.cfg.checkpoint
        return CheckpointManager(
            CheckpointConfig(
                directory=self.run_dir / "checkpoints",
                interval=c.interval,
                keep_last_n=c.keep_last_n,
                async_save=c.async_save,
            )
        )

    def _save(self, manager, step: int) -> Path:
        return manager.save(
            step,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.schedule,
            dataloader=self.loader,
            extra={"progress": self.progress},
        )

    # -- one step ---------------------------------------------------------------------------
    def _autocast(self):
        precision = self.cfg.train.precision
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[precision])

    def _forward_sum(self, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(summed cross-entropy, weighted auxiliary loss or None)`` of one micro-batch."""
        if self.degrees["tp"] > 1:
            return self._loss_parallel_sum(kwargs), None
        with self._autocast():
            loss = self.model(**kwargs, loss_reduction="sum")
        stats = getattr(self.model, "moe_stats", None)
        aux = None
        if stats is not None and stats.aux_loss is not None:
            aux = self.aux_coef * stats.aux_loss
            loss = loss - aux  # the model adds it unscaled; it is weighted per micro-batch below
        return loss, aux

    def _loss_parallel_sum(self, kwargs: dict[str, Any]) -> torch.Tensor:
        """Tensor parallel: cross-entropy of the logits (under ``loss_parallel`` when the plan
        shards them by vocabulary); the model's fused loss needs the whole output matrix."""
        import torch.nn.functional as F

        kwargs = dict(kwargs)
        labels = kwargs.pop("labels").reshape(-1)
        targets = torch.full_like(labels, IGNORE_INDEX)
        targets[:-1] = labels[1:]
        with self._autocast():
            logits = self.model(**kwargs)
        with self.parallel.loss_context():
            return F.cross_entropy(
                logits.flatten(0, 1).float(), targets, reduction="sum", ignore_index=IGNORE_INDEX
            )

    def _train_step(self, micro_batches: list[dict[str, torch.Tensor]]):
        inputs = [model_inputs(mb, self.device) for mb in micro_batches]
        local = torch.stack([n for _, n in inputs]).sum().to(self.device, torch.float32)
        global_tokens = _all_reduce(local.clone(), self.dp_group)
        scale = self.dp_size / global_tokens.clamp(min=1)
        ce_total = torch.zeros((), device=self.device)
        last = len(inputs) - 1
        for i, (kwargs, _) in enumerate(inputs):
            sync = contextlib.nullcontext() if i == last else self.parallel.no_sync()
            with sync:
                ce, aux = self._forward_sum(kwargs)
                objective = ce * scale
                if aux is not None:
                    objective = objective + aux / len(inputs)
                with self.parallel.loss_context():
                    if self.scaler is not None:
                        self.scaler.scale(objective).backward()
                    else:
                        objective.backward()
            ce_total += _local(ce.detach()).float()
        loss = _all_reduce(ce_total, self.dp_group) / global_tokens.clamp(min=1)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip()
        return loss, grad_norm, int(global_tokens.item())

    def _clip(self) -> torch.Tensor:
        from forge_parallel import clip_grad_norm_, total_grad_norm

        clip = self.cfg.optim.grad_clip
        if hasattr(self.optimizer, "clip_grad_norm_"):  # ZeRO: the optimizer owns the shards
            return self.optimizer.clip_grad_norm_(clip if clip > 0 else float("inf"))
        params = [p for p in self.model.parameters() if p.grad is not None]
        if clip > 0:
            return clip_grad_norm_(params, clip)
        return total_grad_norm(params)

    def _apply_update(self, step: int, loss: float, grad_norm: float) -> bool:
        """Optimizer step unless the guard refuses it; returns whether it stepped."""
        bad = [
            name
            for name, value in (("loss", loss), ("grad norm", grad_norm))
            if not math.isfinite(value)
        ]
        fp16_overflow = self.scaler is not None and bad == ["grad norm"]
        if bad and not fp16_overflow:
            what = " and ".join(
                f"{n} ({v})" for n, v in (("loss", loss), ("grad norm", grad_norm)) if n in bad
            )
            report = f"step {step}: non-finite {what}"
            if self.cfg.train.nan_policy == "stop":
                raise NonFiniteError(f"{report}; stopping (train.nan_policy=stop)")
            self.progress.skipped.append(step)
            self.log.message(f"{report}; update skipped (train.nan_policy=skip)")
            if len(self.progress.skipped) > self.cfg.train.max_nan_skips:
                raise NonFiniteError(
                    f"{report}: {len(self.progress.skipped)} steps skipped (at "
                    f"{self.progress.skipped}), more than train.max_nan_skips="
                    f"{self.cfg.train.max_nan_skips}; lower optim.lr or use precision=bf16/fp32"
                )
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()
            return False
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step itself on an fp16 overflow
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    # -- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss per predicted token over ``train.eval_batches`` fixed held-out steps."""
        dataset = self.data.val if self.data.val is not None else self.data.train
        if self.cfg.train.eval_batches == 0:
            return None
        loader = build_loader(
            dataset,
            self.cfg.data,
            seed=self.cfg.train.seed + 1,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            pad_id=self.pad_id,
            shuffle=False,
        )
        self.model.eval()
        total = torch.zeros(2, device=self.device)
        for _ in range(self.cfg.train.eval_batches):
            for mb in next(loader):
                kwargs, n = model_inputs(mb, self.device)
                ce, _ = self._forward_sum(kwargs)
                total += torch.stack([_local(ce).float(), n.to(self.device, torch.float32)])
        self.model.train()
        total = _all_reduce(total, self.dp_group)
        return float(total[0] / total[1].clamp(min=1))

    # -- the run ----------------------------------------------------------------------------
    def _describe(self) -> None:
        cfg = self.cfg
        layout = ", ".join(f"{k}={v}" for k, v in self.degrees.items() if v > 1) or "one process"
        mode = self.parallel.data_parallel or "-"
        self.log.message(
            f"forge-train | {self.accelerator.name} x {self.world_size} ({layout}; data parallel "
            f"{mode}) | {self.n_params / 1e6:.2f}M parameters"
            + (f", {self.n_trainable / 1e6:.3f}M trainable (LoRA)" if cfg.lora else "")
            + f" | {cfg.train.precision}"
        )
        self.log.message(
            f"data: {self.data.description}; {cfg.data.global_batch_rows} rows x "
            f"{cfg.data.seq_len} tokens per step | run folder {self.run_dir}"
        )

    def run(self) -> TrainResult:
        cfg = self.cfg
        self._build()
        self._describe()
        result = TrainResult(run_dir=self.run_dir)
        manager = None if cfg.train.benchmark else self._checkpoints()
        if manager is not None and cfg.checkpoint.resume:
            loaded = manager.load_latest(
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.schedule,
                dataloader=self.loader,
                extra={"progress": self.progress},
            )
            if loaded is not None:
                self.log.message(f"resumed from {loaded.path} (step {loaded.step})")
        result.start_step = self.progress.step
        if not cfg.train.benchmark:
            result.initial_eval = self.evaluate()
            if result.initial_eval is not None:
                self.log.message(f"held-out loss before training: {result.initial_eval:.4f}")
        saved_at = -1
        started = time.perf_counter()
        window_start, window_tokens = started, 0
        bench_start, bench_tokens = None, 0
        with _Preemption() as preemption:
            while self.progress.step < cfg.train.steps:
                step = self.progress.step
                if cfg.train.benchmark and step - result.start_step == cfg.train.benchmark_warmup:
                    self.accelerator.synchronize()
                    bench_start, bench_tokens = time.perf_counter(), 0
                loss_t, norm_t, tokens = self._train_step(next(self.loader))
                loss, grad_norm = float(loss_t), float(norm_t)
                self._apply_update(step, loss, grad_norm)
                self.schedule.step()
                self.progress.step += 1
                self.progress.tokens += tokens
                result.losses.append(loss)
                window_tokens += tokens
                bench_tokens += tokens
                done = self.progress.step
                if done % cfg.logging.log_every == 0 or done == cfg.train.steps:
                    now = time.perf_counter()
                    self._log_row(
                        done, loss, grad_norm, window_tokens / max(now - window_start, 1e-9)
                    )
                    window_start, window_tokens = now, 0
                if manager is not None and manager.should_save(done):
                    result.checkpoint, saved_at = self._save(manager, done), done
                if (
                    cfg.train.eval_every
                    and done % cfg.train.eval_every == 0
                    and done < cfg.train.steps
                ):
                    value = self.evaluate()
                    self.log.message(f"step {done}: held-out loss {value:.4f}")
                    self.log.log({"step": done, "eval_loss": value}, show=False)
                if self._should_stop(preemption, started):
                    result.stopped = "SIGTERM" if preemption.requested else "max_minutes"
                    break
        result.steps_done = self.progress.step
        result.skipped_steps = list(self.progress.skipped)
        if cfg.train.benchmark:
            self._benchmark_summary(result, bench_start, bench_tokens)
            return result
        if saved_at != self.progress.step and (cfg.checkpoint.save_final or result.stopped):
            result.checkpoint = self._save(manager, self.progress.step)
        manager.close()
        if result.stopped == "SIGTERM":
            self.log.message(
                f"SIGTERM: saved {result.checkpoint} at step {self.progress.step}; exiting"
            )
            return result
        result.final_eval = self.evaluate()
        if result.final_eval is not None and result.initial_eval is not None:
            self.log.message(
                f"held-out loss: {result.initial_eval:.4f} -> {result.final_eval:.4f} after "
                f"{self.progress.step} steps"
            )
            self.log.log({"step": self.progress.step, "eval_loss": result.final_eval}, show=False)
        if cfg.checkpoint.export_hf:
            dtype = (
                getattr(torch, cfg.checkpoint.export_dtype) if cfg.checkpoint.export_dtype else None
            )
            result.hf_dir = export_hf(
                self.model,
                self.model_config,
                self.run_dir / "hf",
                tokenizer=self.tokenizer,
                lora=cfg.lora,
                dtype=dtype,
                is_main=self.is_main,
            )
            if result.hf_dir is not None:
                self.log.message(
                    f"saved checkpoint {result.checkpoint} and HF export {result.hf_dir}"
                )
        return result

    def _should_stop(self, preemption: _Preemption, started: float) -> bool:
        flags = torch.tensor(
            [
                float(preemption.requested),
                float(
                    self.cfg.train.max_minutes is not None
                    and time.perf_counter() - started > 60 * self.cfg.train.max_minutes
                ),
            ]
        )
        if dist.is_initialized() and self.world_size > 1:
            flags = flags.to(self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            preemption.requested = bool(flags[0])
        return bool(flags.max())

    def _log_row(self, step: int, loss: float, grad_norm: float, tokens_per_s: float) -> None:
        mfu = None
        if self.peak is not None:
            mfu = tokens_per_s * self.flops_per_token / (self.world_size * self.peak)
        memory = self.accelerator.memory_stats()["peak_allocated"] / 2**30
        row = {
            "step": step,
            "loss": loss,
            "lr": self.schedule.config.lr * self.schedule.factor(step - 1),
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "tokens": self.progress.tokens,
            "mfu": mfu,
            "memory_gb": memory,
        }
        self.log.log(row, show=True)

    def _benchmark_summary(self, result: TrainResult, start: float | None, tokens: int) -> None:
        self.accelerator.synchronize()
        measured = self.progress.step - result.start_step - self.cfg.train.benchmark_warmup
        elapsed = time.perf_counter() - (start or time.perf_counter())
        tps = tokens / max(elapsed, 1e-9)
        result.tokens_per_s = tps
        mfu = (
            f"{100 * tps * self.flops_per_token / (self.world_size * self.peak):.1f}%"
            if self.peak
            else "n/a"
        )
        memory = self.accelerator.memory_stats()["peak_allocated"] / 2**30
        self.log.message(
            f"benchmark | {self.n_params / 1e6:.1f}M params | {self.accelerator.name} x "
            f"{self.world_size} | {self.cfg.train.precision} | {measured} steps | "
            f"{1000 * elapsed / max(measured, 1):.1f} ms/step | {tps:,.0f} tokens/s | MFU {mfu} | "
            f"peak memory {memory:.2f} GB"
        )

    def close(self) -> None:
        self.log.close()


def train(cfg: RunConfig) -> TrainResult:
    """Run ``cfg`` in this process (under ``torchrun``: as one rank of the job).

    Initializes ``torch.distributed`` (gloo on CPU, nccl on CUDA) unless the caller already
    did, and shuts it down again only in that case.
    """
    from forge_core import init_distributed, shutdown_distributed

    owns_group = not dist.is_initialized()
    if owns_group:
        init_distributed()
    trainer = None
    finished = False
    try:
        trainer = _Trainer(cfg)
        result = trainer.run()
        finished = True
        return result
    finally:
        if trainer is not None:
            trainer.close()
        if owns_group:
            shutdown_distributed(barrier=finished)  # no barrier the other ranks may never reach
