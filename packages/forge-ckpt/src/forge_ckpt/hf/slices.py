"""Read rectangular slices of checkpoint tensors: each rank of a parallel job reads its shard.

A process that holds one shard of a tensor (an FSDP row block, a tensor-parallel column block,
the experts of its expert-parallel rank) needs only those bytes. ``safetensors``'
``safe_open(...).get_slice(name)[a:b, c:d]`` copies just that box out of the memory-mapped
file, without reading the rest of the tensor; :class:`SliceReader` does this for any tensor of
an :class:`~forge_ckpt.hf.HFCheckpoint`, keeps each file open across reads (opening parses the
header), and counts the bytes it returns, so a loader can report, and a test can check, that a
rank read about its share. Legacy ``pytorch_model*.bin`` files are memory-mapped
(``torch.load(mmap=True, weights_only=True)``) and sliced the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

if TYPE_CHECKING:
    from forge_ckpt.hf.io import HFCheckpoint

__all__ = ["SliceReader"]


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

    def __enter__(self) -> SliceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"SliceReader({str(self.checkpoint.path)!r}, open_files={len(self._open)}, "
            f"bytes_read={self.bytes_read})"
        )
