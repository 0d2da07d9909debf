"""Read DCP checkpoints without unpickling arbitrary objects.

``torch.distributed.checkpoint`` stores tensors with ``torch.save`` (read back with
``weights_only=True``) but its ``.metadata`` file is a plain pickle, and non-tensor values are
read with ``torch.load(weights_only=False)``: loading an untrusted checkpoint could run code.
:class:`SafeFileSystemReader` unpickles ``.metadata`` with an allow-list of the classes DCP
metadata consists of (:mod:`forge_ckpt.dcp_metadata`), and
:class:`TensorOnlyLoadPlanner` refuses non-tensor ("bytes") entries: forge training checkpoints
keep non-tensor state as JSON inside ``uint8`` tensors (see :mod:`.state_codec`).
"""

from __future__ import annotations

import io
import os
from typing import Any

from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from forge_ckpt.dcp_metadata import load_dcp_metadata

__all__ = ["SafeFileSystemReader", "TensorOnlyLoadPlanner", "read_metadata"]


def read_metadata(path: str | os.PathLike) -> Metadata:
    """The DCP ``Metadata`` of the checkpoint folder ``path``, read with the allow-list of
    :func:`forge_ckpt.dcp_metadata.load_dcp_metadata` (``ValueError`` for anything else)."""
    return load_dcp_metadata(path)


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
