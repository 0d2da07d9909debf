"""Parameter and FLOP counts per token, for MFU.

``flops_per_token(config, seq_len)`` is the training cost (forward + backward) of one token:

    6 * N_matmul + 12 * L * (num_heads * head_dim) * seq_len

- ``N_matmul``: the weights of every matrix multiply: q, k, v, o, gate/up and down projections
  of every layer, plus the output projection with the real vocabulary (counted also when it is
  tied to the input embedding: the multiply happens either way). The embedding lookup, norms
  and biases are left out (no multiply, or negligible). Each weight costs 2 FLOPs per token
  forward (multiply + add) and 4 backward (gradients of input and weight): 6 in all.
- The attention term counts ``q kᵀ`` and ``softmax · v``: ``2 * 2 * seq_len * num_heads *
  head_dim`` FLOPs per token and layer forward, times 3 for forward + backward: ``12 L H Q T``
  as in PaLM (Chowdhery et al. 2022, arXiv:2204.02311, appendix B) and Megatron-LM (Narayanan
  et al. 2021, arXiv:2104.04473, whose ``72 B s l h² (1 + s / 6h + V / 12 h l)`` is the same
  count for ``num_heads * head_dim == hidden``). Like both, it does not halve the attention
  term for the causal mask; pass ``causal=True`` for the work a causal kernel really does.
- Mixture-of-experts layers count only the *active* weights per token: the router
  (``hidden * num_experts``), ``num_experts_per_tok`` routed experts
  (``3 * hidden * moe_intermediate_size`` each), and the shared expert with its gate
  (``3 * hidden * shared_expert_intermediate_size + hidden``) where there is one. Dense layers
  of an MoE model (``mlp_only_layers``, ``decoder_sparse_step``) count their dense MLP.
  :func:`count_params` counts every expert.
"""

from __future__ import annotations

from torch import nn

from forge_models.config import TransformerConfig

__all__ = ["count_params", "flops_per_token", "matmul_params"]


def _config(config_or_model: TransformerConfig | nn.Module) -> TransformerConfig:
    config = getattr(config_or_model, "config", config_or_model)
    if not isinstance(config, TransformerConfig):
        raise TypeError(
            f"expected a TransformerConfig or a forge model, got {type(config).__name__}"
        )
    return config


def count_params(config: TransformerConfig | nn.Module, *, embedding: bool = True) -> int:
    """Parameters of the model ``build_model(config)`` builds (a tied matrix counted once).

    ``embedding=False`` leaves out the input embedding table (and with it a tied output
    projection, which is the same matrix); vocabulary padding rows count as parameters.
    """
    c = _config(config)
    d, head = c.hidden_size, c.head_dim
    attn = d * c.q_size + 2 * d * c.kv_size + c.q_size * d
    if c.attention_bias:
        attn += c.q_size + 2 * c.kv_size
    if c.attention_out_bias:
        attn += d
    if c.qk_norm:
        attn += 2 * head
    total = sum(attn + _mlp_params(c, i, active=False) + 2 * d for i in range(c.num_layers))
    table = c.padded_vocab_size * d
    total += d + (0 if c.tie_word_embeddings else table)
    return total + table if embedding else total


def _mlp_params(c: TransformerConfig, layer_idx: int, *, active: bool) -> int:
    """Weights of layer ``layer_idx``'s MLP (of a token's active experts with ``active``)."""
    d = c.hidden_size
    if not c.is_moe_layer(layer_idx):
        return 3 * d * c.intermediate_size
    moe = c.moe
    experts = moe.num_experts_per_tok if active else moe.num_experts
    params = d * moe.num_experts + experts * 3 * d * moe.moe_intermediate_size
    if moe.shared_expert_intermediate_size:
        params += 3 * d * moe.shared_expert_intermediate_size + d
    return params


def matmul_params(config: TransformerConfig | nn.Module) -> int:
    """``N_matmul`` of :func:`flops_per_token`: every matmul weight a token uses, output
    projection included (for MoE layers the router, the active experts and the shared expert)."""
    c = _config(config)
    d = c.hidden_size
    attn = d * c.q_size + 2 * d * c.kv_size + c.q_size * d
    layers = sum(attn + _mlp_params(c, i, active=True) for i in range(c.num_layers))
    return layers + c.vocab_size * d


def flops_per_token(
    config: TransformerConfig | nn.Module, seq_len: int, *, causal: bool = False
) -> int:
    """Training FLOPs (forward + backward) per token at sequence length ``seq_len``.

    ``6 * N_matmul + 12 * L * num_heads * head_dim * seq_len`` (see the module docstring);
    with ``causal=True`` the attention term is halved. Multiply by tokens per second and
    divide by the hardware's peak FLOP/s for MFU.
    """
    c = _config(config)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    attention = 12 * c.num_layers * c.q_size * seq_len
    if causal:
        attention //= 2
    return 6 * matmul_params(c) + attention
