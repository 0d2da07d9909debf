"""The default training job: a small Llama-style model on the standard library's source.

This is the smallest real thing Forge does end to end today: forge-core picks the device and
sets up the (optional, torchrun-launched) data-parallel job and its mesh; forge-kernels supplies
RMSNorm, RoPE, SwiGLU and the fused linear cross-entropy; the loop trains with AdamW, warmup +
cosine learning rate and gradient clipping, reports held-out loss before and after, and saves a
checkpoint. forge-train's Hydra pipeline (issue 8) replaces this module.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from forge_core import ParallelDims, current_accelerator, init_distributed, shutdown_distributed
from forge_train.data_parallel import average_gradients
from forge_train.stdlib_corpus import VOCAB_SIZE, load_stdlib_corpus
from forge_train.tiny_lm import TinyLM, TinyLMConfig

__all__ = ["BootstrapConfig", "run"]


@dataclass(frozen=True, kw_only=True)
class BootstrapConfig:
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_batches: int = 8
    log_every: int = 25
    max_minutes: float | None = None
    out_dir: str = "outputs/default"
    model: TinyLMConfig = field(default_factory=TinyLMConfig)


def _lr_at(step: int, cfg: BootstrapConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


@torch.no_grad()
def _evaluate(model: TinyLM, corpus, cfg: BootstrapConfig, device: torch.device) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 10_000)
    losses = []
    for _ in range(cfg.eval_batches):
        x, y = corpus.sample_batch(
            batch_size=cfg.batch_size, seq_len=cfg.seq_len, generator=gen, split="validation"
        )
        losses.append(model(x.to(device), labels=y.to(device)).item())
    model.train()
    return sum(losses) / len(losses)


def run(cfg: BootstrapConfig) -> dict[str, float]:
    """Train, evaluate, save; returns the held-out losses before and after training."""
    env = init_distributed()
    try:
        accelerator = current_accelerator()
        device = accelerator.device()
        mesh = ParallelDims(world_size=env.world_size).build_mesh(accelerator.device_type)
        dp_rank, dp_size = mesh.local_rank("dp"), mesh.size("dp")
        log = print if env.is_main else (lambda *a, **k: None)

        corpus = load_stdlib_corpus()
        log(
            f"forge-train (bootstrap job): {corpus.train.numel() / 1e6:.1f}M training bytes from "
            f"{corpus.files} stdlib files | {accelerator.name} x {env.world_size} | "
            f"data parallel {dp_size}"
        )
        accelerator.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = TinyLM(cfg.model).to(device)
        n_params = sum(p.numel() for p in model.parameters())
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            betas=(0.9, 0.95),
        )
        data_gen = torch.Generator().manual_seed(
            cfg.seed * 1000 + dp_rank
        )  # different data per rank
        initial = _evaluate(model, corpus, cfg, device)
        log(
            f"model: {n_params / 1e6:.2f}M parameters | held-out loss before training {initial:.3f}"
        )

        start, tokens, step = time.perf_counter(), 0, 0
        for step in range(cfg.steps):
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, cfg)
            x, y = corpus.sample_batch(
                batch_size=cfg.batch_size, seq_len=cfg.seq_len, generator=data_gen
            )
            loss = model(x.to(device), labels=y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(model.parameters(), mesh["dp"])
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            tokens += x.numel() * dp_size
            elapsed = time.perf_counter() - start
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                log(
                    f"step {step:4d} | loss {loss.item():.3f} | lr {_lr_at(step, cfg):.2e} | "
                    f"grad norm {grad_norm.item():.2f} | {tokens / elapsed:,.0f} tokens/s"
                )
            if cfg.max_minutes is not None and elapsed > 60 * cfg.max_minutes:
                log(f"stopping after {cfg.max_minutes} minutes (step {step})")
                break

        final = _evaluate(model, corpus, cfg, device)
        log(
            f"held-out loss: {initial:.3f} -> {final:.3f} (uniform over bytes would be {math.log(VOCAB_SIZE):.3f})"
        )
        if env.is_main:
            out = Path(cfg.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            save_file(
                {k: v.contiguous() for k, v in model.state_dict().items()},
                out / "model.safetensors",
            )
            torch.save(
                {"optimizer": optimizer.state_dict(), "step": step + 1}, out / "optimizer.pt"
            )
            config = {k: v for k, v in asdict(cfg).items() if k != "model"}
            (out / "config.json").write_text(
                json.dumps({"model": cfg.model.to_dict(), "train": config}, indent=2)
            )
            log(f"saved checkpoint to {out}/ (model.safetensors, optimizer.pt, config.json)")
        return {"initial_loss": initial, "final_loss": final}
    finally:
        shutdown_distributed()
