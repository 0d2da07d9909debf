"""forge-bench: the same training step through Forge and through each peer, in one run.

``forge-bench`` (or ``python -m forge_bench``) runs forward + backward + AdamW steps of a
Llama-style and a Qwen3-MoE-style model through forge and through every peer importable on the
machine (``transformers`` with SDPA, Liger-Kernel, Transformer Engine FP8 ...), each in a process
of its own, and prints one table: tokens/s, MFU, peak memory, loss and the forge / peer ratio.
See the README for the workloads and the FLOP formula.
"""

__version__ = "0.1.0"
