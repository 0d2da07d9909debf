"""Pixel operations shared by the VLM processors, with the arithmetic of the reference processors.

Images follow the PIL backend of ``transformers`` image processors: RGB conversion (transparency
composited onto white), resizing with PIL on ``uint8`` pixels, rescaling in float64 then cast to
float32, and normalization in float32. Video frames follow the ``transformers`` video processors,
which run on torch tensors: resizing is ``torch.nn.functional.interpolate`` on ``uint8`` frames
with antialiasing (the CPU kernel torchvision's ``resize`` calls for bicubic ``uint8``), and
rescale + normalize are fused into one subtraction and division by ``mean / rescale_factor`` and
``std / rescale_factor``. Keeping each path's exact order of operations is what makes the outputs
equal to the reference bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "RESAMPLE",
    "as_frames",
    "as_rgb_chw",
    "normalize_frames",
    "resample_name",
    "rescale_normalize",
    "resize",
    "resize_frames",
]

# CLIP's normalization (Radford et al. 2021), the default of the reference processors.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL's resampling filter ids, as ``preprocessor_config.json`` stores them.
RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
_TORCH_MODES = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic"}


def resample_name(value: Any) -> str:
    """A resampling filter name from a name or a PIL filter id (``preprocessor_config.json``)."""
    if isinstance(value, str) and value.lower() in RESAMPLE:
        return value.lower()
    if isinstance(value, int) and not isinstance(value, bool):
        for name, pil_id in RESAMPLE.items():
            if pil_id == value:
                return name
    raise ValueError(
        f"unknown resampling filter {value!r}: use one of {sorted(RESAMPLE)} or its PIL id 0-5"
    )


def as_rgb_chw(image: Any) -> np.ndarray:
    """A ``(3, H, W)`` uint8 array from a PIL image or an ``(H, W, C)`` uint8 array (C = 1, 3, 4).

    Transparency (an alpha channel or a palette's transparent color) is composited onto white,
    grayscale is repeated to three channels.
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba)
        return np.moveaxis(np.array(image.convert("RGB")), -1, 0)
    if isinstance(image, torch.Tensor):
        image = image.numpy()
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        shape = getattr(image, "shape", None)
        raise ValueError(
            f"an image must be a PIL image or an (H, W, C) array with C in (1, 3, 4), got "
            f"{type(image).__name__} of shape {shape}; convert channels-first arrays with "
            "np.moveaxis(image, 0, -1)"
        )
    if image.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 (0-255), got {image.dtype}")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    elif image.shape[-1] == 4:
        alpha = image[..., 3:4] / 255
        image = np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(image, -1, 0))


def resize(image: np.ndarray, size: tuple[int, int], resample: str) -> np.ndarray:
    """Resize a ``(C, H, W)`` uint8 array to ``size = (height, width)`` with PIL."""
    from PIL import Image

    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"cannot resize to {size}: both sides must be >= 1 pixel")
    pil = Image.fromarray(np.ascontiguousarray(np.moveaxis(image, 0, -1)))
    out = pil.resize((width, height), resample=RESAMPLE[resample])
    return np.moveaxis(np.array(out), -1, 0)


def rescale_normalize(
    image: np.ndarray,
    *,
    rescale_factor: float | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> np.ndarray:
    """``(image * rescale_factor - mean) / std`` of a ``(C, H, W)`` array as float32; ``None``
    skips a step. Rescaling is done in float64 and cast to float32, normalizing in float32."""
    out = image
    if rescale_factor is not None:
        out = (out.astype(np.float64) * rescale_factor).astype(np.float32)
    if mean is not None and std is not None:
        if not np.issubdtype(out.dtype, np.floating):
            out = out.astype(np.float32)
        m = np.asarray(mean, dtype=out.dtype)[:, None, None]
        s = np.asarray(std, dtype=out.dtype)[:, None, None]
        out = (out - m) / s
    return np.asarray(out, dtype=np.float32)


def as_frames(video: Any) -> torch.Tensor:
    """A ``(T, 3, H, W)`` uint8 tensor from ``(T, H, W, C)`` uint8 frames (C = 1 or 3)."""
    if isinstance(video, np.ndarray):
        video = torch.from_numpy(np.ascontiguousarray(video))
    if not isinstance(video, torch.Tensor) or video.dim() != 4 or video.shape[-1] not in (1, 3):
        shape = tuple(video.shape) if hasattr(video, "shape") else None
        raise ValueError(
            f"a video must be (T, H, W, C) uint8 frames with C in (1, 3), got "
            f"{type(video).__name__} of shape {shape}"
        )
    if video.dtype != torch.uint8:
        raise ValueError(f"video frames must be uint8 (0-255), got {video.dtype}")
    if video.shape[0] == 0:
        raise ValueError("a video needs at least one frame")
    frames = video.permute(0, 3, 1, 2).contiguous()
    return frames.repeat(1, 3, 1, 1) if frames.shape[1] == 1 else frames


def resize_frames(frames: torch.Tensor, size: tuple[int, int], resample: str) -> torch.Tensor:
    """Resize ``(T, C, H, W)`` uint8 frames to ``size = (height, width)`` (antialiased)."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    if resample not in _TORCH_MODES:
        raise ValueError(
            f"video frames resize with one of {sorted(_TORCH_MODES)}, got {resample!r}: set the "
            "processor's video resample"
        )
    mode = _TORCH_MODES[resample]
    if mode == "nearest":
        return torch.nn.functional.interpolate(frames, size=list(size), mode="nearest")
    native = mode == "bicubic" or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    x = frames if native else frames.float()
    out = torch.nn.functional.interpolate(
        x, size=list(size), mode=mode, align_corners=False, antialias=True
    )
    return out if native else out.round_().to(torch.uint8)


def normalize_frames(
    frames: torch.Tensor,
    *,
    rescale_factor: float | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> torch.Tensor:
    """Rescale + normalize ``(..., C, H, W)`` frames to float32, fused as the video processors do:
    ``(x - mean / rescale_factor) / (std / rescale_factor)``."""
    x = frames.to(torch.float32)
    if mean is not None and std is not None:
        m = torch.tensor(mean)
        s = torch.tensor(std)
        if rescale_factor is not None:
            m, s = m * (1.0 / rescale_factor), s * (1.0 / rescale_factor)
        return (x - m.view(-1, 1, 1)) / s.view(-1, 1, 1)
    if rescale_factor is not None:
        return x * rescale_factor
    return x
