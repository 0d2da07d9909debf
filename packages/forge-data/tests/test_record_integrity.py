"""Damaged inputs named where they are: jsonl lines that are not UTF-8, damaged indexed shard
files; and the bound the blend schedule keeps."""

from __future__ import annotations

import numpy as np
import pytest

from forge_data.indexed import IndexedDataset, IndexedDatasetWriter
from forge_data.mixture import blend_schedule
from forge_data.preprocess import PreprocessConfig, preprocess


def test_a_jsonl_line_that_is_not_utf8_is_counted_or_raised_at_its_line(tmp_path, tokenizer):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"text": "good line"}\n{"text": "bad \xff\xfe bytes"}\n{"text": "more"}\n')
    manifest = preprocess(
        PreprocessConfig(inputs=[path], output_dir=tmp_path / "skip", progress=False), tokenizer
    )
    assert manifest["documents"] == 2
    assert manifest["skipped"]["by_reason"] == {"not UTF-8": 1}
    assert manifest["skipped"]["records"][0]["location"] == f"{path}:2"
    strict = PreprocessConfig(
        inputs=[path], output_dir=tmp_path / "raise", on_error="raise", progress=False
    )
    with pytest.raises(ValueError, match=rf"{path}:2: not UTF-8"):
        preprocess(strict, tokenizer)


def _shard(tmp_path) -> str:
    prefix = str(tmp_path / "shard")
    with IndexedDatasetWriter(prefix, dtype=np.uint16, with_mask=True) as writer:
        for i in range(20):
            writer.add(np.arange(10 + i) + i, np.ones(10 + i, np.uint8))
    return prefix


def _truncate(path: str, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def _offset_5_too_large(prefix: str) -> None:
    with open(prefix + ".idx", "r+b") as f:
        f.seek(32 + 8 * 5)
        f.write(np.int64(10**6).tobytes())


DAMAGE = {
    "idx cut inside an offset": (
        lambda p: _truncate(p + ".idx", 32 + 8 * 21 - 3),
        r"shard\.idx declares 20 documents, so 21 offsets .* holds 165 bytes",
    ),
    "mask cut in half": (
        lambda p: _truncate(p + ".mask.bin", 195),
        r"shard\.mask\.bin should hold one loss-mask byte per token, 390 bytes, but holds 195",
    ),
    "mask empty": (lambda p: _truncate(p + ".mask.bin", 0), r"shard\.mask\.bin .* holds 0:"),
    "offsets decrease": (_offset_5_too_large, r"shard\.idx: token offsets .* document 5"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_indexed_shard_is_refused_when_opened_naming_the_file(tmp_path, damage):
    prefix = _shard(tmp_path)
    assert len(IndexedDataset(prefix)) == 20
    damage_fn, message = DAMAGE[damage]
    damage_fn(prefix)
    with pytest.raises(ValueError, match=message) as raised:
        IndexedDataset(prefix)
    assert str(raised.value).endswith("rerun forge-preprocess")


def test_no_blend_prefix_is_a_whole_document_ahead_of_its_share():
    worst_lag = 0.0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        k = int(rng.integers(2, 12))
        weights = rng.random(k) ** 3
        weights /= weights.sum()
        which, _ = blend_schedule([50] * k, weights, 300, seed=seed)
        counts = np.cumsum(np.eye(k)[which], axis=0)
        ahead = counts - np.outer(np.arange(1, 301), weights)
        assert ahead.max() <= 1 - 1 / k + 1e-9
        assert -ahead.min() < k - 1
        worst_lag = max(worst_lag, -ahead.min())
    assert worst_lag > 1  # the lag side has no bound of one document: the docs must not claim one
