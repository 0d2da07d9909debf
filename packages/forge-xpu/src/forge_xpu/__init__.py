"""Forge accelerator plugin for Kunlun XPU, and the template for other vendors."""

__version__ = "0.1.0"
