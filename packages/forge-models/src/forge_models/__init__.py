"""Forge model zoo: LLM, MoE, ViT, VLM, video DiT and VLA built from shared blocks.

This release has the dense and mixture-of-experts text families, built from one set of blocks
(:mod:`forge_models.blocks`) and one model class (:class:`CausalLM`):

- ``llama``: Llama 2, Llama 3, Llama 3.1, Llama 3.2 (text);
- ``qwen2``: Qwen2, Qwen2.5;
- ``qwen3``: Qwen3 dense;
- ``qwen2_moe``: Qwen2-MoE, Qwen1.5-MoE (shared expert);
- ``qwen3_moe``: Qwen3-MoE;
- ``deepseek_v3``: DeepSeek-V3 (multi-head latent attention, sigmoid group-limited MoE with
  shared experts and the aux-loss-free bias, multi-token prediction).

::

    import forge_models

    model = forge_models.build_model("llama-debug")              # or "llama3-8b", device="meta"
    loss = model(input_ids, labels=input_ids)                    # fused linear cross-entropy
    model = forge_models.from_pretrained("path/to/hf_folder")   # via forge-ckpt
    forge_models.save_pretrained(model, "out")
"""

from forge_models.blocks import (
    Attention,
    AttentionInputs,
    GatedMLP,
    MoEBlock,
    MoEExperts,
    MultiHeadLatentAttention,
    MultiTokenPrediction,
    RMSNorm,
    RouterOutput,
    TransformerBlock,
)
from forge_models.causal_lm import IGNORE_INDEX, CausalLM, MoEStats, shift_labels
from forge_models.config import (
    Llama3RopeScaling,
    MLAConfig,
    MoEConfig,
    TransformerConfig,
    YarnRopeScaling,
)
from forge_models.flops import (
    active_params,
    count_params,
    flops_per_token,
    linear_layers,
    matmul_params,
)
from forge_models.hf import from_pretrained, load_hf_weights, save_pretrained
from forge_models.parallel_plan import DEEPSEEK_V3_TP_PLAN, DENSE_TP_PLAN, MOE_TP_PLAN, STYLES
from forge_models.registry import (
    ModelFamily,
    build_model,
    family_for_hf_config,
    get_config,
    get_family,
    list_families,
    list_sizes,
    materialize,
    register_family,
    register_size,
)

__version__ = "0.1.0"

__all__ = [
    "DEEPSEEK_V3_TP_PLAN",
    "DENSE_TP_PLAN",
    "IGNORE_INDEX",
    "MOE_TP_PLAN",
    "STYLES",
    "Attention",
    "AttentionInputs",
    "CausalLM",
    "GatedMLP",
    "Llama3RopeScaling",
    "MLAConfig",
    "MoEBlock",
    "MoEConfig",
    "MoEExperts",
    "MoEStats",
    "ModelFamily",
    "MultiHeadLatentAttention",
    "MultiTokenPrediction",
    "RMSNorm",
    "RouterOutput",
    "TransformerBlock",
    "TransformerConfig",
    "YarnRopeScaling",
    "active_params",
    "build_model",
    "count_params",
    "family_for_hf_config",
    "flops_per_token",
    "from_pretrained",
    "get_config",
    "get_family",
    "linear_layers",
    "list_families",
    "list_sizes",
    "load_hf_weights",
    "materialize",
    "matmul_params",
    "register_family",
    "register_size",
    "save_pretrained",
    "shift_labels",
]
