"""Read rectangular slices of checkpoint tensors: each rank of a parallel job reads its shard.

A process that holds one shard of a tensor (an FSDP row block, a tensor-parallel column block,
the experts of its expert-parallel rank) needs only those bytes. ``safetensors``'
``safe_open(...).get_slice(name)[a:b, c:d]`` copies just that box out of the memory-mapped
file, without reading the rest of the tensor; :class:`SliceReader` does this for any tensor of
an :class:`~forge_ckpt.hf.HFCheckpoint`, keeps each file open across reads (opening parses the
header), and counts the bytes it returns, so a loader can report, and a test can check, that a
rank read about its share. Legacy ``pytorch_model*.bin`` files are memory-mapped
(``torch.load(mmap=True, weights_only=True)``) and sliced the same way.

:meth:`SliceReader.read_into` reads a box that is one contiguous byte range of the file (rows
``a:b`` of a row-major tensor, or any box whose leading dims are single indices and trailing
dims whole) straight into the destination with ``preadv``, without mapping the file: a rank's
FSDP or column-parallel shard of a tensor usually is such a range.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

if TYPE_CHECKING:
    from forge_ckpt.hf.io import HFCheckpoint

__all__ = ["SliceReader", "contiguous_range", "preadv_into"]


def preadv_into(fd: int, out: torch.Tensor, offset: int, what: str | Path) -> None:
    """Fill the contiguous CPU tensor ``out`` with its size in bytes read from ``fd`` at
    ``offset`` (``preadv`` straight into its memory, looping over short reads)."""
    nbytes = out.numel() * out.element_size()
    view = memoryview(out.detach().reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < nbytes:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise ValueError(f"{what} ends inside the tensor being read")
        done += got


def contiguous_range(shape: Sequence[int], slices: Sequence[slice]) -> tuple[int, int] | None:
    """``(first element, element count)`` of the box ``slices`` of a row-major tensor of
    ``shape`` when the box is one contiguous range of it, else ``None``."""
    dims = len(shape)
    # Trailing dims read whole; before the first partial one from the right, single indices.
    d = dims - 1
    while d >= 0 and slices[d].start == 0 and slices[d].stop == shape[d]:
        d -= 1
    if any(slices[k].stop - slices[k].start != 1 for k in range(d)):
        return None
    strides = [math.prod(shape[k + 1 :]) for k in range(dims)]
    first = sum(slices[k].start * strides[k] for k in range(dims))
    return first, math.prod(s.stop - s.start for s in slices)


def _check_slices(name: str, shape: tuple[int, ...], index: Sequence[slice]) -> list[slice]:
    """``index`` as one ``slice(start, stop)`` per dim (missing trailing dims: whole)."""
    if len(index) > len(shape):
        raise ValueError(
            f"{name} has {len(shape)} dims (shape {list(shape)}) but the slice has {len(index)}"
        )
    out = []
    for dim, size in enumerate(shape):
        s = index[dim] if dim < len(index) else slice(None)
        if not isinstance(s, slice):
            raise TypeError(
                f"{name}: slice dim {dim} with slice(start, stop) objects, got {type(s).__name__}"
            )
        if s.step not in (None, 1):
            raise ValueError(f"{name}: only contiguous slices (step 1) are read, got {s}")
        start = 0 if s.start is None else s.start
        stop = size if s.stop is None else s.stop
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= size):
            raise ValueError(
                f"{name}: slice {start}:{stop} of dim {dim} is outside its extent {size} "
                "(use non-negative bounds with start <= stop <= extent)"
            )
        out.append(slice(start, stop))
    return out


class SliceReader:
    """Reads boxes of tensors of one checkpoint, files kept open until :meth:`close`.

    Use as a context manager (``with ckpt.slice_reader() as reader: reader.read(name, (slice(0,
    4),))``). :attr:`bytes_read` sums the sizes of the tensors returned so far.
    """

    def __init__(self, checkpoint: HFCheckpoint) -> None:
        self.checkpoint = checkpoint
        self.bytes_read = 0
        self._open: dict[str, Any] = {}
        self._fds: dict[str, int] = {}

    def read(self, name: str, index: Sequence[slice] = ()) -> torch.Tensor:
        """``tensor[index]`` of checkpoint tensor ``name``, reading only those elements.

        ``index``: one ``slice(start, stop)`` per leading dim (step 1, bounds within the
        tensor); dims it leaves out are read whole, so ``()`` reads the whole tensor. Returns
        a CPU tensor in the checkpoint's dtype; from safetensors it may be a view of the
        memory-mapped file (pages are read when its values are used, e.g. copied into place),
        which stays valid after :meth:`close`.
        """
        info = self.checkpoint.tensor_info().get(name)
        if info is None:
            raise KeyError(f"{self.checkpoint.path} has no tensor named {name!r}")
        slices = _check_slices(name, tuple(info.shape), tuple(index))
        handle = self._handle(info.file)
        if self.checkpoint.format == "safetensors":
            if not slices:  # a 0-dim tensor
                tensor = handle.get_tensor(name)
            else:
                tensor = handle.get_slice(name)[tuple(slices)]
        else:
            tensor = handle[name][tuple(slices)].clone(memory_format=torch.contiguous_format)
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def read_into(self, name: str, index: Sequence[slice], out: torch.Tensor) -> bool:
        """Fill ``out`` (as many elements, row-major) with ``tensor[index]`` of checkpoint
        tensor ``name``; returns whether the bytes went straight from the file into ``out``.

        Direct (one ``preadv``, no mapping) when the box is one contiguous byte range of a
        safetensors file and ``out`` is a contiguous CPU tensor of the checkpoint's dtype;
        otherwise the box is read with :meth:`read` and copied (cast to ``out``'s dtype).
        """
        info = self.checkpoint.tensor_info().get(name)
        if info is None:
            raise KeyError(f"{self.checkpoint.path} has no tensor named {name!r}")
        slices = _check_slices(name, tuple(info.shape), tuple(index))
        span = contiguous_range(tuple(info.shape), slices) if slices else None
        if span is None or span[1] != out.numel():
            return self._copy_into(name, slices, out)
        from forge_ckpt.hf.io import _SAFETENSORS_DTYPES

        direct = (
            self.checkpoint.format == "safetensors"
            and info.offset is not None
            and out.numel() > 0
            and out.device.type == "cpu"
            and out.is_contiguous()
            and _SAFETENSORS_DTYPES.get(info.dtype) == out.dtype
        )
        if not direct:
            return self._copy_into(name, slices, out)
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(self.checkpoint.path / info.file, os.O_RDONLY)
        preadv_into(fd, out, info.offset + span[0] * out.element_size(), info.file)
        self.bytes_read += out.numel() * out.element_size()
        return True

    def _copy_into(self, name: str, slices: Sequence[slice], out: torch.Tensor) -> bool:
        box = self.read(name, slices)
        if box.numel() != out.numel():
            raise ValueError(
                f"{name}[{', '.join(f'{s.start}:{s.stop}' for s in slices)}] has {box.numel()} elements; "
                f"the target of shape {list(out.shape)} has {out.numel()}"
            )
        with torch.no_grad():
            out.copy_(box.reshape(out.shape))
        return False

    def _handle(self, file: str) -> Any:
        handle = self._open.get(file)
        if handle is None:
            path = self.checkpoint.path / file
            if self.checkpoint.format == "safetensors":
                handle = safe_open(path, framework="pt", device="cpu")
            else:
                handle = self.checkpoint._load_bin(file)  # memory-mapped, weights_only
            self._open[file] = handle
        return handle

    def close(self) -> None:
        """Release the open files (the memory maps go with the handles)."""
        self._open.clear()
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> SliceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"SliceReader({str(self.checkpoint.path)!r}, open_files={len(self._open)}, "
            f"bytes_read={self.bytes_read})"
        )
