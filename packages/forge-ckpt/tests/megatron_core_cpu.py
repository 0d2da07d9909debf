"""Shared by the optional megatron-core tests: megatron-core's ``GPTModel`` on CPU (gloo).

Not a test module. The tests import it in the subprocesses they run (this folder is then the
script's folder, first on ``sys.path``). megatron-core builds its GPTModel on CPU with the local
layer spec; its forward makes CUDA-only bookkeeping calls, which :func:`init_megatron_on_cpu`
points at the CPU as forge-bench's Megatron test does: ``torch.cuda.current_device`` (the RoPE
table's device, the router weight's, the pipeline send buffers'), the dropout RNG tracker's
``fork`` (dropout is 0), ``torch.cuda.synchronize`` (a no-op: ``dist_checkpointing.save``
waits on the device before writing) and, for MoE, ``moe_utils.te_general_gemm`` (megatron-core 0.16 leaves
the name undefined without Transformer Engine; ``None`` selects its own ``torch.mm`` path). No
numerics are replaced.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Any

#: TransformerConfig settings of every check: no dropout, no fusions, weights built on the CPU.
CPU_CONFIG = {
    "hidden_dropout": 0.0, "attention_dropout": 0.0, "bias_activation_fusion": False,
    "bias_dropout_fusion": False, "masked_softmax_fusion": False, "apply_rope_fusion": False,
    "persist_layer_norm": False, "gradient_accumulation_fusion": False,
    "use_cpu_initialization": True,
}  # fmt: skip


def init_megatron_on_cpu(
    *,
    rank: int = 0,
    world_size: int = 1,
    store: Any = None,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    expert_parallel: int = 1,
) -> None:
    """A gloo process group (``store``: a ``torch.distributed`` store shared by the ranks; one
    rank: a private ``HashStore``) and megatron's parallel state over it, the CUDA-only
    bookkeeping pointed at the CPU (see the module doc); numerics untouched."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as megatron_random
    from megatron.core.transformer.moe import moe_utils

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    megatron_random.CudaRNGStatesTracker.fork = lambda self, *a, **k: contextlib.nullcontext()
    moe_utils.te_general_gemm = None
    # megatron-core 0.16 passes torch >= 2.15's TensorProperties.strides on to torch.empty.
    empty = torch.empty
    torch.empty = lambda *a, strides=None, **k: empty(*a, **k)
    if store is None:
        store = dist.HashStore()
    # A rank left alone (its peers failed or were killed) gives up after minutes, not hours.
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(minutes=4)
    )
    ps.initialize_model_parallel(
        tensor_parallel, pipeline_parallel, expert_model_parallel_size=expert_parallel
    )


def megatron_gpt(
    hcfg: Any,
    *,
    qk_layernorm: bool,
    vocab_size: int = 128,
    pre_process: bool = True,
    post_process: bool = True,
    parallel_output: bool = True,
):
    """megatron-core's GPTModel (local spec, float32, no dropout or fusions) with the shape of
    the transformers config ``hcfg`` (Llama / Qwen3 / Qwen3-MoE style: RMSNorm, SwiGLU, RoPE,
    GQA; routed experts when ``hcfg.num_experts``), ``vocab_size`` rows (padded) and, under
    pipeline parallelism, the stage's part (``pre_process``: embedding; ``post_process``: final
    norm and output layer; the split is read from megatron's parallel state)."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    moe = {}
    if getattr(hcfg, "num_experts", None):
        dense = set(hcfg.mlp_only_layers)
        moe = {
            "num_moe_experts": hcfg.num_experts, "moe_router_topk": hcfg.num_experts_per_tok,
            "moe_ffn_hidden_size": hcfg.moe_intermediate_size,
            "moe_layer_freq": [int(i not in dense) for i in range(hcfg.num_hidden_layers)],
            # transformers: softmax over all experts, top-k, renormalized only if norm_topk_prob.
            "moe_router_pre_softmax": not hcfg.norm_topk_prob, "moe_router_load_balancing_type": "none",
            "moe_aux_loss_coeff": 0.0, "moe_token_dispatcher_type": "allgather", "moe_grouped_gemm": False,
            "moe_permute_fusion": False,
        }  # fmt: skip
    cfg = TransformerConfig(
        num_layers=hcfg.num_hidden_layers, hidden_size=hcfg.hidden_size,
        num_attention_heads=hcfg.num_attention_heads, num_query_groups=hcfg.num_key_value_heads,
        ffn_hidden_size=hcfg.intermediate_size, kv_channels=hcfg.head_dim, qk_layernorm=qk_layernorm,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, normalization="RMSNorm",
        layernorm_epsilon=hcfg.rms_norm_eps, add_bias_linear=False,
        params_dtype=torch.float32, **CPU_CONFIG, **moe,
        # The split as Megatron-LM's core_transformer_config_from_args records it (the
        # pipeline stage builds its share of the layers from it).
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
        pipeline_dtype=torch.float32,
    )  # fmt: skip
    spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, normalization="RMSNorm")
    theta = (getattr(hcfg, "rope_parameters", None) or {}).get("rope_theta") or hcfg.rope_theta
    return GPTModel(
        config=cfg, transformer_layer_spec=spec, vocab_size=vocab_size, max_sequence_length=32,
        share_embeddings_and_output_weights=hcfg.tie_word_embeddings,
        position_embedding_type="rope", rotary_base=int(theta), pre_process=pre_process,
        post_process=post_process, parallel_output=parallel_output,
    ).eval()  # fmt: skip
