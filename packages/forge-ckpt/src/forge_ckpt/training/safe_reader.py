"""Read DCP checkpoints without unpickling arbitrary objects.

``torch.distributed.checkpoint`` stores tensors with ``torch.save`` (read back with
``weights_only=True``) but its ``.metadata`` file is a plain pickle, and non-tensor values are
read with ``torch.load(weights_only=False)``: loading an untrusted checkpoint could run code.
:class:`SafeFileSystemReader` unpickles ``.metadata`` with an allow-list of the classes DCP
metadata consists of (its dataclasses, ``torch.Size``, dtypes, layouts, paths), and
:class:`TensorOnlyLoadPlanner` refuses non-tensor ("bytes") entries: forge training checkpoints
keep non-tensor state as JSON inside ``uint8`` tensors (see :mod:`.state_codec`).
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

__all__ = ["SafeFileSystemReader", "TensorOnlyLoadPlanner", "read_metadata"]

_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and (
            name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return getattr(torch, name)
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} from a checkpoint's .metadata: only DCP metadata "
            "classes are allowed (the file may be corrupt or not come from "
            "torch.distributed.checkpoint)"
        )


def read_metadata(path: str | os.PathLike) -> Metadata:
    """The DCP ``Metadata`` of the checkpoint folder ``path``, read with the allow-list."""
    file = os.path.join(os.fspath(path), ".metadata")
    with open(file, "rb") as f:
        data = f.read()
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as exc:
        raise ValueError(f"{file} is not a valid DCP metadata file: {exc}") from None
    if not isinstance(metadata, Metadata):
        raise ValueError(f"{file} holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` is unpickled with an allow-list."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise ValueError("per-rank DCP metadata (use_collectives=False) is not supported")
        metadata = read_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class TensorOnlyLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that refuses pickled (non-tensor) entries."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise ValueError(
            f"refusing to unpickle the non-tensor checkpoint entry {read_item.dest_index.fqn!r}: "
            "forge training checkpoints hold only tensors"
        )
