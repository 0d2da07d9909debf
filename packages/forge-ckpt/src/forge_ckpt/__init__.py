"""Checkpoint formats and conversion between Hugging Face, Megatron-Core and Forge; distributed save/load.

- :mod:`forge_ckpt.hf`: Hugging Face folders (config.json + safetensors, sharded with an index),
  read one tensor at a time and written atomically in shards.
- :mod:`forge_ckpt.mapping`: per-family name/layout mappings HF <-> forge, as data, invertible.
- :func:`load_hf_as_forge` / :func:`save_forge_as_hf`: whole-checkpoint conversion.

forge-ckpt imports no model code: ``forge_models.from_pretrained`` / ``save_pretrained``
combine these with the model registry.
"""

from forge_ckpt.convert import load_hf_as_forge, save_forge_as_hf
from forge_ckpt.errors import CheckpointMismatchError
from forge_ckpt.hf import HFCheckpoint, read_hf_config, save_hf_checkpoint
from forge_ckpt.mapping import MappingSpec, get_mapping, mapping_for_hf_config, register_mapping

__version__ = "0.1.0"

__all__ = [
    "CheckpointMismatchError",
    "HFCheckpoint",
    "MappingSpec",
    "get_mapping",
    "load_hf_as_forge",
    "mapping_for_hf_config",
    "read_hf_config",
    "register_mapping",
    "save_forge_as_hf",
    "save_hf_checkpoint",
]
