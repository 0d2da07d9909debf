"""Which peers this machine has: found without importing them (``importlib.util.find_spec``).

A peer that is missing, or present but not measured by forge-bench, gets a reason that the
table prints as a ``skipped: ...`` row: a peer is never dropped silently.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

__all__ = ["CUDA_ONLY", "PEERS", "PeerStatus", "find_peers"]


@dataclass(frozen=True, kw_only=True)
class PeerStatus:
    """``reason`` is ``None`` when the peer can run, else why its rows are skipped."""

    name: str
    module: str
    reason: str | None


#: Peer name -> (import name, how to get it, why an installed one is still not run or None).
PEERS: dict[str, tuple[str, str, str | None]] = {
    "transformers": ("transformers", "pip install 'forge-bench[peers]'", None),
    "liger-kernel": ("liger_kernel", "pip install liger-kernel", None),
    "transformer-engine": (
        "transformer_engine",
        "pip install transformer-engine-cu13 (CUDA only)",
        None,
    ),
    "torchtitan": ("torchtitan", "pip install 'forge-bench[torchtitan]'", None),
    "megatron-core": ("megatron.core", "pip install 'forge-bench[megatron]'", None),
}

#: Why an installed peer still cannot run off CUDA (checked with the versions named).
CUDA_ONLY: dict[str, str] = {
    "liger-kernel": "liger-kernel runs on CUDA only",
    "transformer-engine": "transformer-engine runs on CUDA only",
    "megatron-core": (
        "megatron-core's GPTModel trains on CUDA only (0.16: RotaryEmbedding.get_emb moves "
        "inv_freq to torch.cuda.current_device(), DotProductAttention forks the CUDA RNG "
        "tracker, full recompute saves CUDA RNG states)"
    ),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


def find_peers(*, device_type: str) -> dict[str, PeerStatus]:
    """The status of every peer in :data:`PEERS` on this machine."""
    found = {}
    for name, (module, install, not_run) in PEERS.items():
        if not _installed(module):
            reason = f"{name} not installed ({install})"
        elif name in CUDA_ONLY and device_type != "cuda":
            reason = CUDA_ONLY[name]
        else:
            reason = not_run
        found[name] = PeerStatus(name=name, module=module, reason=reason)
    return found
