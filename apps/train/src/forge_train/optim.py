"""AdamW with weight-decay groups, and the learning-rate schedules.

AdamW: Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization" (arXiv:1711.05101);
no decay on norms, biases and embeddings (parameters with fewer than two dimensions, and the
embedding table), as in GPT-3 / Llama training recipes, nor on the parameters a module lists in
its ``no_weight_decay()`` (names relative to it: timm's convention, e.g. a ViT's position table
and CLS token). Schedules start with linear warmup, then: ``cosine`` decay (Loshchilov & Hutter
2017, SGDR, arXiv:1608.03983), ``linear`` decay, ``wsd`` warmup-stable-decay (Hu et al. 2024,
MiniCPM, arXiv:2404.06395) or ``constant``.

The learning rate of (0-based) step ``s`` of ``T`` with ``W`` warmup steps, peak ``lr`` and
floor ``m = min_lr_ratio``: warmup ``lr * (s + 1) / W`` for ``s < W`` (the first step gets
``lr / W``, step ``W - 1`` the peak). ``cosine`` / ``linear`` (the Hugging Face
``get_cosine_schedule_with_warmup`` / ``get_linear_schedule_with_warmup`` convention) decay over
progress ``(s - W) / (T - W)``, which is 1 at step ``T``, one past the last step run: the last
step ``T - 1`` gets ``m + (1 - m) (1 + cos(pi (T - 1 - W) / (T - W))) / 2`` (cosine) or
``1 - (1 - m) (T - 1 - W) / (T - W)`` (linear) times ``lr``, slightly above the floor. ``wsd``
decays over progress ``(s - start + 1) / (T - start)``, so its last step gets exactly
``m * lr``. ``constant`` stays at ``lr``. With ``W >= T`` the run ends inside the warmup and
never reaches ``lr`` (the loop warns).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from forge_train.config import OptimConfig

__all__ = ["LRSchedule", "build_optimizer", "declared_no_weight_decay", "param_groups"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into a decayed group (matrices) and an undecayed one (norms,
    biases, embeddings, and what any submodule's ``no_weight_decay()`` names)."""
    undecayed = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    undecayed |= declared_no_weight_decay(model)
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or id(p) in undecayed else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def declared_no_weight_decay(model: nn.Module) -> set[int]:
    """Ids of the parameters that ``model`` or any submodule lists in its ``no_weight_decay()``
    (a collection of parameter names relative to that module, timm's convention)."""
    found: set[int] = set()
    for prefix, module in model.named_modules():
        declare = getattr(module, "no_weight_decay", None)
        if not callable(declare):
            continue
        for name in declare():
            try:
                found.add(id(module.get_parameter(name)))
            except AttributeError as error:
                where = prefix or type(module).__name__
                raise ValueError(
                    f"{where}.no_weight_decay() names {name!r}, which is not a parameter of it; "
                    "list parameter names relative to the module"
                ) from error
    return found


def build_optimizer(
    model: nn.Module, config: OptimConfig, *, device_type: str, build=None, allow_empty=False
):
    """AdamW (fused kernels on CUDA unless ``optim.fused=off``); ``build`` is
    ``ParallelizeResult.build_optimizer`` (ZeRO wrapping) when given. ``allow_empty``: ``model``
    is one pipeline stage, whose parameters may all be frozen (a frozen language model's
    stages still run forward and backward for the encoder): its optimizer then steps nothing."""
    fused = config.fused == "on" or (config.fused == "auto" and device_type == "cuda")
    groups = param_groups(model, config.weight_decay)
    if not groups and allow_empty:
        groups = [{"params": [], "weight_decay": 0.0}]
    elif not groups:
        raise ValueError("the model has no trainable parameters (check lora.targets)")
    kwargs = {"lr": config.lr, "betas": tuple(config.betas), "eps": config.eps}
    if fused:
        kwargs["fused"] = True
    if build is not None:
        return build(torch.optim.AdamW, groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


class LRSchedule:
    """The learning rate of each step; a stateful object for the checkpoint (its step)."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int):
        self.optimizer = optimizer
        self.config = config
        self.total_steps = total_steps
        self.step_count = 0
        self.apply()

    def factor(self, step: int) -> float:
        """Multiplier of ``optim.lr`` at (0-based) ``step`` (the values of each schedule at
        its first, peak and last step: the module docstring)."""
        c = self.config
        if step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        floor = c.min_lr_ratio
        if c.schedule == "constant":
            return 1.0
        if c.schedule == "wsd":
            decay_steps = max(1, round(c.decay_fraction * self.total_steps))
            start = max(c.warmup_steps, self.total_steps - decay_steps)
            if step < start:
                return 1.0
            progress = min(1.0, (step - start + 1) / max(1, self.total_steps - start))
            return 1.0 - (1.0 - floor) * progress
        progress = min(1.0, (step - c.warmup_steps) / max(1, self.total_steps - c.warmup_steps))
        if c.schedule == "linear":
            return 1.0 - (1.0 - floor) * progress
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    @property
    def lr(self) -> float:
        return self.config.lr * self.factor(self.step_count)

    def apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def step(self) -> None:
        self.step_count += 1
        self.apply()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step"])
        self.apply()
