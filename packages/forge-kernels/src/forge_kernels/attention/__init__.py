"""Attention: one entry point over flash-attn, PyTorch SDPA, FlexAttention and an eager reference.

::

    from forge_kernels.attention import attention, multimodal_mask, record_attention_backends

    out = attention(q, k, v, causal=True)                        # q, k, v: [B, S, H, D]
    out = attention(q, k, v, causal=True, cu_seqlens=cu)         # packed: [T, H, D]
    out = attention(q, k, v, causal=True, window=(4095, 0))      # sliding window
    mask = multimodal_mask(block_ids=image_ids, segment_ids=docs)  # bidirectional images
    out = attention(q, k, v, block_mask=mask)
    with record_attention_backends() as log:
        attention(q, k, v)
    log.backends                                                 # e.g. ["sdpa"]

Papers: Vaswani et al. 2017 (attention); FlashAttention, Dao et al. 2022 and FlashAttention-2,
Dao 2023; FlexAttention, Dong et al. 2024; GQA, Ainslie et al. 2023; sliding windows from
Longformer (Beltagy et al. 2020) and Mistral 7B (Jiang et al. 2023). Importing this package
imports neither flash-attn nor FlexAttention; the ``"attention"`` op is registered in
:mod:`forge_kernels.registry`.
"""

from forge_kernels.attention.backends.eager import attention_reference
from forge_kernels.attention.dispatch import (
    AttentionBackendLog,
    BackendChoice,
    attention,
    last_attention_backend,
    record_attention_backends,
)
from forge_kernels.attention.masks import (
    AttentionMask,
    causal_mask,
    dense_mask,
    document_mask,
    multimodal_mask,
    segment_ids_from_cu_seqlens,
    sliding_window_mask,
)

__all__ = [
    "AttentionBackendLog",
    "AttentionMask",
    "BackendChoice",
    "attention",
    "attention_reference",
    "causal_mask",
    "dense_mask",
    "document_mask",
    "last_attention_backend",
    "multimodal_mask",
    "record_attention_backends",
    "segment_ids_from_cu_seqlens",
    "sliding_window_mask",
]
