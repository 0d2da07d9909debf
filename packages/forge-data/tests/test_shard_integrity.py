"""Damaged webdataset shards, epochs in persistent DataLoader workers and the rank split of
:class:`~forge_data.multimodal.MultimodalDataset`."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
import torch

from forge_data.multimodal import BadSampleError, MultimodalConfig, MultimodalDataset


@pytest.fixture(scope="module")
def whole_shard(tmp_path_factory, write_tar, png_bytes, npy_bytes):
    """Three samples; each holds its text, then its actions, then its image."""
    path = tmp_path_factory.mktemp("whole") / "shard.tar"
    files = [
        (
            f"s{i}",
            {
                "txt": f"sample {i}".encode(),
                "actions.npy": npy_bytes(np.full((2, 2), i, np.float32)),
                "png": png_bytes((i * 50, 0, 0), size=(8, 8)),
            },
        )
        for i in range(3)
    ]
    write_tar(path, files)
    return path.read_bytes()


def _cut_points(raw: bytes) -> dict[str, int]:
    header = raw.index(b"s2.png")  # the last member's header (its name is its first field)
    size = tarfile.TarInfo.frombuf(raw[header : header + 512], "utf-8", "strict").size
    data_end = header + 512 + -(-size // 512) * 512
    return {
        "between two members": header,  # s2.png's header lost: a clean member boundary
        "inside a member": header + 512 + 40,
        "before the end marker": data_end,  # every member whole, the end-of-archive marker lost
    }


@pytest.mark.parametrize(
    "where", ["between two members", "inside a member", "before the end marker"]
)
def test_a_truncated_shard_is_corrupt_counted_once_and_its_partial_sample_dropped(
    whole_shard, tmp_path, tokenizer, where
):
    path = tmp_path / "shard.tar"
    path.write_bytes(whole_shard[: _cut_points(whole_shard)[where]])
    ds = MultimodalDataset(
        MultimodalConfig(urls=[str(path)], seq_len=64, shuffle_shards=False), tokenizer
    )
    samples = list(ds)
    assert [s["key"] for s in samples] == ["s0", "s1"]  # s2 may lack files: dropped
    assert all("images" in s and "actions" in s for s in samples)
    assert ds.report.counts == {"corrupt shard": 1}
    assert ds.report.records[0]["location"] == str(path)  # the URL, not a reader object

    strict = MultimodalConfig(urls=[str(path)], seq_len=64, shuffle_shards=False, on_error="raise")
    with pytest.raises(BadSampleError) as raised:
        list(MultimodalDataset(strict, tokenizer))
    message = str(raised.value)
    assert message.startswith(f"corrupt shard at {path}: ")
    assert message.count("corrupt shard") == 1
    assert message.count("on_error") == 1
    assert "BufferedReader" not in message


def test_a_whole_shard_yields_every_sample(whole_shard, tmp_path, tokenizer):
    path = tmp_path / "shard.tar"
    path.write_bytes(whole_shard)
    ds = MultimodalDataset(
        MultimodalConfig(urls=[str(path)], seq_len=64, shuffle_shards=False, on_error="raise"),
        tokenizer,
    )
    assert [sorted(k for k in s if k in ("images", "actions")) for s in ds] == [
        ["actions", "images"]
    ] * 3


def test_set_epoch_reaches_persistent_dataloader_workers(tmp_path, write_tar, tokenizer):
    urls = []
    for s in range(6):
        urls.append(str(tmp_path / f"shard-{s}.tar"))
        write_tar(urls[-1], [(f"k{s}", {"txt": f"sample {s}".encode()})])
    ds = MultimodalDataset(MultimodalConfig(urls=urls, seq_len=32, shuffle_buffer=3), tokenizer)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=1, persistent_workers=True
    )
    orders = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        in_worker = [s["key"] for s in loader]
        assert in_worker == [s["key"] for s in ds], f"epoch {epoch}"  # as in this process
        orders.append(in_worker)
    assert len({tuple(o) for o in orders}) == 3  # every epoch its own order


def test_shards_must_split_evenly_over_ranks(tmp_path, write_tar, tokenizer):
    urls = []
    for s in range(3):
        urls.append(str(tmp_path / f"shard-{s}.tar"))
        write_tar(urls[-1], [(f"k{s}", {"txt": b"text"})])
    with pytest.raises(ValueError, match=r"3 shards do not split evenly over dp_size=2.*2 or 4"):
        MultimodalDataset(MultimodalConfig(urls=urls, seq_len=8, dp_size=2), tokenizer)
    counts = [
        len(
            list(
                MultimodalDataset(
                    MultimodalConfig(urls=urls, seq_len=8, dp_rank=r, dp_size=3), tokenizer
                )
            )
        )
        for r in range(3)
    ]
    assert counts == [1, 1, 1]
