"""``TransformerConfig``: the hyperparameters of a dense decoder-only language model.

One config type covers the Llama, Qwen and DeepSeek-V3 families; a family is a set of defaults
and switches on it (q/k/v bias for Qwen2, per-head q/k RMSNorm for Qwen3, Llama 3 RoPE frequency
scaling, tied embeddings, :class:`MoEConfig` for the mixture-of-experts layers,
:class:`MLAConfig` for multi-head latent attention, YaRN RoPE scaling and multi-token prediction
for DeepSeek-V3), not a separate model class.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from forge_kernels import Llama3RopeScaling

__all__ = ["Llama3RopeScaling", "MLAConfig", "MoEConfig", "TransformerConfig", "YarnRopeScaling"]


def _positive_int(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class YarnRopeScaling:
    """YaRN RoPE frequency scaling (Peng et al. 2023, "YaRN: Efficient Context Window Extension of
    Large Language Models", arXiv:2309.00071), as DeepSeek-V2/V3 use it (transformers
    ``rope_type="yarn"``).

    Frequencies whose wavelength fits ``beta_fast`` times into ``original_max_position_embeddings``
    are kept, those fitting fewer than ``beta_slow`` times are divided by ``factor``, and a linear
    ramp blends the band in between. ``cos``/``sin`` are multiplied by the attention factor
    ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` (``attention_factor`` overrides
    it), with ``mscale(s, m) = 0.1 * m * ln(s) + 1`` (1 for ``s <= 1``); DeepSeek's multi-head
    latent attention further multiplies its softmax scale by ``mscale(factor, mscale_all_dim)**2``.
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.factor <= 0:
            raise ValueError(f"YarnRopeScaling.factor must be > 0, got {self.factor}")
        if self.original_max_position_embeddings <= 0:
            raise ValueError(
                "YarnRopeScaling.original_max_position_embeddings must be > 0, got "
                f"{self.original_max_position_embeddings}"
            )
        if self.beta_fast <= 0 or self.beta_slow <= 0:
            raise ValueError(
                f"YarnRopeScaling needs beta_fast > 0 and beta_slow > 0, got {self.beta_fast}, "
                f"{self.beta_slow}"
            )

    @staticmethod
    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        """``0.1 * mscale * ln(scale) + 1`` for ``scale > 1``, else 1 (YaRN's attention temperature)."""
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    @property
    def cos_sin_factor(self) -> float:
        """What ``cos`` and ``sin`` are multiplied by (transformers' ``attention_scaling``)."""
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.mscale and self.mscale_all_dim:
            return float(
                self.get_mscale(self.factor, self.mscale)
                / self.get_mscale(self.factor, self.mscale_all_dim)
            )
        return self.get_mscale(self.factor)

    @property
    def softmax_mscale(self) -> float:
        """``mscale(factor, mscale_all_dim)`` (1 without ``mscale_all_dim``): multi-head latent
        attention multiplies its softmax scale ``1/sqrt(qk_head_dim)`` by it twice (DeepSeek-V2/V3)."""
        if not self.mscale_all_dim:
            return 1.0
        return self.get_mscale(self.factor, self.mscale_all_dim)


def _rope_scaling(value: Any) -> Llama3RopeScaling | YarnRopeScaling | None:
    if not isinstance(value, dict):
        return value
    values = dict(value)
    kind = values.pop("rope_type", "yarn" if "beta_fast" in values else "llama3")
    if kind == "yarn":
        return YarnRopeScaling(**values)
    if kind == "llama3":
        return Llama3RopeScaling(**values)
    raise ValueError(f"rope_scaling rope_type must be 'llama3' or 'yarn', got {kind!r}")


@dataclass(frozen=True, kw_only=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2, DeepSeek-AI 2024, arXiv:2405.04434, section 2.1;
    DeepSeek-V3, arXiv:2412.19437, section 2.1.1). Field names follow transformers'
    ``DeepseekV3Config``.

    Keys and values of all heads are up-projected from one shared latent ``c_kv`` of width
    ``kv_lora_rank`` (the only per-token state a KV cache needs), queries from a latent of width
    ``q_lora_rank`` (``None``: a plain ``q_proj``, DeepSeek-V2-Lite). Each head's query/key is
    ``qk_nope_head_dim`` channels without position plus ``qk_rope_head_dim`` channels with RoPE
    ("decoupled RoPE"; the key's RoPE part is shared by all heads); values have ``v_head_dim``.

    Args:
        rope_interleave: the RoPE channels pair as ``(2i, 2i + 1)`` (DeepSeek's checkpoints,
            transformers' default ``rope_interleave=True``), else as ``(i, i + d/2)``.
    """

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool = True

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            _positive_int("MLAConfig", name, getattr(self, name))
        if self.q_lora_rank is not None:
            _positive_int("MLAConfig", "q_lora_rank", self.q_lora_rank)
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"MLAConfig.qk_rope_head_dim must be even for RoPE, got {self.qk_rope_head_dim}"
            )

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width, ``qk_nope_head_dim + qk_rope_head_dim``."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """The mixture-of-experts part of a :class:`TransformerConfig` (Qwen2-MoE, Qwen3-MoE,
    DeepSeek-V3).

    Field names and meanings follow transformers' ``Qwen3MoeConfig`` / ``Qwen2MoeConfig`` /
    ``DeepseekV3Config``; the defaults are the Qwen-MoE behaviour.

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
        score_func: ``"softmax"`` over the experts (Qwen-MoE) or an independent ``"sigmoid"``
            affinity per expert (DeepSeek-V3, arXiv:2412.19437 eq. 15).
        routed_scaling_factor: multiplies the routed experts' weights (DeepSeek-V3: 2.5).
        n_group, topk_group: group-limited routing (DeepSeek-V3's node-limited routing): the
            experts form ``n_group`` groups and each token uses only the ``topk_group`` groups
            with the best sum of their two best scores. ``None``: no grouping.
        expert_bias: keep a per-expert selection bias buffer (``e_score_correction_bias``) for
            auxiliary-loss-free load balancing (Wang et al. 2024, arXiv:2408.15664; DeepSeek-V3
            section 2.1.2): it steers which experts are chosen, not their weights, and is updated
            by :meth:`CausalLM.update_expert_bias` with ``bias += bias_update_speed *
            sign(mean_load - load)`` after each optimizer step.
        bias_update_speed: ``gamma`` of that update (DeepSeek-V3: 0.001).
        shared_expert_gate: scale the shared expert per token by ``sigmoid(x @ W_gate)``
            (Qwen2-MoE); ``False``: add it ungated (DeepSeek's ``n_shared_experts`` experts, one
            MLP of width ``n_shared_experts * moe_intermediate_size``).
        aux_loss: which auxiliary balance loss ``output_router_logits`` computes: ``"switch"``
            (transformers' ``load_balancing_loss_func`` over all layers, Fedus et al. 2021) or
            ``"sequence"`` (DeepSeek-V3's sequence-wise balance loss, eqs. 17-20, summed over
            the MoE layers; each packed document or padded row is one sequence). Its weight is
            ``router_aux_loss_coef`` (DeepSeek-V3's ``alpha``, 1e-4).
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
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    routed_scaling_factor: float = 1.0
    n_group: int | None = None
    topk_group: int | None = None
    expert_bias: bool = False
    bias_update_speed: float = 0.001
    shared_expert_gate: bool = True
    aux_loss: Literal["switch", "sequence"] = "switch"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
        if self.score_func not in ("softmax", "sigmoid"):
            raise ValueError(
                f"MoEConfig.score_func must be 'softmax' or 'sigmoid', got {self.score_func!r}"
            )
        if self.aux_loss not in ("switch", "sequence"):
            raise ValueError(
                f"MoEConfig.aux_loss must be 'switch' or 'sequence', got {self.aux_loss!r}"
            )
        if (self.n_group is None) != (self.topk_group is None):
            raise ValueError(
                "group-limited routing needs both n_group and topk_group (or neither), got "
                f"n_group={self.n_group}, topk_group={self.topk_group}"
            )
        if self.n_group is not None:
            if self.n_group < 1 or self.num_experts % self.n_group:
                raise ValueError(
                    f"n_group ({self.n_group}) must be a positive divisor of num_experts "
                    f"({self.num_experts})"
                )
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError(
                    f"topk_group must be between 1 and n_group ({self.n_group}), got {self.topk_group}"
                )
            reachable = self.topk_group * (self.num_experts // self.n_group)
            if self.num_experts_per_tok > reachable:
                raise ValueError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the {reachable} "
                    f"experts of the topk_group={self.topk_group} best groups; raise topk_group"
                )
        if self.routed_scaling_factor <= 0 or self.bias_update_speed < 0:
            raise ValueError(
                f"routed_scaling_factor must be > 0 and bias_update_speed >= 0, got "
                f"{self.routed_scaling_factor}, {self.bias_update_speed}"
            )
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
        mla: an :class:`MLAConfig` for multi-head latent attention (DeepSeek-V2/V3) instead of
            GQA; ``head_dim`` is then ``qk_nope_head_dim + qk_rope_head_dim``, ``num_kv_heads``
            equals ``num_heads`` and RoPE covers ``qk_rope_head_dim`` channels.
        mtp_depth: ``D`` multi-token prediction modules (DeepSeek-V3 section 2.2), a training
            option: with labels, module ``k`` predicts token ``t + k + 1`` and the loss gains
            ``mtp_loss_weight / D * sum_k loss_k``. 0: none.
        mtp_loss_weight: ``lambda`` of the MTP loss (DeepSeek-V3: 0.3, then 0.1).
        mrope_section: multimodal RoPE (M-RoPE, Qwen2-VL, Wang et al. 2024, arXiv:2409.12191):
            how many of the ``rope_dim // 2`` frequencies follow the temporal, height and width
            position (e.g. ``(16, 24, 24)``); position ids are then ``[3, B, S]``. ``None``: 1-D
            RoPE.
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
    rope_scaling: Llama3RopeScaling | YarnRopeScaling | None = None
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
    mla: MLAConfig | None = None
    mtp_depth: int = 0
    mtp_loss_weight: float = 0.3
    mrope_section: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            object.__setattr__(self, "moe", MoEConfig(**self.moe))
        if isinstance(self.mla, dict):
            object.__setattr__(self, "mla", MLAConfig(**self.mla))
        if self.mla is not None:
            for name, value in (
                ("num_kv_heads", self.num_heads),
                ("head_dim", self.mla.qk_head_dim),
            ):
                if getattr(self, name) not in (None, value):
                    raise ValueError(
                        f"with multi-head latent attention {name} is {value} (num_heads, "
                        f"qk_nope_head_dim + qk_rope_head_dim), got {getattr(self, name)}; leave "
                        "it unset"
                    )
                object.__setattr__(self, name, value)
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None and self.num_heads > 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        object.__setattr__(self, "rope_scaling", _rope_scaling(self.rope_scaling))
        if not isinstance(self.mtp_depth, int) or self.mtp_depth < 0:
            raise ValueError(f"mtp_depth must be an int >= 0, got {self.mtp_depth!r}")
        if self.mtp_loss_weight < 0:
            raise ValueError(f"mtp_loss_weight must be >= 0, got {self.mtp_loss_weight}")
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
        if self.rope_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.mrope_section is not None:
            section = tuple(int(s) for s in self.mrope_section)
            if len(section) != 3 or min(section) < 0 or sum(section) != self.rope_dim // 2:
                raise ValueError(
                    f"mrope_section must be 3 non-negative ints (temporal, height, width) summing "
                    f"to rope_dim // 2 = {self.rope_dim // 2}, got {list(self.mrope_section)}"
                )
            if self.mla is not None or isinstance(self.rope_scaling, YarnRopeScaling):
                raise ValueError("mrope_section does not combine with MLA or YaRN rope scaling")
            object.__setattr__(self, "mrope_section", section)
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

    @property
    def rope_dim(self) -> int:
        """Channels per head that RoPE rotates: ``head_dim``, or MLA's ``qk_rope_head_dim``."""
        return self.head_dim if self.mla is None else self.mla.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` is a mixture-of-experts layer (``layer_idx >= num_layers``:
        the multi-token prediction modules' blocks)."""
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
            kind = "yarn" if isinstance(self.rope_scaling, YarnRopeScaling) else "llama3"
            data["rope_scaling"] = {"rope_type": kind, **dataclasses.asdict(self.rope_scaling)}
        return data
