"""Multimodal webdataset shards: decoding, rank/worker sharding, and bad data counted or raised."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from forge_data.multimodal import BadSampleError, MultimodalConfig, MultimodalDataset


@pytest.fixture(scope="module")
def shards(tmp_path_factory, write_tar, png_bytes, npy_bytes):
    root = tmp_path_factory.mktemp("wds")
    good = [
        (
            f"g{i}",
            {
                "txt": f"sample {i} text".encode(),
                "png": png_bytes((i * 40, 0, 0)),
                "actions.npy": npy_bytes(np.full((3, 2), i, dtype=np.float64)),
            },
        )
        for i in range(4)
    ]
    video = (
        "v0",
        {
            "json": json.dumps({"text": "a video"}).encode(),
            "frames.npy": npy_bytes(np.zeros((2, 4, 6, 3), np.uint8)),
        },
    )
    write_tar(root / "shard-0.tar", [*good[:2], video])
    bad = [
        ("badimg", {"txt": b"broken image", "png": b"\x89PNG\r\n\x1a\nnot really"}),
        ("empty", {"txt": b""}),
        ("long", {"txt": ("word " * 200).encode()}),
    ]
    write_tar(root / "shard-1.tar", [*good[2:], *bad])
    (root / "shard-2.tar").write_bytes(b"this is not a tar file" * 40)
    return [str(root / f"shard-{i}.tar") for i in range(3)]


def _keys(samples):
    return sorted(s["key"] for s in samples)


def test_samples_decode_and_bad_data_is_counted_with_its_location(shards, tokenizer):
    ds = MultimodalDataset(MultimodalConfig(urls=shards, seq_len=64, shuffle_buffer=4), tokenizer)
    samples = list(ds)
    assert _keys(samples) == ["g0", "g1", "g2", "g3", "long", "v0"]
    by_key = {s["key"]: s for s in samples}
    g1 = by_key["g1"]
    assert tokenizer.decode(g1["input_ids"].tolist()) == "sample 1 text"
    (img,) = g1["images"]
    assert img.shape == (3, 4, 6)
    assert img.dtype == torch.uint8
    assert img[0].eq(40).all()
    assert img[1:].eq(0).all()
    assert torch.equal(g1["actions"], torch.ones(3, 2))
    assert by_key["v0"]["frames"].shape == (2, 4, 6, 3)
    assert by_key["long"]["input_ids"].numel() == 64  # truncated to seq_len, by policy
    assert ds.report.counts == {
        "corrupt shard": 1,
        "undecodable media": 1,
        "empty text": 1,
        "truncated sample": 1,
    }
    where = {r["reason"]: r["location"] for r in ds.report.records}
    assert where["corrupt shard"].endswith("shard-2.tar")
    assert where["undecodable media"].endswith("shard-1.tar:badimg")
    # The seeded shuffle buffer is reproducible.
    again = MultimodalDataset(
        MultimodalConfig(urls=shards, seq_len=64, shuffle_buffer=4), tokenizer
    )
    assert [s["key"] for s in again] == [s["key"] for s in samples]


def test_strict_mode_raises_naming_the_sample(shards, tokenizer):
    cfg = MultimodalConfig(urls=shards[1:2], seq_len=64, on_error="raise", overlong="skip")
    with pytest.raises(BadSampleError, match=r"undecodable media at .*shard-1.tar:badimg"):
        list(MultimodalDataset(cfg, tokenizer))
    cfg = MultimodalConfig(urls=shards[2:], seq_len=64, on_error="raise")
    with pytest.raises(BadSampleError, match=r"corrupt shard at .*shard-2.tar"):
        list(MultimodalDataset(cfg, tokenizer))


def test_ranks_and_workers_split_the_shards(shards, tokenizer):
    ranks = [
        _keys(
            MultimodalDataset(
                MultimodalConfig(
                    urls=shards[:2], seq_len=64, dp_rank=r, dp_size=2, overlong="skip"
                ),
                tokenizer,
            )
        )
        for r in range(2)
    ]
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == ["g0", "g1", "g2", "g3", "v0"]
    loader = torch.utils.data.DataLoader(
        MultimodalDataset(
            MultimodalConfig(urls=shards[:2], seq_len=64, overlong="skip"), tokenizer
        ),
        batch_size=None,
        num_workers=2,
    )
    assert _keys(loader) == ["g0", "g1", "g2", "g3", "v0"]
    with pytest.raises(ValueError, match="3 shards do not split evenly over dp_size=4"):
        MultimodalDataset(MultimodalConfig(urls=shards, seq_len=8, dp_size=4), tokenizer)
