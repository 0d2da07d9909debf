"""Fused normalisation kernels: RMSNorm and LayerNorm, each with an optional fused residual add.

Importing this package registers the ``"rms_norm"`` and ``"layer_norm"`` ops in
:mod:`forge_kernels.registry`.
"""

from forge_kernels.norms.layer_norm_kernels import layer_norm, layer_norm_reference
from forge_kernels.norms.rms_norm_kernels import rms_norm, rms_norm_reference

__all__ = ["layer_norm", "layer_norm_reference", "rms_norm", "rms_norm_reference"]
