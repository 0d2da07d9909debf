"""Checkpoint formats and conversion between Hugging Face, Megatron-Core and Forge; distributed save/load."""

__version__ = "0.1.0"
