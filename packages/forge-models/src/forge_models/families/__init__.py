"""The built-in model families, one module each: ``FAMILY`` (registry entry) and ``SIZES``.

They are imported by :mod:`forge_models.registry` on first use.
"""
