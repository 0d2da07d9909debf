"""The random number generators of one process, as checkpointable state.

Resuming a run bit-for-bit needs every generator that training draws from: Python's ``random``,
numpy's legacy global generator (when numpy is installed), torch's CPU generator and the
generator of every local accelerator device. Each rank has its own states, so the checkpoint
manager stores them per rank.
"""

from __future__ import annotations

import importlib.util
import random
from typing import Any

import torch

__all__ = ["RNGState"]


class RNGState:
    """``state_dict()`` / ``load_state_dict()`` of the process's global random generators.

    The state holds only tensors and JSON-able values. On load, the accelerator states are
    restored only when the device type and count match the saving process (a checkpoint taken
    on 8 GPUs per node resumed on CPU keeps the CPU/Python/numpy states); numpy's state is
    restored when numpy is installed.
    """

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        state: dict[str, Any] = {
            "python": {"version": version, "state": list(internal), "gauss": gauss},
            "torch_cpu": torch.get_rng_state(),
        }
        if importlib.util.find_spec("numpy") is not None:
            import numpy as np

            kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
            state["numpy"] = {
                "kind": kind,
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached),
            }
        accelerator = _accelerator_type()
        if accelerator is not None:
            module = torch.get_device_module(accelerator)
            state["accelerator"] = {
                "type": accelerator,
                "states": list(module.get_rng_state_all()),
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
        torch.set_rng_state(state["torch_cpu"].to(torch.uint8))
        if "numpy" in state and importlib.util.find_spec("numpy") is not None:
            import numpy as np

            np_state = state["numpy"]
            np.random.set_state(
                (
                    np_state["kind"],
                    np_state["keys"].numpy().astype(np.uint32),
                    np_state["pos"],
                    np_state["has_gauss"],
                    np_state["cached_gaussian"],
                )
            )
        saved = state.get("accelerator")
        accelerator = _accelerator_type()
        if saved is not None and saved["type"] == accelerator:
            module = torch.get_device_module(accelerator)
            if len(saved["states"]) == module.device_count():
                module.set_rng_state_all([s.to(torch.uint8) for s in saved["states"]])


def _accelerator_type() -> str | None:
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    return accelerator.type if accelerator is not None else None
