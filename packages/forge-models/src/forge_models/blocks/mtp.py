"""Multi-token prediction (MTP) modules: DeepSeek-V3 technical report, DeepSeek-AI 2024,
arXiv:2412.19437, section 2.2 (eqs. 21-25), after Gloeckle et al. 2024 (arXiv:2404.19737).

``D`` modules are applied one after the other on top of the main model. Module ``k`` (1-based)
combines the previous depth's representation ``h^{k-1}_i`` (``h^0``: the main model's last
layer output, before its final norm) with the embedding of token ``t_{i+k}``::

    h'^k_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]        (eq. 21)
    h^k    = TRM_k(h'^k)                                             (eq. 22)
    P^k_{i+k+1} = OutHead(RMSNorm(h^k_i))                           (eq. 23)

with the embedding and the output head shared with the main model. ``M_k`` is ``eh_proj``
``[hidden, 2 * hidden]``; its input halves are in the order of DeepSeek's released checkpoints
(and Megatron-LM, vLLM): the embedding first. The paper writes ``[RMSNorm(h); RMSNorm(Emb)]``,
the same map with the two column blocks of ``M_k`` swapped. ``TRM_k`` is one
:class:`TransformerBlock` (an MoE block when the config's rule makes layer ``num_layers + k - 1``
one, as in DeepSeek-V3), and ``RMSNorm(h^k)`` before the head is the module's own ``norm``
(the checkpoints' ``shared_head.norm``). The loss is ``lambda / D * sum_k CE(P^k, t_{.+k+1})``
(eqs. 24-25).
"""

from __future__ import annotations

import torch
from torch import nn

from forge_models.blocks.attention import AttentionInputs
from forge_models.blocks.moe import RouterOutput
from forge_models.blocks.norm import RMSNorm
from forge_models.blocks.transformer import TransformerBlock
from forge_models.config import TransformerConfig

__all__ = ["MultiTokenPrediction"]


class MultiTokenPrediction(nn.Module):
    """MTP module ``depth + 1`` (0-based ``depth``): submodules ``enorm``, ``hnorm``, ``eh_proj``,
    ``block`` (a :class:`TransformerBlock` with ``layer_idx = num_layers + depth``) and ``norm``."""

    def __init__(self, config: TransformerConfig, depth: int) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.depth = depth
        self.enorm = RMSNorm(d, eps=eps)
        self.hnorm = RMSNorm(d, eps=eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = TransformerBlock(config, config.num_layers + depth)
        self.norm = RMSNorm(d, eps=eps)

    def forward(
        self, h: torch.Tensor, next_embeds: torch.Tensor, inputs: AttentionInputs
    ) -> tuple[torch.Tensor, RouterOutput | None]:
        """``h`` ``[B, S, hidden]`` (previous depth), ``next_embeds`` the embeddings of the tokens
        ``k`` ahead -> ``(h^k [B, S, hidden] before the norm, RouterOutput or None)``."""
        x = self.eh_proj(torch.cat((self.enorm(next_embeds), self.hnorm(h)), dim=-1))
        out = self.block(x, inputs)
        return out if isinstance(out, tuple) else (out, None)
