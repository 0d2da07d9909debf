"""The file layout of a Hugging Face checkpoint folder: shard names, the index, header metadata.

A Hugging Face model folder holds ``config.json`` and its weights either in one
``model.safetensors`` or in shards ``model-00001-of-0000N.safetensors`` listed by
``model.safetensors.index.json``::

    {"metadata": {"total_size": <bytes>}, "weight_map": {"<tensor name>": "<shard file>", ...}}

Legacy PyTorch pickles follow the same pattern with ``pytorch_model*.bin``. A safetensors file
starts with an 8-byte little-endian header length and a JSON header giving each tensor's
``dtype``, ``shape`` and ``data_offsets``, so names and shapes are known without reading data.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "SAFE_INDEX",
    "SAFE_SINGLE",
    "TensorInfo",
    "parse_size",
    "read_index",
    "read_safetensors_header",
    "shard_name",
]

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


@dataclass(frozen=True)
class TensorInfo:
    """What a checkpoint header says about one tensor (no data read)."""

    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code ("F32", "BF16", ...) or a torch dtype name for .bin
    file: str
    #: Byte range of the data in ``file`` (safetensors only): start offset and length.
    offset: int | None = None
    nbytes: int | None = None


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string such as ``"5GB"`` (10**9) or ``"512MiB"`` (2**20).

    Decimal units follow transformers' ``max_shard_size`` convention.
    """
    if isinstance(size, bool):
        raise ValueError(f"a size must be an int or a string like '5GB', got {size!r}")
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"a size must be positive, got {size}")
        return size
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(
            f"cannot read size {size!r}: use an int (bytes) or a number with one of the units "
            "B, KB, MB, GB, TB (powers of 10) or KiB, MiB, GiB, TiB (powers of 2)"
        )
    value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"a size must be positive, got {size!r}")
    return value


def shard_name(
    index: int, total: int, *, prefix: str = "model", suffix: str = "safetensors"
) -> str:
    """``model-00001-of-00003.safetensors`` for ``index=1, total=3`` (1-based, as transformers)."""
    return f"{prefix}-{index:05d}-of-{total:05d}.{suffix}"


def read_index(path: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of an index json, validated."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ValueError(
            f"{path} has no valid 'weight_map' (a mapping of tensor name -> shard file name)"
        )
    for file in set(weight_map.values()):
        if Path(file).name != file:
            raise ValueError(f"{path} names a shard outside the folder: {file!r}")
    return dict(weight_map)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Name -> :class:`TensorInfo` of every tensor in a safetensors file, from its header only."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 * 2**20:
            raise ValueError(f"{path}: safetensors header of {length} bytes is implausibly large")
        header = f.read(length)
    try:
        entries = json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} has a corrupt safetensors header: {exc}") from None
    start = 8 + length  # the data section follows the header
    return {
        name: TensorInfo(
            shape=tuple(entry["shape"]),
            dtype=entry["dtype"],
            file=path.name,
            offset=start + entry["data_offsets"][0],
            nbytes=entry["data_offsets"][1] - entry["data_offsets"][0],
        )
        for name, entry in entries.items()
        if name != "__metadata__"
    }
