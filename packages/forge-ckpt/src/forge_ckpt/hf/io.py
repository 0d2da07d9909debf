"""Read and write Hugging Face checkpoint folders, one shard at a time, without pickle.

Reading (:class:`HFCheckpoint`): ``config.json`` plus ``model.safetensors``, or shards listed by
``model.safetensors.index.json``. Names and shapes come from the safetensors headers alone;
tensors are read with ``safetensors.safe_open`` one at a time, file after file, so a loader can
copy each into place and drop it (peak memory: about one tensor, at most one shard). Legacy
``pytorch_model*.bin`` folders are read with ``torch.load(weights_only=True)`` (no arbitrary
code from the pickle), one file at a time.

Writing (:func:`save_hf_checkpoint`): tensors stream in from any iterable and are written into
shards of at most ``max_shard_size`` bytes (one shard in memory at a time), named and indexed
as transformers does, with ``config.json`` alongside. Everything goes to a temporary folder next
to the destination that is renamed into place at the end, so the destination never holds a
partial checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from forge_ckpt.atomic_folder import publish_folder
from forge_ckpt.hf.index import (
    BIN_INDEX,
    BIN_SINGLE,
    SAFE_INDEX,
    SAFE_SINGLE,
    TensorInfo,
    parse_size,
    read_index,
    read_safetensors_header,
    shard_name,
)
from forge_ckpt.hf.slices import SliceReader, preadv_into

__all__ = ["HFCheckpoint", "read_hf_config", "save_hf_checkpoint"]

#: safetensors dtype codes -> torch dtypes (those ``read_into`` reads directly).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

CONFIG_NAME = "config.json"


def read_hf_config(path: str | os.PathLike) -> dict:
    """The ``config.json`` of a Hugging Face model folder, as a dict."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found: a Hugging Face model folder needs its config.json "
            "(save the model with save_pretrained, which writes it)"
        )
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(config).__name__}")
    return config


class HFCheckpoint:
    """A Hugging Face checkpoint folder, read lazily.

    Args:
        path: the folder (``config.json`` + safetensors, or legacy ``.bin``).
        allow_bin: read ``pytorch_model*.bin`` when there is no safetensors file, with
            ``torch.load(weights_only=True)``; ``False`` refuses them.

    ``tensor_info()`` gives every tensor's shape and dtype from the file headers (no data);
    ``iter_tensors()`` yields ``(name, tensor)`` file by file, one tensor at a time;
    ``read_slice()`` / ``slice_reader()`` read a box of a tensor (a rank's shard) only.
    """

    def __init__(self, path: str | os.PathLike, *, allow_bin: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint folder {self.path} does not exist")
        self._info: dict[str, TensorInfo] | None = None
        if (self.path / SAFE_INDEX).is_file():
            self.format = "safetensors"
            self._weight_map = read_index(self.path / SAFE_INDEX)
        elif (self.path / SAFE_SINGLE).is_file():
            self.format = "safetensors"
            self._weight_map = None  # every tensor of the one file
        elif (self.path / BIN_INDEX).is_file() or (self.path / BIN_SINGLE).is_file():
            if not allow_bin:
                raise ValueError(
                    f"{self.path} holds only PyTorch pickles (pytorch_model*.bin) and "
                    "allow_bin=False; convert it to safetensors, or pass allow_bin=True to read "
                    "it with torch.load(weights_only=True)"
                )
            self.format = "bin"
            if (self.path / BIN_INDEX).is_file():
                self._weight_map = read_index(self.path / BIN_INDEX)
            else:
                self._weight_map = None
        else:
            present = sorted(p.name for p in self.path.iterdir())[:20]
            raise FileNotFoundError(
                f"no weights in {self.path}: expected {SAFE_SINGLE}, or shards listed by "
                f"{SAFE_INDEX} (or legacy {BIN_SINGLE}); found {present}"
            )
        for file in self.files:
            if not (self.path / file).is_file():
                raise FileNotFoundError(
                    f"{self.path}: the index lists shard {file} but it is missing"
                )

    # ----------------------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        """``config.json`` as a dict."""
        return read_hf_config(self.path)

    @property
    def files(self) -> list[str]:
        """The weight files, in name order (shard 1 first)."""
        if self._weight_map is None:
            return [SAFE_SINGLE if self.format == "safetensors" else BIN_SINGLE]
        return sorted(set(self._weight_map.values()))

    def tensor_info(self) -> dict[str, TensorInfo]:
        """Name -> shape/dtype/file of every tensor, from the headers (cached)."""
        if self._info is None:
            info: dict[str, TensorInfo] = {}
            for file in self.files:
                for name, entry in self._file_info(file).items():
                    if self._weight_map is not None and self._weight_map.get(name) != file:
                        continue  # not the copy the index points to
                    if name in info:
                        raise ValueError(f"{self.path}: tensor {name} is stored twice")
                    info[name] = entry
            if self._weight_map is not None:
                lost = sorted(set(self._weight_map) - set(info))
                if lost:
                    raise ValueError(
                        f"{self.path}: the index lists tensors that are not in their shard "
                        f"files: {lost[:10]}{' ...' if len(lost) > 10 else ''}"
                    )
            self._info = info
        return self._info

    def _file_info(self, file: str) -> dict[str, TensorInfo]:
        if self.format == "safetensors":
            return read_safetensors_header(self.path / file)
        state = self._load_bin(file)
        return {
            name: TensorInfo(shape=tuple(t.shape), dtype=str(t.dtype), file=file)
            for name, t in state.items()
        }

    def _load_bin(self, file: str) -> dict[str, torch.Tensor]:
        state = torch.load(self.path / file, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise ValueError(f"{self.path / file} does not hold a flat name -> tensor dict")
        return state

    def names(self) -> list[str]:
        """All tensor names, sorted."""
        return sorted(self.tensor_info())

    def iter_tensors(
        self, names: Iterable[str] | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for every tensor (or only ``names``), one file at a time.

        Each tensor is read when it is yielded; nothing of a file stays referenced here after
        the loop moves on, so a consumer that drops the tensors keeps memory flat.
        """
        info = self.tensor_info()
        wanted = set(info) if names is None else set(names)
        unknown = sorted(wanted - set(info))
        if unknown:
            raise KeyError(f"{self.path} has no tensors named {unknown[:10]}")
        by_file: dict[str, list[str]] = {}
        for name in sorted(wanted):
            by_file.setdefault(info[name].file, []).append(name)
        for file in self.files:
            if file not in by_file:
                continue
            if self.format == "safetensors":
                with safe_open(self.path / file, framework="pt", device="cpu") as f:
                    for name in by_file[file]:
                        yield name, f.get_tensor(name)
            else:
                state = self._load_bin(file)
                for name in by_file[file]:
                    yield name, state.pop(name)
                del state

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Fill ``out`` (same number of elements, row-major) with tensor ``name``.

        When ``out`` is a contiguous CPU tensor of the checkpoint's dtype and the file is
        safetensors, the bytes are read from the file straight into ``out``'s memory (one
        ``preadv``: no mapping, no intermediate tensor; on fresh memory this is several times
        faster than copying from the memory-mapped file, whose every page faults twice).
        Otherwise the tensor is read and copied (cast to ``out``'s dtype).
        """
        info = self.tensor_info().get(name)
        if info is None:
            raise KeyError(f"{self.path} has no tensor named {name!r}")
        if math.prod(info.shape) != out.numel():
            raise ValueError(
                f"{name} has shape {list(info.shape)}, which does not fit a target of shape "
                f"{list(out.shape)}"
            )
        direct = (
            info.offset is not None
            and out.numel() > 0
            and out.device.type == "cpu"
            and out.is_contiguous()
            and type(out) in (torch.Tensor, torch.nn.Parameter)
            and _SAFETENSORS_DTYPES.get(info.dtype) == out.dtype
            and info.nbytes == out.numel() * out.element_size()
        )
        if not direct:
            with torch.no_grad():
                out.copy_(self.get_tensor(name).reshape(out.shape))
            return
        fd = os.open(self.path / info.file, os.O_RDONLY)
        try:
            preadv_into(fd, out.detach(), info.offset, self.path / info.file)
        finally:
            os.close(fd)

    def get_tensor(self, name: str) -> torch.Tensor:
        """One tensor by name."""
        for _, tensor in self.iter_tensors([name]):
            return tensor
        raise AssertionError("unreachable")

    def slice_reader(self) -> SliceReader:
        """A :class:`~forge_ckpt.hf.slices.SliceReader`: reads boxes of tensors (a rank's
        shard) without reading the rest, files kept open until it is closed."""
        return SliceReader(self)

    def read_slice(self, name: str, index: Sequence[slice] = ()) -> torch.Tensor:
        """``tensor[index]`` of tensor ``name`` (one ``slice(start, stop)`` per leading dim),
        reading only those elements; see :meth:`slice_reader` for many reads."""
        with self.slice_reader() as reader:
            return reader.read(name, index)

    def __repr__(self) -> str:
        return f"HFCheckpoint({str(self.path)!r}, format={self.format!r}, files={len(self.files)})"


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _is_dtensor(t: torch.Tensor) -> bool:
    # Importing torch.distributed.tensor costs seconds; before it is imported (or in a torch
    # built without distributed) no DTensor exists.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _to_savable(name: str, tensor: torch.Tensor, shard_storages: set[int]) -> torch.Tensor:
    """``tensor`` as safetensors writes it: a contiguous CPU tensor owning its whole storage.

    A view into a larger buffer is copied, and so is a tensor whose storage another tensor of
    the same shard already uses (tied weights, ``{"a": w, "b": w.view(-1)}``): safetensors
    refuses shared storages ("use save_model"), and a checkpoint stores every name by value, so
    both names are written. ``shard_storages`` holds the storage addresses of the tensors in
    the shard being filled (all alive, so an address is never a freed buffer's reuse).
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(tensor).__name__}")
    if _is_dtensor(tensor):
        # Its local data is only this rank's shard, not the full tensor.
        raise TypeError(
            f"{name} is a {type(tensor).__name__}; gather it to a plain tensor first "
            "(e.g. DTensor.full_tensor())"
        )
    if tensor.is_meta:
        raise ValueError(f"{name} is on the meta device (no data); materialize the model first")
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    if not t.is_contiguous():
        t = t.contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()  # a view into a larger buffer: safetensors stores whole storages
    elif t.numel() and t.untyped_storage().data_ptr() in shard_storages:
        t = t.clone()  # tied to a tensor already in this shard: write it by value
    return t


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_hf_checkpoint(
    out_dir: str | os.PathLike,
    tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
    *,
    config: Mapping | None = None,
    max_shard_size: int | str = "5GB",
    extra_files: Mapping[str, str | bytes] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``tensors`` as a Hugging Face safetensors checkpoint in ``out_dir``, atomically.

    Args:
        out_dir: destination folder; must not exist or be empty unless ``overwrite``.
        tensors: ``(name, tensor)`` pairs (any iterable, consumed once, so a generator streams)
            or a mapping. Tensors are moved to CPU as they are written; tensors that share
            storage (tied weights, views of one buffer) are each written by value.
        config: written as ``config.json`` (as given: a passthrough of the source config).
        max_shard_size: bytes per shard (int, or ``"5GB"``-style); a tensor larger than it gets
            a shard of its own. One shard is written as ``model.safetensors`` without an
            index, several as ``model-0000k-of-0000N.safetensors`` plus
            ``model.safetensors.index.json``, as transformers writes them.
        extra_files: more files to write (``{"generation_config.json": "..."}``).
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`. Nothing is visible there until every file is
        written and flushed: the files go to a temporary sibling folder that is renamed.
    """
    out = Path(out_dir)
    limit = parse_size(max_shard_size)
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"{out} exists and is not a folder")
        if any(out.iterdir()) and not overwrite:
            raise ValueError(
                f"{out} is not empty; pass overwrite=True to replace it, or pick a new folder"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        seen: set[str] = set()
        pending: dict[str, torch.Tensor] = {}
        storages: set[int] = set()  # storage addresses of the tensors in ``pending``
        pending_bytes = 0
        total_bytes = 0
        total_params = 0

        def flush() -> None:
            nonlocal pending, pending_bytes
            if not pending:
                return
            file = f"shard-{len(shards):06d}.safetensors"
            save_file(pending, tmp / file, metadata={"format": "pt"})
            shards.append((file, list(pending)))
            pending, pending_bytes = {}, 0
            storages.clear()

        for name, tensor in items:
            if not isinstance(name, str):
                raise TypeError(f"tensor names must be strings, got {name!r}")
            if name in seen:
                raise ValueError(f"tensor {name!r} is given twice")
            seen.add(name)
            t = _to_savable(name, tensor, storages)
            size = t.numel() * t.element_size()
            if pending and pending_bytes + size > limit:
                flush()
            pending[name] = t
            if t.numel():
                storages.add(t.untyped_storage().data_ptr())
            pending_bytes += size
            total_bytes += size
            total_params += t.numel()
        flush()
        if not shards:
            raise ValueError("no tensors to save")

        if len(shards) == 1:
            (tmp / shards[0][0]).rename(tmp / SAFE_SINGLE)
        else:
            weight_map = {}
            for k, (file, names) in enumerate(shards, start=1):
                final = shard_name(k, len(shards))
                (tmp / file).rename(tmp / final)
                weight_map.update(dict.fromkeys(names, final))
            index = {
                "metadata": {"total_size": total_bytes, "total_parameters": total_params},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if config is not None:
            (tmp / CONFIG_NAME).write_text(
                json.dumps(dict(config), indent=2, sort_keys=True) + "\n"
            )
        for file, content in (extra_files or {}).items():
            if Path(file).name != file:
                raise ValueError(f"extra file names must be plain file names, got {file!r}")
            data = content.encode() if isinstance(content, str) else content
            (tmp / file).write_bytes(data)
        for path in tmp.iterdir():
            _fsync(path)
        publish_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
