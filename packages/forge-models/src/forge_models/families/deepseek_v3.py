"""DeepSeek-V3: registry entry and size table.

DeepSeek-V3 Technical Report, DeepSeek-AI 2024, arXiv:2412.19437 (multi-head latent attention
from DeepSeek-V2, arXiv:2405.04434): MLA with a q latent (``q_lora_rank`` 1536) and a kv latent
(``kv_lora_rank`` 512), decoupled interleaved RoPE with YaRN scaling; DeepSeekMoE layers (256
routed experts, 8 per token, chosen by sigmoid affinities within the 4 best of 8 groups, weights
renormalized and scaled by 2.5, one ungated shared expert, the aux-loss-free selection bias)
after 3 dense layers; multi-token prediction (one module) as a training objective.

Hyperparameters are those of the released ``config.json`` (deepseek-ai/DeepSeek-V3 on the
Hugging Face Hub). ``deepseek-v2-lite`` has DeepSeek-V2-Lite's dimensions (deepseek-ai/
DeepSeek-V2-Lite: no q latent, 64 routed + 2 shared experts, top-6, 1 dense layer) on this
family's architecture: V2's softmax router with greedy expert selection is not reproduced, so
it matches V2-Lite's parameter counts, not its checkpoints' outputs.

Loading from transformers (``DeepseekV3ForCausalLM``): its config has no auxiliary-loss weight,
so ``router_aux_loss_coef`` is the paper's ``alpha = 1e-4`` (or the original DeepSeek config's
``aux_loss_alpha``); transformers does not hold the multi-token prediction module (its config
says ``num_nextn_predict_layers: 1`` but it saves no MTP tensors), so ``mtp_depth`` comes from
the checkpoint's tensors: :func:`forge_models.from_pretrained` builds as many MTP modules as
DeepSeek's own release stores (``model.layers.{num_hidden_layers + k}.*``, mapped by forge-ckpt),
none for a transformers-saved folder. For that reason :func:`config_from_hf` does not read
``num_nextn_predict_layers``. No expert groups (``n_group`` ``None``) is written as one group of
which one is chosen (``n_group = topk_group = 1``: the same routing, which transformers runs),
and read back as ``None``; keys a ``config.json`` leaves out take ``DeepseekV3Config``'s
defaults (:data:`HF_DEFAULTS`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from forge_models.causal_lm import CausalLM
from forge_models.config import MLAConfig, MoEConfig, TransformerConfig, YarnRopeScaling
from forge_models.families._hf_config import dense_config_from_hf, dense_config_to_hf
from forge_models.parallel_plan import DEEPSEEK_V3_TP_PLAN
from forge_models.registry import ModelFamily

__all__ = ["FAMILY", "SIZES"]

#: DeepSeek-V3's sequence-wise balance loss weight ``alpha`` (section 4.2).
SEQ_AUX_ALPHA = 1e-4

#: The values transformers' ``DeepseekV3Config`` (5.x ``configuration_deepseek_v3.py``) takes for
#: keys a ``config.json`` leaves out, so a sparse config reads as transformers reads it.
HF_DEFAULTS: dict[str, Any] = {
    "n_routed_experts": 256,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 2048,
    "n_shared_experts": 1,
    "routed_scaling_factor": 2.5,
    "n_group": 8,
    "topk_group": 4,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "rope_interleave": True,
    "max_position_embeddings": 4096,
}


def _hf(hf: Mapping[str, Any], key: str) -> Any:
    """``hf[key]``, or transformers' default where the key is missing (``null`` stays ``None``)."""
    return hf[key] if key in hf else HF_DEFAULTS[key]


def _groups(hf: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """``(n_group, topk_group)``; one group (1 of 1, what forge writes for no groups, since
    transformers cannot route with ``null``) or ``null`` is no group-limited routing."""
    n_group, topk_group = _hf(hf, "n_group"), _hf(hf, "topk_group")
    if n_group is None or (int(n_group) == 1 and int(topk_group or 1) == 1):
        return None, None
    return int(n_group), int(topk_group)


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> TransformerConfig:
    for key, expected in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
        if hf.get(key, expected) != expected:
            raise ValueError(
                f"deepseek_v3: {key}={hf[key]!r} is not supported (DeepSeek-V3 routes with "
                f"{key}={expected!r})"
            )
    moe_inter = int(_hf(hf, "moe_intermediate_size"))
    n_group, topk_group = _groups(hf)
    overrides.setdefault(
        "moe",
        MoEConfig(
            num_experts=int(_hf(hf, "n_routed_experts")),
            num_experts_per_tok=int(_hf(hf, "num_experts_per_tok")),
            moe_intermediate_size=moe_inter,
            norm_topk_prob=bool(_hf(hf, "norm_topk_prob")),
            shared_expert_intermediate_size=int(_hf(hf, "n_shared_experts") or 0) * moe_inter,
            shared_expert_gate=False,
            mlp_only_layers=tuple(range(int(_hf(hf, "first_k_dense_replace") or 0))),
            score_func="sigmoid",
            routed_scaling_factor=float(_hf(hf, "routed_scaling_factor")),
            n_group=n_group,
            topk_group=topk_group,
            expert_bias=True,
            aux_loss="sequence",
            router_aux_loss_coef=float(hf.get("aux_loss_alpha", SEQ_AUX_ALPHA)),
            output_router_logits=bool(hf.get("output_router_logits", False)),
        ),
    )
    q_lora = _hf(hf, "q_lora_rank")
    overrides.setdefault(
        "mla",
        MLAConfig(
            q_lora_rank=None if q_lora is None else int(q_lora),
            kv_lora_rank=int(_hf(hf, "kv_lora_rank")),
            qk_nope_head_dim=int(_hf(hf, "qk_nope_head_dim")),
            qk_rope_head_dim=int(_hf(hf, "qk_rope_head_dim")),
            v_head_dim=int(_hf(hf, "v_head_dim")),
            rope_interleave=bool(_hf(hf, "rope_interleave")),
        ),
    )

    # transformers writes head_dim = qk_rope_head_dim and a num_key_value_heads MLA ignores.
    overrides.setdefault("head_dim", None)
    overrides.setdefault("num_kv_heads", None)
    return dense_config_from_hf(
        hf,
        family="deepseek_v3",
        attention_bias=None,
        attention_out_bias=None,
        qk_norm=False,
        allow_yarn=True,
        hf_defaults={"max_position_embeddings": HF_DEFAULTS["max_position_embeddings"]},
        **overrides,
    )


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    moe, mla = config.moe, config.mla
    if moe is None or mla is None or config.qk_norm:
        raise ValueError("a DeepSeek-V3 checkpoint needs moe and mla configs and no q/k norm")
    first_k = len(moe.mlp_only_layers)
    checks = {
        "score_func='sigmoid'": moe.score_func == "sigmoid",
        "expert_bias=True": moe.expert_bias,
        "shared_expert_gate=False": not moe.shared_expert_gate,
        "decoder_sparse_step=1": moe.decoder_sparse_step == 1,
        "mlp_only_layers = the first k layers": moe.mlp_only_layers == tuple(range(first_k)),
        "shared_expert_intermediate_size a multiple of moe_intermediate_size": (
            moe.shared_expert_intermediate_size % moe.moe_intermediate_size == 0
        ),
    }
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        raise ValueError(f"a DeepSeek-V3 checkpoint cannot express this config; it needs {failed}")
    return dense_config_to_hf(
        config,
        architecture="DeepseekV3ForCausalLM",
        model_type="deepseek_v3",
        extra={
            "head_dim": mla.qk_rope_head_dim,
            "num_key_value_heads": config.num_heads,
            "q_lora_rank": mla.q_lora_rank,
            "kv_lora_rank": mla.kv_lora_rank,
            "qk_nope_head_dim": mla.qk_nope_head_dim,
            "qk_rope_head_dim": mla.qk_rope_head_dim,
            "v_head_dim": mla.v_head_dim,
            "rope_interleave": mla.rope_interleave,
            "n_routed_experts": moe.num_experts,
            "n_shared_experts": moe.shared_expert_intermediate_size // moe.moe_intermediate_size,
            "num_experts_per_tok": moe.num_experts_per_tok,
            "moe_intermediate_size": moe.moe_intermediate_size,
            "norm_topk_prob": moe.norm_topk_prob,
            "routed_scaling_factor": moe.routed_scaling_factor,
            # No group-limited routing is one group, of which the one is chosen.
            "n_group": 1 if moe.n_group is None else moe.n_group,
            "topk_group": 1 if moe.n_group is None else moe.topk_group,
            "first_k_dense_replace": first_k,
            "aux_loss_alpha": moe.router_aux_loss_coef,
            "output_router_logits": moe.output_router_logits,
            "num_nextn_predict_layers": config.mtp_depth,
        },
    )


FAMILY = ModelFamily(
    name="deepseek_v3",
    description="DeepSeek-V3: MLA, sigmoid group-limited MoE with shared experts, MTP "
    "(arXiv:2412.19437)",
    model_cls=CausalLM,
    ckpt_mapping="deepseek_v3",
    hf_model_types=("deepseek_v3",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    tp_plan=DEEPSEEK_V3_TP_PLAN,
)


def _size(
    vocab: int, d: int, ffn: int, layers: int, heads: int, mla: MLAConfig, moe: MoEConfig, **kw
) -> TransformerConfig:
    values = {
        "rope_theta": 10000.0,
        "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-6,
        "rope_scaling": YarnRopeScaling(
            factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
            mscale=1.0, mscale_all_dim=1.0,
        ),
        **kw,
    }  # fmt: skip
    return TransformerConfig(
        family="deepseek_v3", vocab_size=vocab, hidden_size=d, intermediate_size=ffn,
        num_layers=layers, num_heads=heads, mla=mla, moe=moe, **values,
    )  # fmt: skip


def _moe(experts: int, shared: int, top_k: int, ffn: int, dense: int, **kw) -> MoEConfig:
    return MoEConfig(
        num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=ffn,
        shared_expert_intermediate_size=shared * ffn, shared_expert_gate=False,
        mlp_only_layers=tuple(range(dense)), norm_topk_prob=True, score_func="sigmoid",
        expert_bias=True, aux_loss="sequence", router_aux_loss_coef=SEQ_AUX_ALPHA, **kw,
    )  # fmt: skip


SIZES: dict[str, TransformerConfig] = {
    # 671B total, 37B activated per token (section 4.2); + 14B for the MTP module (mtp_depth=1).
    "deepseek-v3-671b": _size(
        129280, 7168, 18432, 61, 128,
        MLAConfig(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                  v_head_dim=128),
        _moe(256, 1, 8, 2048, 3, routed_scaling_factor=2.5, n_group=8, topk_group=4),
    ),
    # DeepSeek-V2-Lite's dimensions (15.7B total, 2.4B activated), see the module docstring.
    "deepseek-v2-lite": _size(
        102400, 2048, 10944, 27, 16,
        MLAConfig(q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                  v_head_dim=128),
        _moe(64, 2, 6, 1408, 1),
        rope_scaling=YarnRopeScaling(
            factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
            mscale=0.707, mscale_all_dim=0.707,
        ),
    ),
    # Tiny sizes for tests and debugging: with a q latent, 2 groups of 4 experts, one dense
    # layer, YaRN, one MTP module; and without a q latent or groups.
    "deepseek-v3-debug": _size(
        512, 64, 160, 3, 4,
        MLAConfig(q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                  v_head_dim=16),
        _moe(8, 1, 2, 32, 1, routed_scaling_factor=2.5, n_group=2, topk_group=1),
        max_position_embeddings=256, mtp_depth=1,
        rope_scaling=YarnRopeScaling(
            factor=4.0, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=1.0
        ),
    ),
    "deepseek-v2-lite-debug": _size(
        512, 64, 160, 2, 4,
        MLAConfig(q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                  v_head_dim=16),
        _moe(8, 2, 2, 32, 1),
        max_position_embeddings=256, rope_scaling=None,
    ),
}  # fmt: skip
