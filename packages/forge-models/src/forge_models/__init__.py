"""Forge model zoo: LLM, MoE, ViT, VLM, video DiT and VLA built from shared blocks."""

__version__ = "0.1.0"
