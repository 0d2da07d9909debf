"""Tokenize, pack, shard and load-balance training data for Forge."""

__version__ = "0.1.0"
