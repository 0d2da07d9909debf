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
import math
import os
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


#: Bits per element of every safetensors dtype code (the safetensors format's ``Dtype``).
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entry(path: Path, name: str, entry: object, data_size: int) -> tuple[int, int]:
    """``(begin, end)`` of tensor ``name``'s bytes in the data section, after checking that its
    header entry is well formed: a known dtype, a shape, and ``data_offsets`` that cover exactly
    ``prod(shape)`` elements and lie inside the ``data_size`` bytes the file holds."""

    def bad(why: str) -> ValueError:
        return ValueError(
            f"{path} has a corrupt safetensors header: tensor {name!r} {why}; the file is "
            "damaged or was not written by a safetensors writer (re-download or re-save it)"
        )

    if not isinstance(entry, dict):
        raise bad(f"is described by {type(entry).__name__}, not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise bad(f"has no {key!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    bits = SAFETENSORS_DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
    if bits is None:
        raise bad(f"has unknown dtype {dtype!r} (known: {', '.join(SAFETENSORS_DTYPE_BITS)})")
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise bad(f"has shape {shape!r}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise bad(f"has data_offsets {offsets!r}, not [begin, end]")
    begin, end = offsets
    numel = math.prod(shape)
    if end < begin or (end - begin) * 8 != numel * bits:
        raise bad(
            f"claims {dtype} shape {shape} ({numel * bits / 8:g} bytes) but its data_offsets "
            f"[{begin}, {end}] cover {end - begin} bytes"
        )
    if end > data_size:
        raise bad(
            f"has data_offsets [{begin}, {end}] past the end of the data ({data_size} bytes): "
            "the file is truncated"
        )
    return begin, end


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Name -> :class:`TensorInfo` of every tensor in a safetensors file, from its header only.

    Every entry is checked (one pass over the header, no tensor data read): a known dtype,
    ``data_offsets`` covering exactly ``prod(shape)`` elements, inside the file and not
    overlapping another tensor's; a :class:`ValueError` naming the file and the tensor
    otherwise, since readers that trust the offsets would return another tensor's bytes.
    """
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 * 2**20:
            raise ValueError(f"{path}: safetensors header of {length} bytes is implausibly large")
        header = f.read(length)
        file_size = os.fstat(f.fileno()).st_size
    try:
        entries = json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} has a corrupt safetensors header: {exc}") from None
    if not isinstance(entries, dict):
        raise ValueError(f"{path} has a corrupt safetensors header: not a JSON object")
    start = 8 + length  # the data section follows the header
    data_size = max(file_size - start, 0)
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in entries.items():
        if name == "__metadata__":
            continue
        begin, end = _check_entry(path, name, entry, data_size)
        spans.append((begin, end, name))
        infos[name] = TensorInfo(
            shape=tuple(entry["shape"]),
            dtype=entry["dtype"],
            file=path.name,
            offset=start + begin,
            nbytes=end - begin,
        )
    spans.sort()
    prev_end, prev = 0, ""  # the furthest end so far, and whose
    for begin, end, name in spans:
        if end == begin:
            continue  # an empty tensor holds no bytes
        if begin < prev_end:
            raise ValueError(
                f"{path} has a corrupt safetensors header: tensor {name!r} (data_offsets "
                f"[{begin}, {end}]) overlaps tensor {prev!r} (ending at {prev_end}); the file is "
                "damaged or was not written by a safetensors writer (re-download or re-save it)"
            )
        prev_end, prev = end, name
    return infos
