"""Fused activation kernels: the gated linear units SwiGLU and GeGLU.

Importing this package registers the ``"swiglu"`` and ``"geglu"`` ops in
:mod:`forge_kernels.registry`.
"""

from forge_kernels.activations.glu import geglu, geglu_reference, swiglu, swiglu_reference

__all__ = ["geglu", "geglu_reference", "swiglu", "swiglu_reference"]
