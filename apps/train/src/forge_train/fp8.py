"""``train.fp8``: FP8 GEMMs in the model's eligible linear layers, with forge_kernels.

``per_tensor``: per-tensor current scaling (E4M3 forward, E5M2 gradients; Micikevicius et al.
2022, "FP8 Formats for Deep Learning", arXiv:2209.05433); ``blockwise``: DeepSeek-V3's 1x128
activation and 128x128 weight blocks (arXiv:2412.19437 section 3.3). forge_kernels'
``convert_to_fp8`` swaps each ``nn.Linear`` whose features suit FP8 GEMMs (multiples of 16, of
128 for block-wise) for an ``Fp8Linear`` sharing its parameters, leaving the output head and
MoE routers in high precision. On FP8 GPUs (sm89+, block-wise: sm90) the GEMMs are real FP8;
elsewhere (the CPU) forge_kernels emulates them exactly (FP8 casts, fp32 GEMMs), which is slow
and meant for tests and debugging. ``train.fp8_policy`` (a calibrated ``Fp8Policy`` JSON) keeps
the GEMM shapes where FP8 was measured slower in high precision.

The conversion runs before parallelization (FSDP then shards the shared parameters).
"""

from __future__ import annotations

import torch
from torch import nn

from forge_train.config import ConfigError

__all__ = ["RECIPES", "check_fp8_support", "convert_model_to_fp8"]

#: ``train.fp8`` -> forge_kernels recipe name.
RECIPES = {"per_tensor": "current", "blockwise": "blockwise"}


def check_fp8_support(mode: str, device: torch.device) -> None:
    """Run one small FP8 linear forward and backward on ``device`` with the recipe of ``mode``;
    ``ConfigError`` saying why when forge_kernels can neither run nor emulate it there."""
    from forge_kernels.fp8 import fp8_linear

    size = 128  # one block of the block-wise recipe, a multiple of 16 for per-tensor
    try:
        x = torch.randn(size, size, device=device, requires_grad=True)
        w = torch.randn(size, size, device=device, requires_grad=True)
        fp8_linear(x, w, recipe=RECIPES[mode]).sum().backward()
    except Exception as exc:  # any failure means: not usable here
        raise ConfigError(
            f"train.fp8={mode}: forge_kernels cannot run or emulate FP8 linears on "
            f"{device.type} ({type(exc).__name__}: {exc}); set train.fp8=null"
        ) from exc


def convert_model_to_fp8(
    model: nn.Module, mode: str, *, policy_path: str | None = None
) -> list[str]:
    """Swap the eligible linears of ``model`` for ``Fp8Linear`` (in place); returns their
    names. ``ConfigError`` when none is eligible (FP8 would silently do nothing)."""
    from forge_kernels.fp8 import Fp8Linear, Fp8Policy, convert_to_fp8

    policy = None
    if policy_path is not None:
        try:
            policy = Fp8Policy.load(policy_path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"train.fp8_policy: cannot use {policy_path!r}: {exc}") from exc

    def fp8_names() -> list[str]:
        return [name for name, m in model.named_modules() if isinstance(m, Fp8Linear)]

    before = set(fp8_names())
    convert_to_fp8(model, recipe=RECIPES[mode], policy=policy)
    converted = [name for name in fp8_names() if name not in before]
    if not converted:
        multiple = 128 if mode == "blockwise" else 16
        raise ConfigError(
            f"train.fp8={mode}: no linear layer of the model is eligible (in/out features must "
            f"be multiples of {multiple}; the output head and routers stay in high precision); "
            "use a wider model or train.fp8=null"
        )
    return converted
