"""The training loop of one rank: set-up, resume, the steps, evaluation, checkpoints, export.

Order of a run: validate the layout against the world size (before any compute), build the
parts (:mod:`forge_train.components`), resume from the newest checkpoint, evaluate, then step
(:mod:`forge_train.step`) with metrics every ``logging.log_every`` steps, checkpoints every
``checkpoint.interval``, held-out evaluation every ``train.eval_every`` and an optional profiler
window; SIGTERM or ``train.max_minutes`` stop all ranks at the same step with a checkpoint
(:mod:`forge_train.preemption`). At the end: a final checkpoint, evaluation and the Hugging
Face export.

Each log row's ``loss`` is the next-token cross-entropy per predicted token (with multi-token
prediction, each depth's ``mtp_<k>_loss`` beside it); ``tokens`` counts the predicted (loss)
tokens trained on, while ``tokens_per_s`` and ``mfu`` count the input tokens processed (every
non-padding position of the batch, as the model runs on all of them), over the time of the
steps only (held-out evaluation and checkpoint saves are left out); ``flops`` and ``mfu`` add a
vision-language model's encoder and projector FLOPs of those batches
(:mod:`forge_train.throughput`). Without a validation set
the "held-out" evaluation reads training batches: its rows say ``eval_split: "train"``.
A loader that skips bad data (``data.kind=vlm_shards``) adds ``bad_samples`` to each row (its
count summed over the data-parallel ranks) and the run log says by reason what was skipped
whenever the count grows.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from forge_train.components import Components, build_components
from forge_train.config import ConfigError, RunConfig
from forge_train.distributed import all_reduce
from forge_train.evaluation import (
    close_evaluation_data,
    evaluation_data,
    held_out_loss,
    input_tokens,
)
from forge_train.expert_balance import ExpertBiasBalancer
from forge_train.guards import NonFiniteGuard
from forge_train.metrics import MetricsLogger
from forge_train.modeling import export_hf
from forge_train.preemption import Preemption, should_stop
from forge_train.profiling import ProfileWindow
from forge_train.progress import Progress, TrainResult
from forge_train.rundir import prepare_run_dir, resume_mismatch
from forge_train.sharded_routing import sharded_routing
from forge_train.step import StepRunner
from forge_train.throughput import benchmark_line, peak_flops, peak_memory_gb, window_figures
from forge_train.vlm_model import language_model_config, language_model_of

__all__ = ["Trainer"]


class Trainer:
    """One rank of a run of ``cfg``: :meth:`run`, then :meth:`close`."""

    def __init__(self, cfg: RunConfig) -> None:
        from forge_core import current_accelerator

        self.cfg = cfg
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.is_main = self.rank == 0
        # The layout must fit the world size before anything is loaded or computed.
        self.degrees = cfg.parallel.resolve(self.world_size)
        dp = self.degrees["dp_replicate"] * self.degrees["dp_shard"]
        if dp > 1 and cfg.parallel.data_parallel is None:
            raise ConfigError(
                f"parallel.data_parallel: {dp} data-parallel ranks need a data-parallel mode "
                "(ddp, fsdp, hsdp, zero1, zero2); use parallel=ddp or parallel=fsdp"
            )
        self.accelerator = current_accelerator()
        self.device = self.accelerator.device()
        # Before anything is written: the folder is this run's, or the run stops here.
        self.run_dir, folder_note = prepare_run_dir(cfg)
        self.log = MetricsLogger(
            cfg.logging,
            self.run_dir if not cfg.train.benchmark else None,
            enabled=self.is_main,
            run_config=cfg.to_dict(),
        )
        if folder_note is not None:
            self.log.message(folder_note)
        self.progress = Progress()
        self.peak = peak_flops(cfg.logging, self.device)
        self._bad_reported = 0  # bad-data count the run log last reported
        self._eval_data = None  # what every evaluation reads (evaluation_data), kept for the run

    # -- set-up -----------------------------------------------------------------------------
    def _build(self) -> None:
        cfg = self.cfg
        self.parts: Components = build_components(
            cfg, world_size=self.world_size, degrees=self.degrees, device=self.device
        )
        parts = self.parts
        # A VLM's MoE layers are its language model's (statistics, expert biases).
        text_config = language_model_config(parts.model_config)
        moe = getattr(text_config, "moe", None)
        balancer = None
        routing = sharded_routing(cfg, parts.model_config, parts.parallel)
        token_group = routing.group if routing is not None else None
        if parts.pipeline is not None and parts.pipeline.moe is not None:
            parts.pipeline.moe.routing = routing  # the last stage sums the switch loss's sums
        if ExpertBiasBalancer.wanted(text_config) and parts.pipeline is not None:
            from forge_train.pipeline_moe import PipelineExpertBalancer

            balancer = PipelineExpertBalancer(
                parts.pipeline.moe, parts.model, parts.dp_group, token_group
            )
        elif ExpertBiasBalancer.wanted(text_config):
            balancer = ExpertBiasBalancer(
                language_model_of(parts.model), parts.dp_group, token_group
            )
        runner_class, extra = StepRunner, {"routing": routing}
        # A vision-language model's language model is one part of a heterogeneous layout.
        text_parallel = getattr(parts.parallel, "parts", {}).get("language_model", parts.parallel)
        if getattr(text_parallel, "context_parallel_handle", None) is not None:
            from forge_train.context_parallel import ContextParallelInputs

            extra["context"] = ContextParallelInputs(text_parallel)
        if parts.pipeline is not None:
            from forge_train.pipeline_step import PipelineStepRunner

            runner_class = PipelineStepRunner
            extra = {"pipeline": parts.pipeline, "context": extra.get("context")}
        self.runner = runner_class(
            **extra,
            model=parts.model,
            parallel=parts.parallel,
            optimizer=parts.optimizer,
            device=self.device,
            precision=cfg.train.precision,
            grad_clip=cfg.optim.grad_clip,
            aux_coef=moe.router_aux_loss_coef if moe is not None else 0.0,
            dp_group=parts.dp_group,
            dp_size=parts.dp_size,
            tensor_parallel=self.degrees["tp"] > 1,
            guard=NonFiniteGuard(
                policy=cfg.train.nan_policy,
                max_skips=cfg.train.max_nan_skips,
                skipped=self.progress.skipped,
                report=self.log.message,
                loss_scaling=cfg.train.precision == "fp16",
            ),
            balancer=balancer,
        )

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

    def _stateful(self) -> dict:
        p = self.parts
        return {
            "model": p.model,
            # A pipeline stage whose parameters are all frozen has no optimizer state; a flat
            # (ZeRO) optimizer still joins the other stages' collective save and load.
            "optimizer": p.optimizer
            if any(g["params"] for g in p.optimizer.param_groups)
            or getattr(p.optimizer, "steps_flat_slices", False)
            else None,
            "scheduler": p.schedule,
            "dataloader": p.loader,
            # fp16's loss scale and its growth count, so a resumed run scales as the
            # uninterrupted one (the same on every rank: the overflow flags are all-reduced).
            "extra": {"progress": self.progress}
            | ({"loss_scaler": self.runner.scaler} if self.runner.scaler is not None else {}),
        }

    def _resume(self, manager):
        """Load the newest checkpoint, if any. fp16's loss scale exists only in checkpoints of
        fp16 runs: an fp16 run resumed from a bf16/fp32 checkpoint starts its scaler fresh (as
        a new fp16 run does), a bf16/fp32 run resumed from an fp16 checkpoint leaves the saved
        scale unread; the log says which. A checkpoint this run cannot resume (another model,
        optimizer or data set-up: a forge-ckpt ``CheckpointMismatchError`` or a loader's
        ``ValueError``) stops the run with a ``ConfigError`` naming the folder, the step and
        what differs, before anything in the folder is written."""
        stateful = self._stateful()
        extra = dict(stateful.pop("extra"))
        scaler = extra.pop("loss_scaler", None)
        try:
            loaded = manager.load_latest(
                **stateful,
                extra=extra,
                optional_extra={"loss_scaler": scaler} if scaler is not None else None,
            )
        except ValueError as exc:  # CheckpointMismatchError and ConfigError included
            newest = manager.latest()
            raise resume_mismatch(
                self.run_dir,
                newest.step if newest is not None else None,
                newest.path if newest is not None else None,
                exc,
            ) from exc
        if loaded is not None and "loss_scaler" in loaded.not_in_checkpoint:
            self.log.message(
                f"{loaded.path} holds no fp16 loss scale (written in another precision): the "
                f"loss scaler starts fresh at {scaler.get_scale():g}"
            )
        elif loaded is not None and "loss_scaler" in loaded.unread:
            self.log.message(
                f"{loaded.path} holds an fp16 loss scale; this run is "
                f"{self.cfg.train.precision} (no loss scaling): the scale is not used"
            )
        return loaded

    def _save(self, manager, step: int) -> Path:
        return manager.save(step, **self._stateful())

    @property
    def eval_split(self) -> str:
        """What evaluation reads: ``val`` (the validation set) or ``train`` (none given: the
        first training batches, which the model trains on, so not a held-out figure)."""
        return "val" if self.parts.data.val is not None else "train"

    @property
    def _eval_name(self) -> str:
        return "held-out loss" if self.eval_split == "val" else "loss on training batches"

    def _log_eval(self, step: int, value: float) -> None:
        self.log.log({"step": step, "eval_loss": value, "eval_split": self.eval_split}, show=False)

    def evaluate(self) -> float | None:
        """Mean next-token cross-entropy per predicted token over ``train.eval_batches`` fixed
        steps of the validation set (of the training set without one: :attr:`eval_split`)."""
        p, cfg = self.parts, self.cfg
        if self._eval_data is None:  # one set of decode workers for all the evaluations
            split = p.data.val if p.data.val is not None else p.data.train
            self._eval_data = evaluation_data(split)
        return held_out_loss(
            self.runner,
            self._eval_data,
            cfg.data,
            batches=cfg.train.eval_batches,
            seed=cfg.train.seed + 1,
            dp_rank=p.dp_rank,
            dp_size=p.dp_size,
            pad_id=p.pad_id,
        )

    def _describe(self) -> None:
        cfg, p = self.cfg, self.parts
        layout = ", ".join(f"{k}={v}" for k, v in self.degrees.items() if v > 1) or "one process"
        mode = (cfg.parallel.data_parallel if self.world_size > 1 else None) or "-"
        self.log.message(
            f"forge-train | {self.accelerator.name} x {self.world_size} ({layout}; data parallel "
            f"{mode}) | {p.n_params / 1e6:.2f}M parameters"
            + (f", {p.n_trainable / 1e6:.3f}M trainable (LoRA)" if cfg.lora else "")
            + f" | {cfg.train.precision}"
            + (f" + fp8 {cfg.train.fp8} ({len(p.fp8_layers)} linears)" if p.fp8_layers else "")
        )
        self.log.message(
            f"data: {p.data.description}; {cfg.data.global_batch_rows} rows x "
            f"{cfg.data.seq_len} tokens per step | run folder {self.run_dir}"
        )
        self._warnings()

    def _warnings(self) -> None:
        """Set-ups that run but likely not as meant: one line each at the start."""
        cfg = self.cfg
        if not cfg.train.benchmark and cfg.train.eval_batches and self.eval_split == "train":
            how = {
                "stdlib": "add one with data.stdlib_val_files > 0",
                "skimage_captions": "the image-caption data has no validation split",
            }.get(cfg.data.kind, "add one with data.val_paths=[...] (held-out files)")
            self.log.message(
                "warning: no validation set: evaluation reads the first training batches, so "
                f"its loss is not held out (logged as eval_split=train); {how}"
            )
        warmup, steps = cfg.optim.warmup_steps, cfg.train.steps
        if warmup >= steps:
            peak = cfg.optim.lr * steps / warmup  # the last step's: (T - 1 + 1) / W
            reached = (
                f"peaks at {peak:.3g} on its last step (step {steps}), below optim.lr="
                f"{cfg.optim.lr:g}"
                if warmup > steps
                else f"reaches optim.lr={cfg.optim.lr:g} only on its last step"
            )
            self.log.message(
                f"warning: optim.warmup_steps={warmup} >= train.steps={steps}: the run ends "
                f"inside the warmup, its learning rate {reached} and never decays; lower "
                "optim.warmup_steps for a full schedule (fine for a smoke run)"
            )
        visual = self.parts.visual_flops
        if visual is not None and visual.unsupported is not None:
            self.log.message(
                f"warning: MFU and flops count the language model only: {visual.unsupported} "
                "(forge_models.vision_flops counts the built-in encoders and projectors)"
            )

    # -- the run ----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg
        self._build()
        self._describe()
        result = TrainResult(run_dir=self.run_dir)
        manager = None if cfg.train.benchmark else self._checkpoints()
        if manager is not None and cfg.checkpoint.resume:
            loaded = self._resume(manager)
            if loaded is not None:
                self.log.message(f"resumed from {loaded.path} (step {loaded.step})")
        result.start_step = self.progress.step
        if not cfg.train.benchmark:
            result.initial_eval = self.evaluate()
            if result.initial_eval is not None:
                self.log.message(f"{self._eval_name} before training: {result.initial_eval:.4f}")
        saved_at = self._steps(result, manager)
        result.steps_done = self.progress.step
        result.skipped_steps = list(self.progress.skipped)
        if cfg.train.benchmark:
            return result
        if saved_at != self.progress.step and (cfg.checkpoint.save_final or result.stopped):
            result.checkpoint = self._save(manager, self.progress.step)
        manager.close()
        if result.stopped == "SIGTERM":
            self.log.message(
                f"SIGTERM: saved {result.checkpoint} at step {self.progress.step}; exiting"
            )
            return result
        self._finish(result)
        return result

    def _steps(self, result: TrainResult, manager) -> int:
        """The steps up to ``train.steps`` (or a stop); returns the step last saved (-1: none)."""
        cfg, p = self.cfg, self.parts
        saved_at = -1
        started = time.perf_counter()
        # Input tokens and (VLM) vision encoder + projector FLOPs of this rank's batches.
        window_start, window_tokens, window_visual = started, 0, 0
        window_wait, window_steps = 0.0, 0  # seconds next(loader) took, steps of the window
        bench_start, bench_tokens, bench_visual = None, 0, 0
        profile = ProfileWindow(
            cfg.logging.profile,
            default_dir=self.run_dir / "profile",
            first_step=self.progress.step + 1,
            rank=self.rank,
            device=self.device,
        )
        with Preemption() as preemption, profile:
            while self.progress.step < cfg.train.steps:
                step = self.progress.step
                if cfg.train.benchmark and step - result.start_step == cfg.train.benchmark_warmup:
                    self.accelerator.synchronize()
                    bench_start, bench_tokens, bench_visual = time.perf_counter(), 0, 0
                waited = time.perf_counter()
                batch = next(p.loader)
                window_wait += time.perf_counter() - waited
                window_steps += 1
                loss, grad_norm, tokens = self.runner.run(step, batch)
                p.schedule.step()
                profile.step()
                self.progress.step += 1
                self.progress.tokens += tokens
                result.losses.append(loss)
                processed = input_tokens(batch)
                visual = p.visual_flops(batch) if p.visual_flops is not None else 0
                window_tokens, window_visual = window_tokens + processed, window_visual + visual
                bench_tokens, bench_visual = bench_tokens + processed, bench_visual + visual
                done = self.progress.step
                if done == result.start_step + 1 and cfg.parallel.recompute == "auto":
                    self._report_recompute()
                if done % cfg.logging.log_every == 0 or done == cfg.train.steps:
                    now = time.perf_counter()
                    processed, visual = self._global_sums(window_tokens, window_visual)
                    self._log_row(
                        done,
                        loss,
                        grad_norm,
                        processed,
                        visual,
                        now - window_start,
                        data_wait=window_wait / window_steps,
                    )
                    window_start, window_tokens, window_visual = now, 0, 0
                    window_wait, window_steps = 0.0, 0
                paused = time.perf_counter()  # saves and evaluations: not in tokens/s
                if manager is not None and manager.should_save(done):
                    result.checkpoint, saved_at = self._save(manager, done), done
                if (
                    cfg.train.eval_every
                    and done % cfg.train.eval_every == 0
                    and done < cfg.train.steps
                ):
                    value = self.evaluate()
                    self.log.message(f"step {done}: {self._eval_name} {value:.4f}")
                    self._log_eval(done, value)
                paused = time.perf_counter() - paused
                window_start += paused
                if bench_start is not None:
                    bench_start += paused
                if should_stop(
                    preemption,
                    started=started,
                    max_minutes=cfg.train.max_minutes,
                    device=self.device,
                ):
                    result.stopped = "SIGTERM" if preemption.requested else "max_minutes"
                    break
        result.profile_traces = list(profile.traces)
        if cfg.train.benchmark:
            self._benchmark_summary(result, bench_start, bench_tokens, bench_visual)
        return saved_at

    def _report_recompute(self) -> None:
        """One line after the first step: what ``parallel.recompute=auto`` chose for the blocks
        (decided on their first forward), as the number of blocks of each choice; under
        pipeline parallelism every stage's (gathered over the pipeline group)."""
        from forge_train.components import recompute_choices

        choices = recompute_choices(self.parts.model)
        if self.parts.pipeline is not None:
            gathered: list = [None] * dist.get_world_size(self.parts.pipeline.group)
            dist.all_gather_object(gathered, choices, group=self.parts.pipeline.group)
            choices = {}
            for stage in gathered:
                for choice, count in stage.items():
                    choices[choice] = choices.get(choice, 0) + count
        listing = "; ".join(f"{n} x {choice}" for choice, n in sorted(choices.items()))
        self.log.message(f"recompute auto (blocks per choice): {listing or 'no blocks'}")

    def _finish(self, result: TrainResult) -> None:
        """Final evaluation and the Hugging Face export."""
        cfg, p = self.cfg, self.parts
        result.final_eval = self.evaluate()
        if result.final_eval is not None and result.initial_eval is not None:
            self.log.message(
                f"{self._eval_name}: {result.initial_eval:.4f} -> {result.final_eval:.4f} after "
                f"{self.progress.step} steps"
            )
            self._log_eval(self.progress.step, result.final_eval)
        if not cfg.checkpoint.export_hf:
            return
        dtype = getattr(torch, cfg.checkpoint.export_dtype) if cfg.checkpoint.export_dtype else None
        result.hf_dir = export_hf(
            p.model,
            p.model_config,
            self.run_dir / "hf",
            tokenizer=p.tokenizer,
            lora=cfg.lora,
            dtype=dtype,
            is_main=self.is_main,
            pipeline=p.pipeline,
            data=cfg.data,
        )
        if result.hf_dir is not None:
            self.log.message(f"saved checkpoint {result.checkpoint} and HF export {result.hf_dir}")

    def _global_sums(self, *local: int) -> list[int]:
        """Counts of the whole global batch (input tokens, visual FLOPs) from this rank's:
        summed over the data-parallel ranks (the other ranks of a data-parallel rank read the
        same batch), in one float64 all-reduce (exact to 2**53)."""
        if self.parts.dp_size == 1:
            return list(local)
        total = torch.tensor([float(n) for n in local], dtype=torch.float64, device=self.device)
        return [int(n) for n in all_reduce(total, self.parts.dp_group).tolist()]

    def _log_row(
        self,
        step: int,
        loss: float,
        grad_norm: float,
        tokens: int,
        visual_flops: int,
        seconds: float,
        *,
        data_wait: float,
    ) -> None:
        """One metrics row from the global batches since the previous one: ``tokens`` input
        (non-padding) tokens and ``visual_flops`` (a VLM's encoder + projector) in ``seconds``;
        ``data_wait``: the seconds per step this rank waited for its batches (``next`` of the
        loader: decoding, packing, reading not done ahead), part of ``seconds``."""
        p = self.parts
        figures = window_figures(
            tokens=tokens,
            visual_flops=visual_flops,
            seconds=seconds,
            flops_per_token=p.flops_per_token,
            world_size=self.world_size,
            peak=self.peak,
        )
        row = {
            "step": step,
            "loss": loss,
            **getattr(self.runner, "last_mtp_losses", {}),
            "lr": p.schedule.config.lr * p.schedule.factor(step - 1),
            "grad_norm": grad_norm,
            "tokens_per_s": figures["tokens_per_s"],
            "tokens": self.progress.tokens,
            "flops": figures["flops"],
            "mfu": figures["mfu"],
            "memory_gb": peak_memory_gb(self.accelerator),
            "data_wait_s": data_wait,
        }
        bad = self._bad_data()
        if bad is not None:
            row["bad_samples"] = sum(bad[0].values())
        self.log.log(row, show=True)
        if bad is not None and row["bad_samples"] > self._bad_reported:
            self._bad_reported = row["bad_samples"]
            counts, where = bad
            reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
            self.log.message(
                f"data: {row['bad_samples']} bad shard(s) / sample(s) skipped or truncated so "
                f"far, over all data-parallel ranks ({reasons})"
                + (f"; e.g. {where}" if where else "")
                + "; data.on_bad_data=raise stops at the first one instead"
            )

    def _bad_data(self) -> tuple[dict[str, int], str | None] | None:
        """The training loader's bad-data counts by reason (``forge_data``'s
        ``BadDataReport``), summed over the data-parallel ranks (a collective there: every rank
        logs its rows), and the location of one of them, the first recorded on the lowest
        data-parallel rank that has any (the others may hold all of them: rank 0 has no
        location to give then); ``None`` for a loader that counts none."""
        report = getattr(self.parts.loader, "bad_data", None)
        if report is None:
            return None
        mine = (dict(report.counts), report.records[0]["location"] if report.records else None)
        gathered = [mine]
        if self.parts.dp_size > 1:
            gathered = [None] * self.parts.dp_size
            dist.all_gather_object(gathered, mine, group=self.parts.dp_group)
        counts: dict[str, int] = {}
        for ranks, _ in gathered:
            for reason, n in ranks.items():
                counts[reason] = counts.get(reason, 0) + n
        where = next((location for _, location in gathered if location), None)
        return counts, where

    def _benchmark_summary(
        self, result: TrainResult, start: float | None, tokens: int, visual: int
    ) -> None:
        self.accelerator.synchronize()
        measured = self.progress.step - result.start_step - self.cfg.train.benchmark_warmup
        elapsed = time.perf_counter() - (start or time.perf_counter())
        tokens, visual = self._global_sums(tokens, visual)
        figures = window_figures(
            tokens=tokens,
            visual_flops=visual,
            seconds=elapsed,
            flops_per_token=self.parts.flops_per_token,
            world_size=self.world_size,
            peak=self.peak,
        )
        result.tokens_per_s = figures["tokens_per_s"]
        self.log.message(
            benchmark_line(
                n_params=self.parts.n_params,
                device_name=self.accelerator.name,
                world_size=self.world_size,
                precision=self.cfg.train.precision,
                steps=measured,
                elapsed=elapsed,
                tokens_per_s=result.tokens_per_s,
                mfu_value=figures["mfu"],
                memory_gb=peak_memory_gb(self.accelerator),
            )
        )

    def close(self) -> None:
        self.log.close()
        loader = getattr(getattr(self, "parts", None), "loader", None)
        if hasattr(loader, "close"):  # a streaming loader's prefetch thread (vlm_stream)
            loader.close()
        close_evaluation_data(getattr(self, "_eval_data", None))  # evaluations' decode workers
