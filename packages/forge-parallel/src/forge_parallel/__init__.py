"""FSDP/ZeRO, tensor, sequence, pipeline, context and expert parallelism for any PyTorch model."""

__version__ = "0.1.0"
