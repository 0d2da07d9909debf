"""Checkpoint formats and conversion between Hugging Face, Megatron-Core and Forge; distributed save/load.

- :mod:`forge_ckpt.hf`: Hugging Face folders (config.json + safetensors, sharded with an index),
  read one tensor at a time and written atomically in shards.
- :mod:`forge_ckpt.mapping`: per-family name/layout mappings HF <-> forge, as data, invertible.
- :func:`load_hf_as_forge` / :func:`save_forge_as_hf`: whole-checkpoint conversion.
- :mod:`forge_ckpt.megatron`: Megatron-Core checkpoints (legacy ``mp_rank_XX`` and distributed
  ``torch_dist``) at any TP/PP split; :func:`hf_to_megatron` / :func:`megatron_to_hf`.
- ``forge-convert`` (:mod:`forge_ckpt.cli`): the command line for all of these conversions.
- :mod:`forge_ckpt.training`: training checkpoints through ``torch.distributed.checkpoint``
  (model, optimizer, scheduler, data loader, RNG), resharded on load, atomic, asynchronous,
  with keep-last-N retention (:class:`CheckpointManager`). Imported on first use: DCP's import
  costs seconds.

forge-ckpt imports no model code: ``forge_models.from_pretrained`` / ``save_pretrained``
combine these with the model registry.
"""

from forge_ckpt.convert import load_hf_as_forge, save_forge_as_hf
from forge_ckpt.errors import CheckpointMismatchError
from forge_ckpt.hf import HFCheckpoint, read_hf_config, save_hf_checkpoint
from forge_ckpt.mapping import MappingSpec, get_mapping, mapping_for_hf_config, register_mapping
from forge_ckpt.megatron import hf_to_megatron, megatron_to_hf

__version__ = "0.1.0"

#: Names served lazily from :mod:`forge_ckpt.training` (importing DCP costs seconds).
_TRAINING = ("CheckpointConfig", "CheckpointInfo", "CheckpointManager", "LoadResult", "RNGState")


def __getattr__(name: str):
    if name in _TRAINING:
        import forge_ckpt.training as training

        return getattr(training, name)
    raise AttributeError(f"module 'forge_ckpt' has no attribute {name!r}")


__all__ = [
    "CheckpointConfig",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointMismatchError",
    "HFCheckpoint",
    "LoadResult",
    "MappingSpec",
    "RNGState",
    "get_mapping",
    "hf_to_megatron",
    "load_hf_as_forge",
    "mapping_for_hf_config",
    "megatron_to_hf",
    "read_hf_config",
    "register_mapping",
    "save_forge_as_hf",
    "save_hf_checkpoint",
]
