"""Building blocks shared by the model families: norms, RoPE, attention (GQA, MLA),
MLPs, MoE, decoder blocks, multi-token prediction."""

from forge_models.blocks.attention import Attention, AttentionInputs
from forge_models.blocks.mla import MultiHeadLatentAttention
from forge_models.blocks.mlp import GatedMLP
from forge_models.blocks.moe import MoEBlock, MoEExperts, RouterOutput
from forge_models.blocks.mtp import MultiTokenPrediction
from forge_models.blocks.norm import RMSNorm
from forge_models.blocks.rope import RotaryEmbedding
from forge_models.blocks.transformer import TransformerBlock

__all__ = [
    "Attention",
    "AttentionInputs",
    "GatedMLP",
    "MoEBlock",
    "MoEExperts",
    "MultiHeadLatentAttention",
    "MultiTokenPrediction",
    "RMSNorm",
    "RotaryEmbedding",
    "RouterOutput",
    "TransformerBlock",
]
