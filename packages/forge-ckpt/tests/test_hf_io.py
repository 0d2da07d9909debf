"""Hugging Face folder reading and writing: sharding, index, streaming, atomicity, safe loading."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from forge_ckpt.hf import HFCheckpoint, parse_size, read_hf_config, save_hf_checkpoint, shard_name


def _tensors(n: int = 6, numel: int = 100) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {f"t{i}.weight": torch.randn(numel, generator=g) for i in range(n)}
    out["half"] = torch.randn(3, 5, generator=g).to(torch.bfloat16)
    out["ints"] = torch.arange(7, dtype=torch.int64)
    return out


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize(("limit", "n_files"), [("5GB", 1), (1000, 3), (1, 8)])
def test_write_then_read_round_trip(tmp_path, limit, n_files):
    tensors = _tensors()
    out = save_hf_checkpoint(
        tmp_path / "ckpt", tensors, config={"model_type": "x", "a": [1, 2]}, max_shard_size=limit
    )
    files = sorted(p.name for p in out.iterdir())
    if n_files == 1:
        assert files == ["config.json", "model.safetensors"]
    else:
        assert "model.safetensors.index.json" in files
        shards = [f for f in files if f.startswith("model-")]
        assert shards == [shard_name(k, n_files) for k in range(1, n_files + 1)]
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(tensors)
        assert index["metadata"]["total_size"] == sum(
            t.numel() * t.element_size() for t in tensors.values()
        )
    ckpt = HFCheckpoint(out)
    assert ckpt.config == {"model_type": "x", "a": [1, 2]}
    assert ckpt.names() == sorted(tensors)
    info = ckpt.tensor_info()
    assert info["half"].shape == (3, 5)
    assert info["half"].dtype == "BF16"
    _assert_same(dict(ckpt.iter_tensors()), tensors)
    assert torch.equal(ckpt.get_tensor("ints"), tensors["ints"])


def test_streaming_reads_file_by_file(tmp_path):
    tensors = _tensors()
    out = save_hf_checkpoint(tmp_path / "c", tensors, max_shard_size=1000)
    ckpt = HFCheckpoint(out)
    files = [ckpt.tensor_info()[name].file for name, _ in ckpt.iter_tensors()]
    # Each file is visited once, in order: the sequence of files is sorted and has no revisits.
    assert files == sorted(files)
    subset = dict(ckpt.iter_tensors(["t3.weight", "ints"]))
    assert sorted(subset) == ["ints", "t3.weight"]
    with pytest.raises(KeyError, match="nope"):
        list(ckpt.iter_tensors(["nope"]))


def test_views_and_non_contiguous_tensors_are_saved_by_value(tmp_path):
    base = torch.arange(24.0).reshape(4, 6)
    gate, up = base.split(2, dim=0)  # views sharing one storage
    tensors = {"gate": gate, "up": up, "t": base.t()}
    out = save_hf_checkpoint(tmp_path / "c", tensors)
    _assert_same(
        dict(HFCheckpoint(out).iter_tensors()), {k: v.contiguous() for k, v in tensors.items()}
    )


def test_tied_tensors_are_each_saved_by_value(tmp_path):
    w = torch.arange(12.0).reshape(4, 3)
    tensors = {"embed.weight": w, "lm_head.weight": w, "flat": w.view(12), "other": torch.ones(2)}
    out = save_hf_checkpoint(tmp_path / "c", tensors)
    _assert_same(dict(HFCheckpoint(out).iter_tensors()), tensors)
    assert tensors["embed.weight"] is w  # the caller's tensors are not touched


def _write_raw_safetensors(folder, header: dict, data: bytes) -> None:
    folder.mkdir()
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (folder / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize(
    ("header", "error"),
    [
        # 'a' claims 8 floats but its offsets cover 4: a reader trusting them returns b's bytes
        ({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 16]},
          "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}, r"'a' claims F32 shape \[8\]"),
        ({"a": {"dtype": "F32", "shape": [4]}}, "'a' has no 'data_offsets'"),
        ({"a": {"dtype": "F33", "shape": [4], "data_offsets": [0, 16]}}, "'a' has unknown dtype 'F33'"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
          "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, "'b'.*overlaps tensor 'a'"),
        ({"a": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]}}, "'a'.*truncated"),
        ({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, "'a' has shape"),
    ],
)  # fmt: skip
def test_corrupt_safetensors_header_is_refused(tmp_path, header, error):
    _write_raw_safetensors(tmp_path / "c", header, torch.arange(8.0).numpy().tobytes())
    with pytest.raises(
        ValueError, match=rf"model\.safetensors has a corrupt safetensors header: tensor {error}"
    ):
        HFCheckpoint(tmp_path / "c").tensor_info()


def test_write_is_atomic_on_failure(tmp_path):
    def broken():
        yield "a", torch.ones(10)
        yield "b", torch.ones(10)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        save_hf_checkpoint(tmp_path / "ckpt", broken(), max_shard_size=40)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one


def test_overwrite_rules(tmp_path):
    out = save_hf_checkpoint(tmp_path / "c", {"a": torch.ones(2)})
    with pytest.raises(ValueError, match="overwrite=True"):
        save_hf_checkpoint(out, {"a": torch.zeros(2)})
    save_hf_checkpoint(out, {"b": torch.zeros(3)}, overwrite=True)
    assert HFCheckpoint(out).names() == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no backup or temp left
    empty = tmp_path / "empty"
    empty.mkdir()
    save_hf_checkpoint(empty, {"a": torch.ones(1)}, extra_files={"generation_config.json": "{}"})
    assert (empty / "generation_config.json").read_text() == "{}"


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="twice"):
        save_hf_checkpoint(tmp_path / "a", [("x", torch.ones(1)), ("x", torch.ones(1))])
    with pytest.raises(ValueError, match="meta"):
        save_hf_checkpoint(tmp_path / "b", {"x": torch.empty(2, device="meta")})
    with pytest.raises(ValueError, match="no tensors"):
        save_hf_checkpoint(tmp_path / "c", {})
    assert list(tmp_path.iterdir()) == []


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5kb") == 1500
    assert parse_size(123) == 123
    for bad in ("5 parsecs", "", 0, -1, True):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


def test_missing_folder_config_and_shards(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFCheckpoint(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match="no weights"):
        HFCheckpoint(tmp_path / "x")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        read_hf_config(tmp_path / "x")
    out = save_hf_checkpoint(tmp_path / "s", _tensors(), max_shard_size=1000)
    (out / shard_name(2, 3)).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        HFCheckpoint(out)


def test_index_pointing_at_absent_tensor(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "model-00001-of-00001.safetensors")
    index = {
        "weight_map": {
            "a": "model-00001-of-00001.safetensors",
            "b": "model-00001-of-00001.safetensors",
        }
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="not in their shard"):
        HFCheckpoint(tmp_path).tensor_info()


def test_legacy_bin_is_read_without_pickle_code(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    ckpt = HFCheckpoint(tmp_path)
    assert ckpt.format == "bin"
    _assert_same(dict(ckpt.iter_tensors()), tensors)
    with pytest.raises(ValueError, match="allow_bin"):
        HFCheckpoint(tmp_path, allow_bin=False)

    class Evil:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    torch.save({"a": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        HFCheckpoint(tmp_path).tensor_info()


def test_read_into_reads_straight_into_place_or_copies(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(4, 6, generator=gen),
        "b": torch.randn(3, 6, generator=gen).to(torch.bfloat16),
        "flags": torch.tensor([True, False, True]),
    }
    ckpt = HFCheckpoint(save_hf_checkpoint(tmp_path / "m", tensors, max_shard_size=64))
    assert len(ckpt.files) > 1
    out = torch.full((10, 6), float("nan"))
    ckpt.read_into("a", out[3:7])  # a contiguous view at an offset: read from the file
    assert torch.equal(out[3:7], tensors["a"])
    assert out[:3].isnan().all()
    assert out[7:].isnan().all()
    ckpt.read_into("b", out[7:10])  # bfloat16 into float32: read and cast
    assert torch.equal(out[7:10], tensors["b"].float())
    wide = torch.zeros(6, 4)
    ckpt.read_into("a", wide.t())  # not contiguous: copied
    assert torch.equal(wide.t(), tensors["a"])
    flat = torch.zeros(24)
    ckpt.read_into("a", flat)  # same elements, row-major
    assert torch.equal(flat, tensors["a"].flatten())
    flags = torch.zeros(3, dtype=torch.bool)
    ckpt.read_into("flags", flags)
    assert torch.equal(flags, tensors["flags"])
    with pytest.raises(
        ValueError, match=r"shape \[4, 6\], which does not fit a target of shape \[5\]"
    ):
        ckpt.read_into("a", torch.zeros(5))
    with pytest.raises(KeyError, match="no tensor named 'c'"):
        ckpt.read_into("c", torch.zeros(5))
