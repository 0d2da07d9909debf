"""Split a nested state dict into tensors (for DCP) and a JSON document (everything else).

Training state mixes tensors (weights, optimizer moments, RNG bytes) with small plain values
(learning rates, step counters, a data loader's position). DCP would pickle the plain values,
and unpickling runs arbitrary code from the file, so forge stores them as JSON instead: every
tensor leaf is replaced in a JSON-able *skeleton* by a reference to its DCP key, and the
skeleton is stored as UTF-8 bytes in a ``uint8`` tensor. Loading therefore never unpickles
anything but DCP's own metadata file (read with an allow-list, see :mod:`.safe_reader`).

Encoding of the skeleton (tags keep what plain JSON would lose):

==========================  ==========================================================
value                       JSON
==========================  ==========================================================
None, bool, int, float, str itself (NaN and infinities included)
list                        array
tuple                       ``{"__tuple__": [...]}``
dict with str keys          object (``{"__dict__": [[key, value], ...]}`` otherwise, or
                            when a key starts with ``__``)
torch.Tensor                ``{"__tensor__": "<dcp key>"}``
numpy array / scalar        ``{"__ndarray__": "<dcp key>"}`` / the Python scalar
==========================  ==========================================================
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["decode_json_tensor", "encode_json_tensor", "join_state", "split_state", "tensor_keys"]

_TAGS = ("__tuple__", "__dict__", "__tensor__", "__ndarray__")


def split_state(state: Any, prefix: str) -> tuple[dict[str, torch.Tensor], Any]:
    """``(tensors, skeleton)``: tensor leaves keyed ``prefix/path/to/leaf`` and the JSON-able
    rest with references to those keys. Raises ``TypeError`` naming the path of a value that is
    neither a tensor nor JSON-able."""
    tensors: dict[str, torch.Tensor] = {}

    def add(key: str, tensor: torch.Tensor) -> str:
        if key in tensors:
            raise ValueError(f"two state entries map to the checkpoint key {key!r}; rename one")
        tensors[key] = tensor
        return key

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            return {"__tensor__": add(path, value)}
        if value is None or isinstance(value, bool | int | float | str):
            return value
        if isinstance(value, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return {"__tuple__": [walk(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, Mapping):
            plain = all(isinstance(k, str) and not k.startswith("__") for k in value)
            if plain:
                return {k: walk(v, f"{path}/{k}") for k, v in value.items()}
            return {
                "__dict__": [
                    [walk(k, f"{path}/<key{i}>"), walk(v, f"{path}/{k}")]
                    for i, (k, v) in enumerate(value.items())
                ]
            }
        numpy_value = _numpy_leaf(value)
        if numpy_value is not None:
            if isinstance(numpy_value, torch.Tensor):
                return {"__ndarray__": add(path, numpy_value)}
            return numpy_value
        raise TypeError(
            f"cannot checkpoint {type(value).__name__} at {path!r}: training state must be "
            "tensors or JSON-able values (None, bool, int, float, str, list, tuple, dict), "
            "because forge checkpoints never pickle; convert it in the object's state_dict()"
        )

    skeleton = walk(state, prefix)
    return tensors, skeleton


def join_state(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_state`: rebuild the nested state, taking tensors by key."""
    if isinstance(skeleton, list):
        return [join_state(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__ndarray__" in skeleton:
            return tensors[skeleton["__ndarray__"]].numpy()
        if "__tuple__" in skeleton:
            return tuple(join_state(v, tensors) for v in skeleton["__tuple__"])
        if "__dict__" in skeleton:
            return {join_state(k, tensors): join_state(v, tensors) for k, v in skeleton["__dict__"]}
        return {k: join_state(v, tensors) for k, v in skeleton.items()}
    return skeleton


def tensor_keys(skeleton: Any) -> list[str]:
    """The DCP keys a skeleton refers to."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, dict):
            for tag in ("__tensor__", "__ndarray__"):
                if tag in node:
                    found.append(node[tag])
                    return
            for v in node.values():
                walk(v)

    walk(skeleton)
    return found


def encode_json_tensor(document: Any) -> torch.Tensor:
    """A JSON document as a ``uint8`` tensor of its UTF-8 bytes."""
    data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_json_tensor(tensor: torch.Tensor) -> Any:
    """Inverse of :func:`encode_json_tensor`."""
    return json.loads(bytes(tensor.contiguous().numpy().tobytes()).decode())


def _numpy_leaf(value: Any) -> Any:
    """A numpy array as a tensor (copied), a numpy scalar as a Python scalar, else ``None``."""
    module = type(value).__module__
    if not module.startswith("numpy"):
        return None
    import numpy as np

    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    return None
