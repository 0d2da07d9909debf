"""Resuming a checkpoint written in another precision: fp16's loss scale (the ``loss_scaler``
extra of :meth:`forge_train.loop.Trainer._stateful`) exists only in fp16 checkpoints.

An fp16 run resumed from a bf16/fp32 checkpoint has no scale to restore: its scaler starts
fresh (as a new fp16 run's does, Micikevicius et al. 2018, "Mixed Precision Training") and the
log says so; a bf16/fp32 run resumed from an fp16 checkpoint has no scaler: the saved scale is
left unread, and the log says so. forge-ckpt loads an ``extra`` only when the checkpoint holds
it (it raises otherwise), so the checkpoint's global objects are read first.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["LOSS_SCALER", "loss_scale_extras", "saved_global_objects"]

#: The extra under which fp16 checkpoints hold the scaler's state.
LOSS_SCALER = "loss_scaler"


def saved_global_objects(checkpoint: str | Path) -> set[str]:
    """Names of the objects a forge training checkpoint holds once for all ranks (``model``,
    ``optim``, ``scheduler`` and the extras), read from its JSON documents alone (a few KB)."""
    import torch.distributed.checkpoint as dcp

    from forge_ckpt.training.safe_reader import (
        SafeFileSystemReader,
        TensorOnlyLoadPlanner,
        read_metadata,
    )
    from forge_ckpt.training.state_codec import decode_json_tensor

    metadata = read_metadata(checkpoint)
    documents = {
        key: torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for key, md in metadata.state_dict_metadata.items()
        if key.startswith("json/global/")
    }
    if not documents:
        raise ValueError(f"{checkpoint} is not a forge training checkpoint (no json/global entry)")
    with warnings.catch_warnings():  # read here, by this process alone: on purpose
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
        dcp.load(
            documents,
            storage_reader=SafeFileSystemReader(checkpoint),
            planner=TensorOnlyLoadPlanner(),
            no_dist=True,
        )
    return {name for document in documents.values() for name in decode_json_tensor(document)}


def loss_scale_extras(
    extras: Mapping[str, Any],
    *,
    saved: set[str],
    scaler: torch.amp.GradScaler | None,
    checkpoint: str | Path,
    precision: str,
    report: Callable[[str], None],
) -> dict[str, Any]:
    """The extras to load from ``checkpoint`` (whose global objects are ``saved``): without
    the loss scaler when the checkpoint holds none (the scaler starts fresh); reports (one
    line) a scale that is not restored, either way."""
    extras = dict(extras)
    if scaler is not None and LOSS_SCALER not in saved:
        extras.pop(LOSS_SCALER, None)
        report(
            f"{checkpoint} holds no fp16 loss scale (written in another precision): the loss "
            f"scaler starts fresh at {scaler.get_scale():g}"
        )
    elif scaler is None and LOSS_SCALER in saved:
        report(
            f"{checkpoint} holds an fp16 loss scale; this run is {precision} (no loss scaling): "
            "the scale is not used"
        )
    return extras
