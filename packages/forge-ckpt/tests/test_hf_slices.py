"""Reading boxes of checkpoint tensors (a rank's shard) without reading the rest."""

from __future__ import annotations

import pytest
import torch

from forge_ckpt.hf import HFCheckpoint, save_hf_checkpoint


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(6, 10, generator=g),
        "half": torch.randn(4, 3, 5, generator=g).to(torch.bfloat16),
        "ints": torch.arange(7, dtype=torch.int64),
        "scalar": torch.tensor(2.5),
    }


@pytest.fixture(params=["one_file", "sharded", "bin"])
def ckpt(request, tmp_path) -> HFCheckpoint:
    tensors = _tensors()
    if request.param == "bin":
        (tmp_path / "config.json").write_text("{}")
        torch.save(tensors, tmp_path / "pytorch_model.bin")
        return HFCheckpoint(tmp_path)
    limit = 100 if request.param == "sharded" else "1GB"
    out = save_hf_checkpoint(tmp_path / "ck", tensors, config={}, max_shard_size=limit)
    checkpoint = HFCheckpoint(out)
    assert (len(checkpoint.files) > 1) == (request.param == "sharded")
    return checkpoint


def test_slices_equal_indexing_the_full_tensor_and_bytes_are_counted(ckpt):
    full = _tensors()
    cases = [
        ("w", (slice(2, 5),)),  # FSDP rows
        ("w", (slice(None), slice(3, 8))),  # TP columns
        ("w", (slice(1, 1),)),  # an empty shard
        ("half", (slice(1, 3), slice(0, 3), slice(2, 5))),
        ("ints", (slice(4, 7),)),
        ("scalar", ()),
        ("w", ()),
    ]
    with ckpt.slice_reader() as reader:
        expected_bytes = 0
        for name, index in cases:
            got = reader.read(name, index)
            want = full[name][index]
            assert got.dtype == want.dtype, (name, index)
            assert torch.equal(got, want), (name, index)
            expected_bytes += want.numel() * want.element_size()
        assert reader.bytes_read == expected_bytes
    assert torch.equal(ckpt.read_slice("w", (slice(0, 2),)), full["w"][:2])


def test_bad_slices_say_what_is_wrong(ckpt):
    with pytest.raises(KeyError, match="no tensor named 'nope'"):
        ckpt.read_slice("nope")
    with pytest.raises(ValueError, match="outside its extent 6"):
        ckpt.read_slice("w", (slice(4, 7),))
    with pytest.raises(ValueError, match="step 1"):
        ckpt.read_slice("w", (slice(0, 6, 2),))
    with pytest.raises(ValueError, match="has 1 dims"):
        ckpt.read_slice("ints", (slice(0, 1), slice(0, 1)))
    with pytest.raises(TypeError, match="slice"):
        ckpt.read_slice("w", (3,))


def test_read_into_goes_straight_from_the_file_for_contiguous_boxes(ckpt):
    """A contiguous box (rows, or a single leading index with whole trailing dims) of a
    safetensors tensor is read with preadv into the target; any other box, target dtype or
    layout is read and copied. Both give ``tensor[index]`` and count the bytes."""
    full = _tensors()
    cases = [  # (name, index, direct)
        ("w", (slice(2, 5),), True),  # FSDP / column-parallel rows
        ("w", (slice(None), slice(3, 8)), False),  # row-parallel columns: strided
        ("w", (slice(3, 4), slice(2, 6)), True),  # part of one row
        ("half", (slice(1, 2), slice(1, 3)), True),  # one index, rows of the next dim
        ("half", (slice(1, 3), slice(0, 3), slice(2, 5)), False),
        ("ints", (slice(4, 7),), True),
        ("scalar", (), False),
    ]
    with ckpt.slice_reader() as reader:
        expected_bytes = 0
        for name, index, direct in cases:
            want = full[name][index]
            out = torch.full_like(want, 7)
            direct = direct and ckpt.format == "safetensors"  # .bin files are mapped
            assert reader.read_into(name, index, out) is direct, (name, index)
            assert torch.equal(out, want), (name, index)
            expected_bytes += want.numel() * want.element_size()
        assert reader.bytes_read == expected_bytes
        # Another dtype, or a non-contiguous target: read and cast / copied.
        out = torch.zeros(3, 10, dtype=torch.float64)
        assert reader.read_into("w", (slice(2, 5),), out) is False
        assert torch.equal(out, full["w"][2:5].double())
        out = torch.zeros(10, 3).t()
        assert reader.read_into("w", (slice(0, 3),), out) is False
        assert torch.equal(out, full["w"][:3])
        with pytest.raises(ValueError, match="target of shape"):
            reader.read_into("w", (slice(0, 2),), torch.zeros(5))
    assert reader._fds == {}  # closed with the reader
