"""Hugging Face checkpoint folders: streaming safetensors reader, sharded atomic writer.

::

    from forge_ckpt.hf import HFCheckpoint, save_hf_checkpoint

    ckpt = HFCheckpoint("path/to/Llama-3.1-8B")
    ckpt.config["num_hidden_layers"], ckpt.tensor_info()["lm_head.weight"].shape
    for name, tensor in ckpt.iter_tensors():  # one file, one tensor at a time
        ...
    rows = ckpt.read_slice("lm_head.weight", (slice(0, 1024),))  # only those rows are read
    save_hf_checkpoint("out", tensors, config=ckpt.config, max_shard_size="2GB")
"""

from forge_ckpt.hf.index import TensorInfo, parse_size, shard_name
from forge_ckpt.hf.io import HFCheckpoint, read_hf_config, save_hf_checkpoint
from forge_ckpt.hf.slices import SliceReader

__all__ = [
    "HFCheckpoint",
    "SliceReader",
    "TensorInfo",
    "parse_size",
    "read_hf_config",
    "save_hf_checkpoint",
    "shard_name",
]
