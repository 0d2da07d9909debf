"""``TransformerConfig``: the hyperparameters of a dense decoder-only language model.

One config type covers the Llama and Qwen dense families; a family is a set of defaults and
switches on it (q/k/v bias for Qwen2, per-head q/k RMSNorm for Qwen3, Llama 3 RoPE frequency
scaling, tied embeddings), not a separate model class.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from forge_kernels import Llama3RopeScaling

__all__ = ["Llama3RopeScaling", "MoEConfig", "TransformerConfig"]


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """The mixture-of-experts part of a :class:`TransformerConfig` (Qwen2-MoE, Qwen3-MoE).

    Field names and meanings follow transformers' ``Qwen3MoeConfig`` / ``Qwen2MoeConfig``.

    Args:
        num_experts: routed experts per MoE layer.
        num_experts_per_tok: experts chosen per token (top-k, softmax router).
        moe_intermediate_size: hidden width of each routed expert's SwiGLU MLP.
        norm_topk_prob: renormalize the chosen top-k probabilities to sum to one.
        shared_expert_intermediate_size: width of the always-on shared expert, gated per token
            by ``sigmoid(x @ shared_expert_gate)`` (Qwen2-MoE); 0 for none (Qwen3-MoE).
        decoder_sparse_step: layer ``i`` is MoE iff ``(i + 1) % decoder_sparse_step == 0``
            and ``i not in mlp_only_layers``; the others use the dense MLP of
            ``TransformerConfig.intermediate_size``.
        mlp_only_layers: layer indices forced to the dense MLP.
        router_aux_loss_coef: weight of the load-balancing loss added to the loss when router
            logits are requested (Switch Transformer, Fedus et al. 2021, arXiv:2101.03961).
        output_router_logits: compute the auxiliary loss (and keep the router logits) by
            default, as transformers' ``output_router_logits``.
    """

    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
        for name in (
            "num_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "decoder_sparse_step",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MoEConfig.{name} must be a positive int, got {value!r}")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) cannot exceed num_experts "
                f"({self.num_experts})"
            )
        if self.shared_expert_intermediate_size < 0:
            raise ValueError("shared_expert_intermediate_size must be >= 0 (0: no shared expert)")

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` has routed experts (transformers' rule)."""
        return (
            layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )


@dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """A pre-norm decoder-only transformer: RMSNorm, RoPE attention with GQA, SwiGLU MLP.

    Args:
        family: the registered family (``"llama"``, ``"qwen2"``, ``"qwen3"``) that owns the
            checkpoint mapping, the HF config translation and the default parallel plan.
        vocab_size: real vocabulary size (what the tokenizer and the checkpoint have).
        hidden_size, intermediate_size, num_layers: model width, MLP width, depth.
        num_heads: query heads. ``num_kv_heads``: key/value heads (grouped-query attention,
            Ainslie et al. 2023); defaults to ``num_heads`` (multi-head attention).
        head_dim: defaults to ``hidden_size // num_heads`` (Qwen3 sets it explicitly).
        rope_theta: RoPE base (Su et al. 2021). ``rope_scaling``: Llama 3.1 frequency scaling.
        max_position_embeddings: the context length the model was trained for (informational:
            RoPE has no table, any position works).
        rms_norm_eps: epsilon of every RMSNorm.
        attention_bias: biases on the q/k/v projections (Qwen2; Llama and Qwen3 when their
            config sets ``attention_bias``).
        attention_out_bias: a bias on the output projection ``o_proj`` (Llama and Qwen3 with
            ``attention_bias``; never in Qwen2).
        qk_norm: RMSNorm over the head dim of q and k before RoPE (Qwen3).
        tie_word_embeddings: the output projection shares the input embedding matrix.
        initializer_range: std of the normal init of linear and embedding weights.
        pad_token_id: the embedding row whose gradient is zero (``nn.Embedding(padding_idx)``,
            as transformers builds it when the config sets one).
        vocab_pad_multiple: embedding / output rows are padded to a multiple of this (for
            tensor parallelism); the padding rows are never used in logits or the loss.
        moe: a :class:`MoEConfig` for mixture-of-experts families (its MoE layers replace the
            dense MLP); ``None`` for dense models.
    """

    family: str = "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    attention_out_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    vocab_pad_multiple: int = 1
    moe: MoEConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            object.__setattr__(self, "moe", MoEConfig(**self.moe))
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None and self.num_heads > 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", Llama3RopeScaling(**self.rope_scaling))
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "vocab_pad_multiple",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TransformerConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"pad_token_id {self.pad_token_id} is outside the vocabulary [0, {self.vocab_size})"
            )
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0 or self.initializer_range < 0:
            raise ValueError("rope_theta and rms_norm_eps must be > 0, initializer_range >= 0")

    # ----------------------------------------------------------------------------------------
    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and output matrices: ``vocab_size`` rounded up to the multiple."""
        return math.ceil(self.vocab_size / self.vocab_pad_multiple) * self.vocab_pad_multiple

    @property
    def q_size(self) -> int:
        """Width of the query projection output, ``num_heads * head_dim``."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of each of the key and value projection outputs, ``num_kv_heads * head_dim``."""
        return self.num_kv_heads * self.head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` is a mixture-of-experts layer."""
        return self.moe is not None and self.moe.is_moe_layer(layer_idx)

    def replace(self, **changes: Any) -> TransformerConfig:
        """A copy with ``changes`` (``ValueError`` naming the valid fields for an unknown one).

        Only the named fields change: ``head_dim`` and ``num_kv_heads`` keep their resolved
        values, so give them too when changing ``hidden_size`` or ``num_heads``.
        """
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - fields)
        if unknown:
            raise ValueError(
                f"unknown TransformerConfig field(s) {unknown}; valid fields: {sorted(fields)}"
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data view (``rope_scaling`` and ``moe`` as dicts), e.g. for logging."""
        data = dataclasses.asdict(self)
        if self.rope_scaling is not None:
            data["rope_scaling"] = dataclasses.asdict(self.rope_scaling)
        return data
