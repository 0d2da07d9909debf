"""Throughput figures of the loop: tokens/s, MFU and peak memory, per log row and for the
``--benchmark`` summary line.

MFU (model FLOPs utilization, Chowdhery et al. 2022, PaLM, appendix B) is
``(tokens/s x flops_per_token + visual FLOP/s) / (devices x peak FLOP/s)``, with
``forge_models.flops_per_token`` for the (language) model; tokens/s counts the input tokens the
model processes (every non-padding position), not only the predicted (loss) tokens: with an
assistant-only SFT loss those are a fraction of the work. A vision-language model adds its
vision encoder and projector (:class:`VisualFlops`, ``forge_models.vision_flops``): their work
grows with each image's patches, not with the tokens, so it is counted per micro-batch from the
images' and videos' shapes (a frozen encoder forward only). The stand-in image of a text-only
micro-batch (``dummy_visual``) is not counted, as padding is not: it computes nothing the model
keeps. An LLM's figures are those of ``tokens/s x flops_per_token`` alone.

``flops_per_token`` counts what the run trains (:func:`language_model_flops_options`): the
weights of a LoRA run's base model get no weight gradient (``4 N`` per weight; ``2 N`` where
no gradient reaches the input, as in layer 0's projections before its first adapter), its
adapters are counted as they run, and a language model frozen by ``train.freeze`` runs forward
only, or forward and the input gradient behind a trained projector or encoder. MFU in PaLM's
sense counts the FLOPs the model requires: the weight gradients of frozen weights are not
required, so a LoRA run's MFU is not that of full training at the same speed (about 2/3 of it
for large models).
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch

from forge_train.config import LoggingConfig, RunConfig

__all__ = [
    "VisualFlops",
    "benchmark_line",
    "known_peak_flops",
    "language_model_flops_options",
    "mfu",
    "peak_flops",
    "peak_memory_gb",
    "window_figures",
]


def language_model_flops_options(cfg: RunConfig, text_config: Any) -> dict[str, Any]:
    """The keyword arguments of ``forge_models.flops_per_token`` that say what ``cfg`` trains
    in its language model (``text_config``: a VLM's ``config.text``), as
    :func:`forge_train.components.build_components` sets it up:

    - ``lora``: :func:`forge_train.lora.apply_lora` freezes every parameter and adapts the
      linear layers whose names match ``lora.targets`` (``lora_targets``: those layers' names).
      On a vision-language model (:func:`~forge_train.lora.apply_vlm_lora`) the patterns match
      full paths (``language_model.layers.0.attn.q_proj``): the language model keeps only its
      adapters if it holds any, else it trains whole unless ``train.freeze`` names it.
    - ``train.freeze=[language_model]``: none of its weights train.
    - ``input_grad``: a vision-language model whose encoder or projector trains (whole or by
      adapters: ``train.freeze`` does not name both) needs the gradient of the language
      model's input, so even a frozen language model runs it.
    """
    from forge_models.flops import linear_layers

    vlm = cfg.model.kind == "vlm"
    options: dict[str, Any] = {
        "input_grad": vlm and not {"vision", "projector"} <= set(cfg.train.freeze)
    }
    adapted: list[str] = []
    if cfg.lora is not None:
        prefix = "language_model." if vlm else ""
        adapted = [
            name
            for name in linear_layers(text_config)
            if any(fnmatch.fnmatchcase(prefix + name, p) for p in cfg.lora.targets)
        ]
    if adapted:
        options.update(lora_rank=cfg.lora.rank, lora_targets=tuple(adapted))
    frozen = "language_model" in cfg.train.freeze
    if frozen or adapted or (cfg.lora is not None and not vlm):
        options["trainable"] = ()
    return options


def known_peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU by its ``torch.cuda.get_device_name``; ``None`` for an
    unknown one. The table is forge-kernels' (:func:`forge_kernels.benchmarking.peak_tflops`,
    shared with forge-bench and the kernel benchmarks)."""
    from forge_kernels.benchmarking import peak_tflops

    tflops = peak_tflops(device_name, dtype="bf16")
    return None if tflops is None else tflops * 1e12


def peak_flops(config: LoggingConfig, device: torch.device) -> float | None:
    """Peak FLOP/s of one device: ``logging.peak_tflops``, else known GPUs, else ``None``."""
    if config.peak_tflops is not None:
        return config.peak_tflops * 1e12
    if device.type == "cuda":
        return known_peak_flops(torch.cuda.get_device_name(device))
    return None


def mfu(
    tokens_per_s: float,
    flops_per_token: float,
    world_size: int,
    peak: float | None,
    *,
    visual_flops_per_s: float = 0.0,
) -> float | None:
    """Model FLOPs utilization in [0, 1]; ``None`` without a known peak.
    ``visual_flops_per_s``: a VLM's vision encoder + projector FLOPs per second."""
    if peak is None:
        return None
    return (tokens_per_s * flops_per_token + visual_flops_per_s) / (world_size * peak)


def window_figures(
    *,
    tokens: int,
    visual_flops: int,
    seconds: float,
    flops_per_token: float,
    world_size: int,
    peak: float | None,
) -> dict[str, Any]:
    """``tokens_per_s``, ``flops`` and ``mfu`` of a log row from what the global batches since
    the previous row processed: ``tokens`` input tokens, ``visual_flops`` vision encoder +
    projector FLOPs (0 for an LLM), in ``seconds`` of steps. ``flops``: the model FLOPs of those
    batches, ``tokens x flops_per_token + visual_flops``."""
    seconds = max(seconds, 1e-9)
    tokens_per_s = tokens / seconds
    return {
        "tokens_per_s": tokens_per_s,
        "flops": tokens * flops_per_token + visual_flops,
        "mfu": mfu(
            tokens_per_s,
            flops_per_token,
            world_size,
            peak,
            visual_flops_per_s=visual_flops / seconds,
        ),
    }


class VisualFlops:
    """The vision encoder + projector training FLOPs of this rank's micro-batches of one step
    (``forge_models.vision_flops.visual_flops`` of each micro-batch's images and videos, as
    :func:`forge_train.vlm_data.vlm_model_inputs` hands them to the model; frozen parts as
    ``config.frozen``, i.e. ``train.freeze``). Reads shapes and ``grid_thw`` on the host only.

    ``unsupported``: why the config's encoder or projector cannot be counted (a registered
    component without a formula), else ``None``; such a run counts the language model only.
    """

    def __init__(self, config: Any) -> None:
        from forge_models.vision_flops import visual_flops_unsupported

        self.config = config
        self.unsupported = visual_flops_unsupported(config)

    def __call__(self, micro_batches: list[dict[str, Any]]) -> int:
        if self.unsupported is not None:
            return 0
        from forge_models.vision_flops import visual_flops
        from forge_train.vlm_data import visual_inputs

        total = 0
        for mb in micro_batches:
            visual = mb.get("visual") or {}
            for kind in ("image", "video"):
                stream = visual.get(kind)
                if stream is not None:
                    total += visual_flops(self.config, visual_inputs(stream, kind=kind))
        return total


def peak_memory_gb(accelerator) -> float:
    return accelerator.memory_stats()["peak_allocated"] / 2**30


def benchmark_line(
    *,
    n_params: int,
    device_name: str,
    world_size: int,
    precision: str,
    steps: int,
    elapsed: float,
    tokens_per_s: float,
    mfu_value: float | None,
    memory_gb: float,
) -> str:
    """The one summary line of ``forge-train --benchmark``."""
    mfu_text = f"{100 * mfu_value:.1f}%" if mfu_value is not None else "n/a"
    return (
        f"benchmark | {n_params / 1e6:.1f}M params | {device_name} x {world_size} | "
        f"{precision} | {steps} steps | {1000 * elapsed / max(steps, 1):.1f} ms/step | "
        f"{tokens_per_s:,.0f} tokens/s | MFU {mfu_text} | peak memory {memory_gb:.2f} GB"
    )
