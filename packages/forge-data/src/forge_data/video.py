"""Video files (``.mp4`` and other ffmpeg containers) decoded to sampled ``uint8`` RGB frames.

Decoding uses PyAV (the ``[video]`` extra: ``pip install 'forge-data[video]'``; its wheels bundle
ffmpeg), imported only when a video is decoded. Which frames are kept follows one of two policies
(:class:`FrameSampling`):

* ``fps`` (default 2 frames per second): Qwen2-VL / Qwen2.5-VL sampling (Wang et al. 2024,
  arXiv:2409.12191; ``smart_nframes`` of qwen-vl-utils and ``Qwen2VLVideoProcessor.sample_frames``
  of transformers 5.x): ``n = total / video_fps * fps`` clamped to ``[min_frames, max_frames]``
  and to the video's length, then rounded down to a multiple of ``frame_factor`` (the vision
  encoder's temporal patch size, 2) so that frames group into whole temporal patches;
* ``num_frames``: a fixed number of frames spread uniformly over the video (LLaVA-OneVision,
  Li et al. 2024, arXiv:2408.03326, which samples 32), rounded to a multiple of ``frame_factor``.

The kept frames are ``i * total // n`` for ``i < n`` (the uniform rule of transformers'
``default_sample_indices_fn``): evenly spaced, starting at the first frame. transformers'
``Qwen2VLVideoProcessor`` computes the same indices with a float ``arange(0, total, total / n)``,
which yields ``n + 1`` of them for about 4% of the ``(total, n)`` pairs (6862 of 189900 pairs
with ``total < 2000``, ``n`` even, checked 2026-11-23); the integer rule always gives ``n``. A video shorter than
``frame_factor`` frames keeps every frame (the Qwen2-VL processor repeats the last one to fill
the temporal patch). The frames' sampling rate ``n / total * video_fps`` is what Qwen2.5-VL's
M-RoPE time positions need (``second_per_grid_ts = temporal_patch_size / sampled_fps``).

A file ffmpeg cannot open or decode, with no video stream, or whose stream ends before the frames
its header announces, raises :class:`VideoDecodeError` (a ``ValueError``), which
:class:`~forge_data.multimodal.MultimodalDataset` counts as undecodable media and skips.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DecodedVideo",
    "FrameSampling",
    "VideoDecodeError",
    "decode_video",
    "frame_count",
    "sample_frame_indices",
]

VIDEO_EXTENSIONS = ("mp4", "mkv", "webm", "mov")


class VideoDecodeError(ValueError):
    """A video file that cannot be decoded (corrupt, truncated, no video stream)."""


@dataclass(frozen=True, kw_only=True)
class FrameSampling:
    """Which frames of a video to keep (see the module doc).

    Exactly one of ``fps`` (frames per second of video, Qwen2-VL) and ``num_frames`` (uniform,
    LLaVA-OneVision) is set. ``min_frames`` / ``max_frames`` bound the ``fps`` policy;
    ``frame_factor`` is the temporal patch size the frame count is a multiple of (1 for
    encoders that take frames one by one).
    """

    fps: float | None = 2.0
    num_frames: int | None = None
    min_frames: int = 4
    max_frames: int = 768
    frame_factor: int = 2

    def __post_init__(self):
        if (self.fps is None) == (self.num_frames is None):
            raise ValueError(
                f"set exactly one of fps and num_frames, got fps={self.fps}, "
                f"num_frames={self.num_frames} (FrameSampling(fps=None, num_frames=32) for "
                "uniform sampling)"
            )
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.frame_factor < 1:
            raise ValueError(f"frame_factor must be >= 1, got {self.frame_factor}")
        if not 1 <= self.min_frames <= self.max_frames:
            raise ValueError(
                f"need 1 <= min_frames <= max_frames, got {self.min_frames}, {self.max_frames}"
            )


def frame_count(total_frames: int, video_fps: float, sampling: FrameSampling) -> int:
    """How many of a video's ``total_frames`` (at ``video_fps``) ``sampling`` keeps."""
    if total_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {total_frames}")
    f = sampling.frame_factor
    if total_frames < f:  # too short for one temporal patch: keep all, the processor pads
        return total_frames
    if sampling.num_frames is not None:
        n = max(f, round(sampling.num_frames / f) * f)
    else:
        if not video_fps > 0:
            raise ValueError(f"sampling at fps needs the video's frame rate, got {video_fps}")
        n = total_frames / video_fps * sampling.fps
        n = min(max(n, sampling.min_frames), sampling.max_frames, total_frames)
    n = max(f, int(n // f) * f)
    return min(n, total_frames // f * f)


def sample_frame_indices(
    total_frames: int, video_fps: float, sampling: FrameSampling
) -> np.ndarray:
    """Indices (``int64``, increasing) of the frames ``sampling`` keeps."""
    n = frame_count(total_frames, video_fps, sampling)
    return np.arange(n, dtype=np.int64) * total_frames // n


@dataclass(frozen=True)
class DecodedVideo:
    """Sampled frames of a video: ``frames`` ``(n, H, W, 3)`` uint8 RGB, the ``indices`` they
    have among the video's ``total_frames``, their presentation ``timestamps`` (seconds), and the
    stream's average frame rate ``fps``."""

    frames: np.ndarray
    indices: np.ndarray
    timestamps: np.ndarray
    total_frames: int
    fps: float

    @property
    def sampled_fps(self) -> float:
        """Frames per second of the sampled frames (``n / total_frames * fps``)."""
        return len(self.indices) / self.total_frames * self.fps


def _import_av():
    try:
        import av
    except ImportError as err:
        raise ImportError(
            "decoding video files needs PyAV: pip install 'forge-data[video]'"
        ) from err
    return av


def decode_video(data: bytes, sampling: FrameSampling | None = None) -> DecodedVideo:
    """Decode the bytes of a video file and keep the frames ``sampling`` picks (default
    :class:`FrameSampling`: 2 frames per second, Qwen2-VL)."""
    av = _import_av()
    sampling = FrameSampling() if sampling is None else sampling
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise VideoDecodeError("the file holds no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            total = int(stream.frames)
            if total <= 0:  # the container does not store it (e.g. Matroska): count them
                total = sum(1 for _ in container.decode(stream))
                container.seek(0)
            if total <= 0:
                raise VideoDecodeError("the video stream holds no frames")
            indices = sample_frame_indices(total, fps, sampling)
            frames, times = [], []
            want, last = 0, int(indices[-1])
            for i, frame in enumerate(container.decode(stream)):
                if i == indices[want]:
                    frames.append(frame.to_ndarray(format="rgb24"))
                    times.append(float(frame.time) if frame.time is not None else np.nan)
                    want += 1
                    if i == last:
                        break
    except av.FFmpegError as err:
        raise VideoDecodeError(f"{type(err).__name__}: {err}") from err
    if len(frames) < indices.size:
        raise VideoDecodeError(
            f"the video stream ends before frame {int(indices[len(frames)])} of the "
            f"{total} its header declares (truncated file?)"
        )
    return DecodedVideo(
        frames=np.stack(frames),
        indices=indices,
        timestamps=np.asarray(times, dtype=np.float64),
        total_frames=total,
        fps=fps,
    )
