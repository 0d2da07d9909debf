"""Megatron-Core checkpoints: the legacy ``mp_rank_XX`` format and the distributed
``torch_dist`` format, read and written at any tensor/pipeline/expert-parallel split (uneven
pipeline stages, virtual pipeline stages and custom pipeline layouts included), with
per-family Hugging Face <-> Megatron mappings as data.

::

    from forge_ckpt.megatron import hf_to_megatron, megatron_to_hf

    hf_to_megatron("Llama-3.1-8B", "mcore", tensor_parallel=2, pipeline_parallel=2)
    megatron_to_hf("mcore", "Llama-3.1-8B-again")  # bit-exact round trip
"""

from forge_ckpt.megatron.convert import (
    FORMATS,
    hf_to_megatron,
    iter_megatron_as_hf,
    megatron_context,
    megatron_to_hf,
    open_megatron,
)
from forge_ckpt.megatron.dist import DistCheckpoint, dist_key, save_dist
from forge_ckpt.megatron.families import MegatronFamily, get_megatron_family, list_megatron_families
from forge_ckpt.megatron.legacy import LegacyCheckpoint, save_legacy
from forge_ckpt.megatron.safe_load import load_pt
from forge_ckpt.megatron.tensor_parallel import merge_tp, split_tp, tp_kind
from forge_ckpt.megatron.virtual_pipeline import parse_pipeline_layout, pipeline_chunks

__all__ = [
    "FORMATS",
    "DistCheckpoint",
    "LegacyCheckpoint",
    "MegatronFamily",
    "dist_key",
    "get_megatron_family",
    "hf_to_megatron",
    "iter_megatron_as_hf",
    "list_megatron_families",
    "load_pt",
    "megatron_context",
    "megatron_to_hf",
    "merge_tp",
    "open_megatron",
    "parse_pipeline_layout",
    "pipeline_chunks",
    "save_dist",
    "save_legacy",
    "split_tp",
    "tp_kind",
]
