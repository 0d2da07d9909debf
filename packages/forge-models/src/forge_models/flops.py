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
  (``3 * hidden * shared_expert_intermediate_size``, ``+ hidden`` for its gate) where there is
  one. Dense layers of an MoE model (``mlp_only_layers``, ``decoder_sparse_step``) count their
  dense MLP. :func:`count_params` counts every expert.
- Multi-head latent attention (DeepSeek-V2 arXiv:2405.04434, DeepSeek-V3 arXiv:2412.19437)
  counts its five projections as they run in training (keys and values up-projected per
  head): ``q`` (``hidden * H * (d_nope + d_rope)``, or through the q latent
  ``hidden * q_lora_rank + q_lora_rank * H * (d_nope + d_rope)``), ``kv_a``
  (``hidden * (kv_lora_rank + d_rope)``), ``kv_b`` (``kv_lora_rank * H * (d_nope + d_v)``) and
  ``o`` (``H * d_v * hidden``). Its attention term is ``6 * L * H * (d_nope + d_rope + d_v) *
  seq_len`` (``q kᵀ`` over the query/key width, ``softmax · v`` over the value width; the GQA
  formula's ``12 L H Q T`` is this with both widths equal to ``head_dim``).
- Multi-token prediction modules (``mtp_depth`` ``D``) run in training: each adds its
  ``eh_proj`` (``2 * hidden * hidden``), its block and another pass through the output
  projection to ``N_matmul``, and its block's attention to the attention term.

A vision-language model's encoder and projector cost per image, not per token (patches, and
windowed or per-tile attention): :func:`forge_models.vision_flops.visual_flops` counts them
per batch of visual items, in the same convention; add it to ``tokens x flops_per_token``.
"""

from __future__ import annotations

from torch import nn

from forge_models.config import TransformerConfig

__all__ = ["active_params", "count_params", "flops_per_token", "matmul_params"]


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
    d = c.hidden_size
    attn = _attn_params(c, with_norms_and_biases=True)
    layers = [*range(c.num_layers), *range(c.num_layers, c.num_layers + c.mtp_depth)]
    total = sum(attn + _mlp_params(c, i, active=False) + 2 * d for i in layers)
    total += c.mtp_depth * (2 * d * d + 3 * d)  # eh_proj, enorm, hnorm, norm
    table = c.padded_vocab_size * d
    total += d + (0 if c.tie_word_embeddings else table)
    return total + table if embedding else total


def _attn_params(c: TransformerConfig, *, with_norms_and_biases: bool = False) -> int:
    """Weights of one attention layer's projections (plus its norms and biases if asked)."""
    d, mla = c.hidden_size, c.mla
    if mla is None:
        params = d * c.q_size + 2 * d * c.kv_size + c.q_size * d
        if with_norms_and_biases:
            params += (c.q_size + 2 * c.kv_size) * c.attention_bias + d * c.attention_out_bias
            params += 2 * c.head_dim * c.qk_norm
        return params
    h, q_out = c.num_heads, c.num_heads * mla.qk_head_dim
    params = d * q_out if mla.q_lora_rank is None else d * mla.q_lora_rank + mla.q_lora_rank * q_out
    params += d * (mla.kv_lora_rank + mla.qk_rope_head_dim)
    params += mla.kv_lora_rank * h * (mla.qk_nope_head_dim + mla.v_head_dim)
    params += h * mla.v_head_dim * d
    if with_norms_and_biases:
        params += mla.kv_lora_rank + (mla.q_lora_rank or 0)  # latent norms
        if c.attention_bias:  # q_a_proj (with a q latent), kv_a_proj and o_proj
            params += (mla.q_lora_rank or 0) + mla.kv_lora_rank + mla.qk_rope_head_dim + d
    return params


def _mlp_params(c: TransformerConfig, layer_idx: int, *, active: bool) -> int:
    """Weights of layer ``layer_idx``'s MLP (of a token's active experts with ``active``)."""
    d = c.hidden_size
    if not c.is_moe_layer(layer_idx):
        return 3 * d * c.intermediate_size
    moe = c.moe
    experts = moe.num_experts_per_tok if active else moe.num_experts
    params = d * moe.num_experts + experts * 3 * d * moe.moe_intermediate_size
    if moe.shared_expert_intermediate_size:
        params += 3 * d * moe.shared_expert_intermediate_size + d * moe.shared_expert_gate
    return params


def matmul_params(config: TransformerConfig | nn.Module) -> int:
    """``N_matmul`` of :func:`flops_per_token`: every matmul weight a token uses, output
    projection included (for MoE layers the router, the active experts and the shared expert)."""
    c = _config(config)
    d = c.hidden_size
    attn = _attn_params(c)
    layers = sum(attn + _mlp_params(c, i, active=True) for i in range(c.num_layers + c.mtp_depth))
    mtp = c.mtp_depth * (2 * d * d + c.vocab_size * d)
    return layers + c.vocab_size * d + mtp


def active_params(config: TransformerConfig | nn.Module, *, embedding: bool = True) -> int:
    """Parameters one token computes with (the "activated parameters" of MoE model cards): every
    parameter except the experts a token is not routed to, without the multi-token prediction
    modules (which only run in training).

    Model cards differ on the input embedding table: Qwen counts it (Qwen3-30B-A3B: 3.3B,
    Qwen1.5-MoE-A2.7B: 2.7B), DeepSeek does not (DeepSeek-V3: 37B, DeepSeek-V2-Lite: 2.4B):
    ``embedding=False`` leaves it out (the output projection counts either way, also when tied).
    """
    c = _config(config)
    if c.mtp_depth:
        c = c.replace(mtp_depth=0)
    inactive = sum(
        _mlp_params(c, i, active=False) - _mlp_params(c, i, active=True)
        for i in range(c.num_layers)
    )
    table = c.padded_vocab_size * c.hidden_size
    tied_head = table if c.tie_word_embeddings else 0
    total = count_params(c, embedding=False) + tied_head - inactive
    return total + table if embedding else total


def flops_per_token(
    config: TransformerConfig | nn.Module, seq_len: int, *, causal: bool = False
) -> int:
    """Training FLOPs (forward + backward) per token at sequence length ``seq_len``.

    ``6 * N_matmul + 12 * L * num_heads * head_dim * seq_len`` (see the module docstring; MLA:
    ``6 * L * H * (qk_head_dim + v_head_dim) * seq_len``, ``L`` including the MTP blocks);
    with ``causal=True`` the attention term is halved. Multiply by tokens per second and
    divide by the hardware's peak FLOP/s for MFU.
    """
    c = _config(config)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    layers = c.num_layers + c.mtp_depth
    if c.mla is None:
        attention = 12 * layers * c.q_size * seq_len
    else:
        attention = 6 * layers * c.num_heads * (c.mla.qk_head_dim + c.mla.v_head_dim) * seq_len
    if causal:
        attention //= 2
    return 6 * matmul_params(c) + attention
