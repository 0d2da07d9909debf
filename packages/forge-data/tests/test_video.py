"""Video files: frame sampling policies, decoding real .mp4 / .mkv files written here with PyAV,
and corrupt or truncated videos in shards counted and skipped."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from forge_data.multimodal import BadSampleError, MultimodalConfig, MultimodalDataset
from forge_data.video import (
    FrameSampling,
    VideoDecodeError,
    decode_video,
    frame_count,
    sample_frame_indices,
)

av = pytest.importorskip("av", reason="needs the [video] extra (PyAV)")

H, W = 16, 24


def _frames(n: int) -> np.ndarray:
    """``n`` frames a decoder can tell apart: frame i is 2x2-block constant (so 4:2:0 chroma
    subsampling loses nothing) with levels that grow with i, and differs between its quadrants
    (so a transposed or flipped decode would show)."""
    out = np.empty((n, H, W, 3), dtype=np.uint8)
    for i in range(n):
        base = 20 + 16 * i
        out[i, : H // 2, : W // 2] = (base, 40, 200 - 8 * i)
        out[i, : H // 2, W // 2 :] = (base + 10, 90, 180 - 8 * i)
        out[i, H // 2 :, : W // 2] = (base + 20, 140, 160 - 8 * i)
        out[i, H // 2 :, W // 2 :] = (base + 30, 190, 140 - 8 * i)
    return out


def _encode(frames: np.ndarray, *, fps: int, fmt: str = "mp4", faststart_in=None) -> bytes:
    """An H.264 (yuv420p, quantizer 0: near lossless) video of ``frames`` at ``fps``; with
    ``faststart_in`` (a folder), an mp4 whose index precedes the frames (ffmpeg rewrites the
    file for that, so it goes through a file there)."""
    target = io.BytesIO() if faststart_in is None else faststart_in / "faststart.mp4"
    options = {} if faststart_in is None else {"movflags": "faststart"}
    with av.open(target, mode="w", format=fmt, options=options) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"qp": "0"}
        for arr in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
        out.mux(stream.encode())
    return target.getvalue() if faststart_in is None else target.read_bytes()


def _assert_close_frames(decoded: np.ndarray, encoded: np.ndarray) -> None:
    """Lossless H.264 of 4:2:0 video loses only the RGB <-> YUV rounding inside each quadrant;
    the chroma upsampling blurs the 2 pixels either side of a quadrant edge a little more. Frames
    16 levels apart cannot pass for each other."""
    assert decoded.shape == encoded.shape
    diff = np.abs(decoded.astype(np.int16) - encoded.astype(np.int16))
    inside = np.ones((H, W), dtype=bool)
    inside[H // 2 - 2 : H // 2 + 2] = False
    inside[:, W // 2 - 2 : W // 2 + 2] = False
    assert diff[:, inside].max() <= 4, diff[:, inside].max()
    assert diff.mean() < 4, diff.mean()
    assert diff.max() <= 16, diff.max()


@pytest.fixture(scope="module")
def clip():
    """12 frames at 6 fps: 2 seconds."""
    frames = _frames(12)
    return frames, _encode(frames, fps=6)


def test_frame_counts_follow_qwen2_vl_and_uniform_policies():
    # fps: total / video_fps * fps, clamped to [min_frames, max_frames] and the length, floored
    # to a multiple of the temporal patch (2).
    qwen = FrameSampling()  # 2 fps, 4..768 frames, factor 2
    assert frame_count(300, 30.0, qwen) == 20  # 10 s at 2 fps
    assert frame_count(12, 6.0, qwen) == 4  # 2 s -> 4 frames
    assert frame_count(10, 30.0, qwen) == 4  # 0.67 frames -> min_frames
    assert frame_count(3, 30.0, qwen) == 2  # min_frames capped by the length, floored to 2
    assert frame_count(1, 30.0, qwen) == 1  # shorter than a temporal patch: all frames
    assert frame_count(3000, 1.0, qwen) == 768  # max_frames
    assert frame_count(97, 24.0, FrameSampling(fps=3.0)) == 12  # 12.125 -> 12
    assert frame_count(95, 24.0, FrameSampling(fps=3.0)) == 10  # 11.875 -> 10 (even)
    # num_frames: uniform, rounded to the factor (Python rounding: 5 / 2 = 2.5 -> 2), capped.
    assert frame_count(100, 30.0, FrameSampling(fps=None, num_frames=5)) == 4
    assert frame_count(100, 30.0, FrameSampling(fps=None, num_frames=7)) == 8
    llava = FrameSampling(fps=None, num_frames=32, frame_factor=1)
    assert frame_count(100, 30.0, llava) == 32
    assert frame_count(9, 30.0, llava) == 9
    np.testing.assert_array_equal(sample_frame_indices(12, 6.0, qwen), [0, 3, 6, 9])
    np.testing.assert_array_equal(sample_frame_indices(10, 30.0, llava), np.arange(10))
    np.testing.assert_array_equal(
        sample_frame_indices(10, 30.0, FrameSampling(fps=None, num_frames=4, frame_factor=1)),
        [0, 2, 5, 7],
    )
    with pytest.raises(ValueError, match="exactly one of fps and num_frames"):
        FrameSampling(num_frames=8)
    with pytest.raises(ValueError, match="frame rate"):
        frame_count(10, 0.0, qwen)


def test_indices_match_transformers_uniform_rule():
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    for total in (2, 7, 12, 31, 100, 301):
        for n in range(1, total + 1, 3):
            ref = default_sample_indices_fn(VideoMetadata(total_num_frames=total, fps=30.0), n)
            ours = sample_frame_indices(
                total, 30.0, FrameSampling(fps=None, num_frames=n, frame_factor=1)
            )
            np.testing.assert_array_equal(ours, ref)


def test_decode_mp4_keeps_the_sampled_frames_with_their_timestamps(clip):
    frames, data = clip
    video = decode_video(data)  # 2 fps of a 6 fps, 12-frame video
    assert video.total_frames == 12
    assert video.fps == pytest.approx(6.0)
    np.testing.assert_array_equal(video.indices, [0, 3, 6, 9])
    np.testing.assert_allclose(video.timestamps, [0.0, 0.5, 1.0, 1.5], atol=1e-6)
    assert video.sampled_fps == pytest.approx(2.0)
    assert video.frames.shape == (4, H, W, 3)
    assert video.frames.dtype == np.uint8
    _assert_close_frames(video.frames, frames[[0, 3, 6, 9]])

    uniform = decode_video(data, FrameSampling(fps=None, num_frames=6, frame_factor=1))
    np.testing.assert_array_equal(uniform.indices, [0, 2, 4, 6, 8, 10])
    np.testing.assert_allclose(uniform.timestamps, np.arange(0, 12, 2) / 6.0, atol=1e-6)
    _assert_close_frames(uniform.frames, frames[::2])


def test_decode_counts_frames_when_the_container_does_not_store_them():
    frames = _frames(5)
    data = _encode(frames, fps=5, fmt="matroska")
    video = decode_video(data, FrameSampling(fps=None, num_frames=5, frame_factor=1))
    assert video.total_frames == 5
    np.testing.assert_array_equal(video.indices, np.arange(5))
    _assert_close_frames(video.frames, frames)


def test_truncated_or_garbage_videos_raise_a_decode_error(clip, tmp_path):
    data = clip[1]
    with pytest.raises(VideoDecodeError):
        decode_video(data[: len(data) // 2])  # the index (moov) is at the end: lost
    fast = _encode(_frames(12), fps=6, faststart_in=tmp_path)  # index first, then the frames
    with pytest.raises(VideoDecodeError):  # cut inside a frame's packet
        decode_video(fast[: len(fast) * 2 // 3])
    with av.open(io.BytesIO(fast)) as container:  # cut where frame 8's packet starts
        cut = [p.pos for p in container.demux(video=0) if p.size][8]
    with pytest.raises(VideoDecodeError, match="ends before frame 9 of the 12"):
        decode_video(fast[:cut])
    with pytest.raises(VideoDecodeError):
        decode_video(b"\x00\x00\x00\x18ftypmp42" + b"junk" * 50)


def test_mp4_in_a_shard_is_decoded_and_a_truncated_one_is_counted(
    clip, tmp_path, tokenizer, write_tar
):
    data = clip[1]
    caption = json.dumps({"text": "a clip"}).encode()
    write_tar(
        tmp_path / "shard-0.tar",
        [
            ("good", {"json": caption, "mp4": data}),
            ("cut", {"json": caption, "mp4": data[: len(data) // 2]}),
        ],
    )
    cfg = MultimodalConfig(urls=[str(tmp_path / "shard-0.tar")], seq_len=64)
    ds = MultimodalDataset(cfg, tokenizer)
    (sample,) = list(ds)
    assert sample["key"] == "good"
    assert sample["frames"].shape == (4, H, W, 3)
    assert sample["frames"].dtype == torch.uint8
    assert sample["video_fps"] == pytest.approx(2.0)
    assert sample["frame_times"].dtype == torch.float64
    np.testing.assert_allclose(sample["frame_times"].numpy(), [0.0, 0.5, 1.0, 1.5], atol=1e-6)
    assert ds.report.counts == {"undecodable media": 1}
    (record,) = ds.report.records
    assert record["location"].endswith("shard-0.tar:cut")
    assert "VideoDecodeError" in record["detail"]
    strict = MultimodalDataset(
        MultimodalConfig(urls=[str(tmp_path / "shard-0.tar")], seq_len=64, on_error="raise"),
        tokenizer,
    )
    with pytest.raises(BadSampleError, match=r"undecodable media at .*shard-0.tar:cut"):
        list(strict)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_decoded_video_flows_unchanged_into_the_vlm_processors(
    clip, tmp_path, tokenizer, family, write_tar
):
    from forge_data.vision import placeholders
    from forge_data.vision.llava_onevision import (
        LlavaOnevisionProcessor,
        LlavaOnevisionProcessorConfig,
    )
    from forge_data.vision.qwen2_vl import Qwen2VLProcessor, Qwen2VLProcessorConfig
    from forge_data.vision.vlm_dataset import VLMDataset

    data = clip[1]
    if family == "qwen2_vl":
        style, sampling = placeholders.QWEN2_VL, FrameSampling()  # 2 fps -> 4 frames
        processor = Qwen2VLProcessor(
            Qwen2VLProcessorConfig(video_min_pixels=28 * 28, video_max_pixels=28 * 28 * 4)
        )
    else:
        style = placeholders.LLAVA_ONEVISION
        sampling = FrameSampling(fps=None, num_frames=3, frame_factor=1)  # uniform, 3 frames
        processor = LlavaOnevisionProcessor(
            LlavaOnevisionProcessorConfig(size=(28, 28), num_image_tokens=9)
        )
    chat = {
        "messages": [
            {"role": "user", "content": "<video>What changes?"},
            {"role": "assistant", "content": "It brightens."},
        ]
    }
    write_tar(
        tmp_path / "shard-0.tar", [("clip", {"json": json.dumps(chat).encode(), "mp4": data})]
    )
    config = MultimodalConfig(
        urls=[str(tmp_path / "shard-0.tar")], seq_len=256, chat_template="chatml", video=sampling
    )
    ds = VLMDataset(config, placeholders.with_vision_tokens(tokenizer, style), processor)
    (sample,) = list(ds)
    assert ds.report.total == 0
    decoded = decode_video(data, sampling)
    expect = processor.video(decoded.frames, fps=decoded.sampled_fps)
    video = sample["visual"]["video"]
    for name, value in expect.fields.items():
        assert video[name].dtype == value.dtype, name
        assert torch.equal(video[name], value), name
    assert (sample["block_ids"] == 0).sum() == expect.num_tokens
    if family == "qwen2_vl":
        assert video["grid_thw"].tolist() == [[2, 2, 2]]  # 4 frames in 2 temporal patches
        # 2 frames per temporal patch, sampled at 2 fps: 1 second each.
        assert sample["visual"]["second_per_grid_ts"].tolist() == [1.0]
    else:
        assert video["pixel_values"].shape == (3, 3, 28, 28)  # 3 frames, one tile each
