"""Dropout kernels: keyed dropout, whose mask is a hash of (token key, feature index).

Importing this package registers the ``"keyed_dropout"`` op in :mod:`forge_kernels.registry`.
"""

from forge_kernels.dropout.keyed_dropout import (
    keyed_dropout,
    keyed_dropout_mask,
    keyed_dropout_reference,
    mix32,
)

__all__ = ["keyed_dropout", "keyed_dropout_mask", "keyed_dropout_reference", "mix32"]
