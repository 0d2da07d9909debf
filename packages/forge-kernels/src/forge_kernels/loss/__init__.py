"""Loss kernels: fused linear + cross-entropy without materializing the logits.

Importing this package never imports Triton; the kernels are loaded on first use, and only where
:func:`forge_kernels._triton_support.can_use_triton` says they can run.
"""

from forge_kernels.loss.fused_linear_ce import (
    FusedLinearCrossEntropyLoss,
    auto_chunk_size,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)

__all__ = [
    "FusedLinearCrossEntropyLoss",
    "auto_chunk_size",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
]
