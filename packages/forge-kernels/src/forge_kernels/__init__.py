"""forge-kernels: Triton kernels for training transformers, usable without the rest of Forge.

Attention lives in its own namespace, ``forge_kernels.attention`` (``attention(q, k, v, ...)``,
mask builders, backend recording). Every op is registered by name in :mod:`forge_kernels.registry` (so an accelerator plugin can
swap an implementation) and has an eager PyTorch reference that defines its numerics. Triton
kernels run on CUDA, and on CPU under ``TRITON_INTERPRET=1``; elsewhere the eager path runs.
"""

from forge_kernels import attention, registry  # attention: `forge_kernels.attention.attention(...)`
from forge_kernels.activations import geglu, geglu_reference, swiglu, swiglu_reference
from forge_kernels.dropout import keyed_dropout, keyed_dropout_mask, keyed_dropout_reference
from forge_kernels.fp8 import (
    Fp8BlockwiseScaling,
    Fp8CurrentScaling,
    Fp8DelayedScaling,
    Fp8Linear,
    Fp8Policy,
    calibrate_fp8_policy,
    convert_to_fp8,
    fp8_linear,
)
from forge_kernels.loss import (
    FusedLinearCrossEntropyLoss,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)
from forge_kernels.moe import (
    grouped_mm,
    load_balancing_loss,
    load_balancing_loss_from_logits,
    moe_permute,
    moe_topk_routing,
    moe_unpermute,
    router_z_loss,
    sequence_balance_loss,
    update_expert_bias,
)
from forge_kernels.norms import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference
from forge_kernels.rope import (
    Llama3RopeScaling,
    apply_rope,
    apply_rope_,
    apply_rope_reference,
    mrope_cos_sin,
    packed_position_ids,
    rope_cos_sin,
    rope_inv_freq,
    wan_rope_cos_sin,
)

__version__ = "0.1.0"

__all__ = [
    "Fp8BlockwiseScaling",
    "Fp8CurrentScaling",
    "Fp8DelayedScaling",
    "Fp8Linear",
    "Fp8Policy",
    "FusedLinearCrossEntropyLoss",
    "Llama3RopeScaling",
    "apply_rope",
    "apply_rope_",
    "apply_rope_reference",
    "attention",
    "calibrate_fp8_policy",
    "convert_to_fp8",
    "fp8_linear",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
    "geglu",
    "geglu_reference",
    "grouped_mm",
    "keyed_dropout",
    "keyed_dropout_mask",
    "keyed_dropout_reference",
    "layer_norm",
    "layer_norm_reference",
    "load_balancing_loss",
    "load_balancing_loss_from_logits",
    "moe_permute",
    "moe_topk_routing",
    "moe_unpermute",
    "mrope_cos_sin",
    "packed_position_ids",
    "registry",
    "rms_norm",
    "rms_norm_reference",
    "rope_cos_sin",
    "rope_inv_freq",
    "router_z_loss",
    "sequence_balance_loss",
    "swiglu",
    "swiglu_reference",
    "update_expert_bias",
    "wan_rope_cos_sin",
]
