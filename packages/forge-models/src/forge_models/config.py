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

__all__ = ["Llama3RopeScaling", "TransformerConfig"]


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

    def __post_init__(self) -> None:
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
        """Plain-data view (``rope_scaling`` as a dict), e.g. for logging."""
        data = dataclasses.asdict(self)
        if self.rope_scaling is not None:
            data["rope_scaling"] = dataclasses.asdict(self.rope_scaling)
        return data
