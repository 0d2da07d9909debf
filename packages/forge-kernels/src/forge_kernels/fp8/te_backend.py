"""NVIDIA Transformer Engine as a backend of :class:`~forge_kernels.fp8.linear.Fp8Linear`.

Transformer Engine (TE) is an optional extra, ``pip install "forge-kernels[transformer-engine]"``,
and is imported only when ``Fp8Linear(backend="te")`` is built: importing forge-kernels never
imports it. The module then wraps ``te.Linear`` and runs it under TE's FP8 autocast with the TE
recipe matching the forge recipe (see the TE docs, "Using FP8 with Transformer Engine"):

=========================  ==========================================================
forge recipe               TE recipe (``transformer_engine.common.recipe``)
=========================  ==========================================================
``Fp8DelayedScaling``      ``DelayedScaling(fp8_format, margin, amax_history_len,
                           amax_compute_algo)``
``Fp8CurrentScaling``      ``Float8CurrentScaling(fp8_format)``
``Fp8BlockwiseScaling``    ``Float8BlockScaling(fp8_format)`` (TE >= 2.3; sm90)
=========================  ==========================================================
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch

from forge_kernels.fp8.quantize import (
    Fp8BlockwiseScaling,
    Fp8CurrentScaling,
    Fp8DelayedScaling,
    Fp8Recipe,
)

__all__ = [
    "INSTALL_HINT",
    "import_transformer_engine",
    "make_te_linear",
    "te_autocast",
    "to_te_recipe",
    "transformer_engine_available",
]

INSTALL_HINT = 'pip install "forge-kernels[transformer-engine]"'


def transformer_engine_available() -> bool:
    """Whether Transformer Engine is installed (checked without importing it)."""
    return importlib.util.find_spec("transformer_engine") is not None


def import_transformer_engine():
    """``(transformer_engine.pytorch, transformer_engine.common.recipe)``, or a helpful ImportError."""
    try:
        import transformer_engine.pytorch as te
        from transformer_engine.common import recipe as te_recipe
    except ImportError as exc:
        raise ImportError(
            'Fp8Linear(backend="te") needs NVIDIA Transformer Engine, which is not importable '
            f"here ({exc}). Install the extra: {INSTALL_HINT} (a CUDA build matching torch's), "
            'or use backend="torch".'
        ) from exc
    return te, te_recipe


def make_te_linear(
    in_features: int,
    out_features: int,
    *,
    bias: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """A ``te.Linear`` on a CUDA device (TE has no CPU kernels)."""
    te, _ = import_transformer_engine()
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(
            f"the Transformer Engine backend runs on CUDA only, got device {device}; use "
            'backend="torch" (emulated FP8 on CPU)'
        )
    return te.Linear(
        in_features,
        out_features,
        bias=bias,
        params_dtype=dtype if dtype is not None else torch.get_default_dtype(),
        device=device,
    )


def to_te_recipe(recipe: Fp8Recipe):
    """The Transformer Engine recipe object matching a forge recipe."""
    _, te_recipe = import_transformer_engine()
    fmt = te_recipe.Format.HYBRID if recipe.fp8_format == "hybrid" else te_recipe.Format.E4M3
    if isinstance(recipe, Fp8DelayedScaling):
        return te_recipe.DelayedScaling(
            fp8_format=fmt,
            margin=recipe.margin,
            amax_history_len=recipe.amax_history_len,
            amax_compute_algo=recipe.amax_compute_algo,
        )
    if isinstance(recipe, Fp8CurrentScaling):
        if not hasattr(te_recipe, "Float8CurrentScaling"):
            raise ImportError(f"current scaling needs Transformer Engine >= 2.2: {INSTALL_HINT}")
        return te_recipe.Float8CurrentScaling(fp8_format=fmt)
    if isinstance(recipe, Fp8BlockwiseScaling):
        if not hasattr(te_recipe, "Float8BlockScaling"):
            raise ImportError(f"block-wise scaling needs Transformer Engine >= 2.3: {INSTALL_HINT}")
        if recipe.block_size != 128:
            raise ValueError(f"TE's Float8BlockScaling uses 128 blocks, not {recipe.block_size}")
        return te_recipe.Float8BlockScaling(fp8_format=fmt)
    raise TypeError(f"not an FP8 recipe: {recipe!r}")


def te_autocast(te_recipe, *, enabled: bool = True) -> contextlib.AbstractContextManager:
    """TE's FP8 autocast region: ``te.autocast(recipe=...)`` where it exists (TE >= 2.8), else
    ``te.fp8_autocast(fp8_recipe=...)``."""
    te, _ = import_transformer_engine()
    autocast = getattr(te, "autocast", None)
    if autocast is not None:
        with contextlib.suppress(TypeError):
            return autocast(enabled=enabled, recipe=te_recipe)
    return te.fp8_autocast(enabled=enabled, fp8_recipe=te_recipe)
