"""Context parallelism: attention over sequences sharded across ranks, exact.

- :func:`shard_sequence` / :func:`unshard_sequence`: the zigzag (load-balanced causal) or
  contiguous layout of tokens, labels and position ids over the ``cp`` ranks;
- :func:`context_parallel_attention` (ring or Ulysses, causal or bidirectional, GQA, packed
  documents through ``cu_seqlens``, bidirectional blocks such as an image's tokens inside
  causal attention through ``block_ids``), for model code that calls it directly;
- :func:`apply_cp` / :func:`context_parallel`: route an unedited model's
  ``scaled_dot_product_attention`` calls to it;
- :func:`context_parallel_cross_entropy`: the full-sequence mean loss from each rank's shard.
"""

from forge_parallel.context_parallel.apply import ContextParallelHandle, apply_cp, context_parallel
from forge_parallel.context_parallel.attention import context_parallel_attention
from forge_parallel.context_parallel.blockwise import (
    block_attention_backward,
    block_attention_forward,
    block_mask,
    merge_blocks,
)
from forge_parallel.context_parallel.config import CP_STYLES, CPConfig
from forge_parallel.context_parallel.loss import context_parallel_cross_entropy
from forge_parallel.context_parallel.ring_attention import ring_attention
from forge_parallel.context_parallel.sharding import (
    check_block_ids,
    document_ids,
    gathered_positions,
    shard_positions,
    shard_sequence,
    unshard_sequence,
)
from forge_parallel.context_parallel.ulysses import (
    heads_to_sequence,
    sequence_to_heads,
    ulysses_attention,
    validate_ulysses,
)

__all__ = [
    "CP_STYLES",
    "CPConfig",
    "ContextParallelHandle",
    "apply_cp",
    "block_attention_backward",
    "block_attention_forward",
    "block_mask",
    "check_block_ids",
    "context_parallel",
    "context_parallel_attention",
    "context_parallel_cross_entropy",
    "document_ids",
    "gathered_positions",
    "heads_to_sequence",
    "merge_blocks",
    "ring_attention",
    "sequence_to_heads",
    "shard_positions",
    "shard_sequence",
    "ulysses_attention",
    "unshard_sequence",
    "validate_ulysses",
]
