"""A memory-mappable indexed token dataset: one ``.bin`` of token ids, one ``.idx`` of offsets.

The layout of Megatron-LM's ``MMapIndexedDataset`` (Shoeybi et al. 2019, "Megatron-LM"), reduced
to what packing needs: ``<prefix>.bin`` is every document's token ids back to back (``uint16``
when the vocabulary fits, else ``uint32``); ``<prefix>.idx`` is a 32-byte header (magic, version,
dtype code, document count) followed by ``count + 1`` ``int64`` token offsets. An optional
``<prefix>.mask.bin`` holds one ``uint8`` loss-mask value per token (SFT). Opening a shard maps it;
reading document ``i`` is a slice of the map, with no parsing and no copy. Opening checks what
is cheap to check (file sizes against the header and the last offset, offsets starting at 0 and
never decreasing: one pass over the offsets) and names the damaged file.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

__all__ = ["IndexedDataset", "IndexedDatasetWriter", "dtype_for_vocab"]

_MAGIC = b"FRGIDX\x00\x00"
_VERSION = 1
_HEADER = struct.Struct("<8sIIQQ")  # magic, version, dtype code, count, reserved
_DTYPES = {1: np.dtype(np.uint16), 2: np.dtype(np.uint32)}
_CODES = {v: k for k, v in _DTYPES.items()}


def _path(prefix: Path, ext: str) -> Path:
    return prefix.with_name(prefix.name + ext)


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest token dtype that holds ids below ``vocab_size``."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return _DTYPES[1] if vocab_size <= 1 << 16 else _DTYPES[2]


class IndexedDatasetWriter:
    """Append documents to ``<prefix>.bin``; :meth:`close` writes ``<prefix>.idx``."""

    def __init__(self, prefix: str | os.PathLike, *, dtype: np.dtype, with_mask: bool = False):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODES:
            raise ValueError(f"token dtype must be uint16 or uint32, got {self.dtype}")
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin = open(_path(self.prefix, ".bin"), "wb")  # noqa: SIM115 - closed in close()
        self._mask = (
            open(_path(self.prefix, ".mask.bin"), "wb")  # noqa: SIM115
            if with_mask
            else None
        )
        self._offsets = [0]

    def add(self, ids, loss_mask=None) -> None:
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"a document is a 1-D sequence of token ids, got shape {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(self.dtype).max):
            raise ValueError(
                f"token ids in [{arr.min()}, {arr.max()}] do not fit {self.dtype}: "
                "pass dtype=dtype_for_vocab(vocab_size)"
            )
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes())
        if self._mask is not None:
            if loss_mask is None or len(loss_mask) != arr.size:
                raise ValueError(
                    f"this writer stores loss masks: pass one of length {arr.size} per document"
                )
            self._mask.write(np.asarray(loss_mask, dtype=np.uint8).tobytes())
        self._offsets.append(self._offsets[-1] + arr.size)

    def close(self) -> None:
        self._bin.close()
        if self._mask is not None:
            self._mask.close()
        count = len(self._offsets) - 1
        with open(_path(self.prefix, ".idx"), "wb") as f:
            f.write(_HEADER.pack(_MAGIC, _VERSION, _CODES[self.dtype], count, 0))
            f.write(np.asarray(self._offsets, dtype=np.int64).tobytes())

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class IndexedDataset:
    """Read-only memory map of a shard written by :class:`IndexedDatasetWriter`."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = Path(prefix)
        idx = _path(self.prefix, ".idx")
        if not idx.exists():
            raise ValueError(f"{idx} does not exist: is {self.prefix} an indexed-dataset prefix?")
        with open(idx, "rb") as f:
            raw = f.read(_HEADER.size)
        if len(raw) < _HEADER.size:
            raise ValueError(f"{idx} is truncated ({len(raw)} bytes): rerun forge-preprocess")
        magic, version, code, count, _ = _HEADER.unpack(raw)
        if magic != _MAGIC or version != _VERSION or code not in _DTYPES:
            raise ValueError(
                f"{idx} is not a forge indexed dataset (magic {magic!r}, version {version})"
            )
        self.dtype = _DTYPES[code]
        rerun = "the shard is damaged: rerun forge-preprocess"
        offset_bytes = idx.stat().st_size - _HEADER.size
        if offset_bytes != (count + 1) * 8:
            raise ValueError(
                f"{idx} declares {count} documents, so {count + 1} offsets of 8 bytes, but holds "
                f"{offset_bytes} bytes after its header: {rerun}"
            )
        self.offsets = np.memmap(idx, dtype=np.int64, mode="r", offset=_HEADER.size)
        if self.offsets[0] != 0 or (self.offsets[1:] < self.offsets[:-1]).any():
            bad = np.flatnonzero(np.diff(self.offsets) < 0)
            what = "the first offset is not 0" if self.offsets[0] else f"document {bad[0]}"
            raise ValueError(
                f"{idx}: token offsets must start at 0 and never decrease; {what} breaks that: "
                f"{rerun}"
            )
        n_tokens = int(self.offsets[-1])
        bin_path = _path(self.prefix, ".bin")
        expected = n_tokens * self.dtype.itemsize
        if not bin_path.exists() or bin_path.stat().st_size != expected:
            raise ValueError(
                f"{bin_path} should hold {n_tokens} tokens ({expected} bytes): rerun forge-preprocess"
            )
        mask_path = _path(self.prefix, ".mask.bin")
        if mask_path.exists() and mask_path.stat().st_size != n_tokens:
            raise ValueError(
                f"{mask_path} should hold one loss-mask byte per token, {n_tokens} bytes, but "
                f"holds {mask_path.stat().st_size}: {rerun}"
            )
        self._tokens = (
            np.memmap(bin_path, dtype=self.dtype, mode="r") if n_tokens else np.zeros(0, self.dtype)
        )
        self._mask = (
            np.memmap(mask_path, dtype=np.uint8, mode="r")
            if mask_path.exists() and n_tokens
            else None
        )

    def __len__(self) -> int:
        return self.offsets.size - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def has_loss_mask(self) -> bool:
        return self._mask is not None

    @property
    def tokens(self) -> np.ndarray:
        """Every document's token ids back to back (a plain view of the map, cheap to slice)."""
        return self._tokens.view(np.ndarray)

    @property
    def masks(self) -> np.ndarray | None:
        """Every token's loss-mask value (``uint8``), or ``None`` without a mask file."""
        return None if self._mask is None else self._mask.view(np.ndarray)

    def __getitem__(self, i: int) -> np.ndarray:
        return self._tokens[self.offsets[i] : self.offsets[i + 1]]

    def loss_mask(self, i: int) -> np.ndarray | None:
        if self._mask is None:
            return None
        return self._mask[self.offsets[i] : self.offsets[i + 1]]
