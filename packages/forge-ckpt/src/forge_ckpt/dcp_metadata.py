"""Read the ``.metadata`` file of a ``torch.distributed.checkpoint`` (DCP) folder without
running code from it.

DCP writes ``.metadata`` with plain ``pickle``: unpickling an untrusted one with ``pickle.load``
(what ``FileSystemReader.read_metadata`` does) can call any importable function. Both readers of
DCP folders in forge-ckpt (training checkpoints, :mod:`forge_ckpt.training.safe_reader`, and
Megatron-Core ``torch_dist`` checkpoints, :mod:`forge_ckpt.megatron.dist`) unpickle it here with
an allow-list of **classes by exact name**: DCP's metadata dataclasses and enums, the save-plan
dataclasses Megatron-Core stores beside them (``all_local_plans``), ``torch.Size``, dtypes,
layouts, devices, paths and plain containers. Calling any of them only builds a value.

A module prefix (everything under ``torch.distributed.checkpoint``) would not do: that package
also holds functions such as ``format_utils.torch_save_to_dcp``, which unpickles another file
with ``torch.load(weights_only=False)``, so a crafted ``.metadata`` could still run code.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

import torch

__all__ = ["ALLOWED_CLASSES", "MetadataUnpickler", "load_dcp_metadata"]

#: module -> the names that may be loaded from it (classes and enums whose construction only
#: builds a value).
ALLOWED_CLASSES: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset(
        {
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    # Megatron-Core's cached global metadata keeps the local save plans.
    "torch.distributed.checkpoint.planner": frozenset(
        {
            "SavePlan",
            "WriteItem",
            "WriteItemType",
            "TensorWriteData",
            "BytesIOWriteData",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo", "_StoragePrefix"}),
    # Where torch < 2.4 defined DCP's TensorProperties.
    "torch.distributed._shard.sharded_tensor.metadata": frozenset(
        {"TensorProperties", "MEM_FORMAT_ENCODING"}
    ),
    "torch.serialization": frozenset({"_get_layout"}),
    "pathlib": frozenset({"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}),
    "collections": frozenset({"OrderedDict"}),
    "builtins": frozenset({"set", "frozenset", "dict", "list", "tuple"}),
}


class MetadataUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that loads only :data:`ALLOWED_CLASSES`, ``torch.Size``,
    ``torch.device`` and dtypes; anything else raises ``pickle.UnpicklingError`` naming it."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and (
            name in ("Size", "device") or isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return getattr(torch, name)
        if name in ALLOWED_CLASSES.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: it is not a DCP metadata class (only those are "
            "loaded, so that no code from a checkpoint runs)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(
            "refusing to load a persistent reference (a tensor storage): DCP metadata holds none"
        )


def load_dcp_metadata(path: str | os.PathLike) -> Any:
    """The DCP ``Metadata`` in ``path`` (a checkpoint folder, or its ``.metadata`` file),
    unpickled with :class:`MetadataUnpickler`.

    Raises ``ValueError`` naming the file and what is wrong with it: a class or function that is
    not DCP metadata (a corrupt or crafted file, or one not written by
    ``torch.distributed.checkpoint``), a truncated pickle, or an object that is not ``Metadata``.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    file = os.fspath(path)
    if os.path.isdir(file):
        file = os.path.join(file, ".metadata")
    with open(file, "rb") as f:
        data = f.read()
    try:
        metadata = MetadataUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as exc:
        raise ValueError(
            f"{file} is not a valid DCP metadata file: {exc}. If the checkpoint comes from "
            "torch.distributed.checkpoint, it may be truncated or corrupt: use another copy"
        ) from None
    if not isinstance(metadata, Metadata):
        raise ValueError(f"{file} holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata
