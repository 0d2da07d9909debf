"""Optional: checkpoints written by forge_ckpt load into a real megatron-core ``GPTModel`` and give
transformers' logits.

Skipped unless megatron-core is installed (it is not in the workspace lock); run with
``uv run --with 'megatron-core==0.16.*' pytest packages/forge-ckpt/tests/test_megatron_core.py``.
megatron-core builds its GPTModel on CPU (gloo, local layer spec); its forward makes CUDA-only
bookkeeping calls, which the check points at the CPU as forge-bench's Megatron test does:
``torch.cuda.current_device`` (the RoPE table's device, the router weight's), the dropout RNG
tracker's ``fork`` (dropout is 0) and, for MoE, ``moe_utils.te_general_gemm`` (megatron-core
0.16 leaves the name undefined without Transformer Engine; ``None`` selects its own
``torch.mm`` path). No numerics are replaced.

For a Llama, a Qwen3 and a Qwen3-MoE (softmax-then-top-k router: ``moe_router_pre_softmax``)
model with random weights: the legacy export (one rank) loads with ``load_state_dict`` (strict
apart from Transformer Engine ``_extra_state``) and gives transformers' logits in float32; the
``torch_dist`` export, written at TP2 x PP2 with 2 virtual pipeline stages per rank for the Llama,
TP2 x PP2 x EP2 for the Qwen3-MoE (dense and MoE layers mixed: per-layer keys) and at one rank
for the Qwen3, loads through ``dist_checkpointing.load`` into the one-rank
model (its sharded keys are global, so resharding is DCP's) and gives the same logits. The check
runs in a subprocess (it initializes a process group and megatron's parallel state).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

_COMMON = {
    "vocab_size": 61, "hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 4,
    "num_key_value_heads": 2,
}  # fmt: skip
# name -> (transformers class prefix, config overrides, torch_dist split (tp, pp, virtual, ep))
CASES = {
    "llama": ("Llama", {"num_hidden_layers": 4}, (2, 2, 2, 1)),
    "qwen3": ("Qwen3", {"num_hidden_layers": 2, "head_dim": 8}, (1, 1, 1, 1)),
    "qwen3_moe": ("Qwen3Moe", {
        "num_hidden_layers": 2, "head_dim": 8, "moe_intermediate_size": 4, "num_experts": 4,
        "num_experts_per_tok": 2, "mlp_only_layers": [0],
    }, (2, 2, 1, 2)),
}  # fmt: skip
TOLERANCE = 1e-5  # relative error of float32 logits (measured about 1e-7)


def test_megatron_core_gives_transformers_logits():
    pytest.importorskip("megatron.core")
    pytest.importorskip("transformers")
    run = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, timeout=500, check=False
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for name in CASES:
        assert f"{name}: legacy and torch_dist logits match" in run.stdout, run.stdout


def _megatron_model(hcfg, name: str):
    """megatron-core's GPTModel (local spec, float32, no dropout or fusions) for ``hcfg``."""
    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    qk_norm = name != "llama"
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
        ffn_hidden_size=hcfg.intermediate_size, kv_channels=hcfg.head_dim, qk_layernorm=qk_norm,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, normalization="RMSNorm",
        layernorm_epsilon=hcfg.rms_norm_eps, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False, use_cpu_initialization=True,
        params_dtype=torch.float32, **moe,
    )  # fmt: skip
    spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, normalization="RMSNorm")
    theta = (getattr(hcfg, "rope_parameters", None) or {}).get("rope_theta") or hcfg.rope_theta
    return GPTModel(
        config=cfg, transformer_layer_spec=spec, vocab_size=128, max_sequence_length=32,
        share_embeddings_and_output_weights=hcfg.tie_word_embeddings,
        position_embedding_type="rope", rotary_base=int(theta),
    ).eval()  # fmt: skip


def init_megatron_on_cpu() -> None:
    """One gloo process with megatron's parallel state, its CUDA-only bookkeeping pointed at the
    CPU (see the module doc); numerics untouched."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as megatron_random
    from megatron.core.transformer.moe import moe_utils

    torch.cuda.current_device = lambda: "cpu"
    megatron_random.CudaRNGStatesTracker.fork = lambda self, *a, **k: contextlib.nullcontext()
    moe_utils.te_general_gemm = None
    # megatron-core 0.16 passes torch >= 2.15's TensorProperties.strides on to torch.empty.
    empty = torch.empty
    torch.empty = lambda *a, strides=None, **k: empty(*a, **k)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)


def _check() -> None:
    import torch
    import transformers
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from forge_ckpt.megatron import hf_to_megatron

    init_megatron_on_cpu()
    tmp = Path(tempfile.mkdtemp())
    ids = torch.randint(
        0, _COMMON["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1)
    )
    positions = torch.arange(12).expand_as(ids)
    causal = torch.ones(12, 12, dtype=torch.bool).triu(1)[None, None]  # True: masked out
    for name, (prefix, extra, (tp, pp, vp, ep)) in CASES.items():
        torch.manual_seed(0)
        hcfg = getattr(transformers, f"{prefix}Config")(**_COMMON, **extra)
        hf = getattr(transformers, f"{prefix}ForCausalLM")(hcfg).eval()
        hf.save_pretrained(tmp / name)
        with torch.no_grad():
            want = hf(ids).logits

        legacy = hf_to_megatron(tmp / name, tmp / f"{name}-legacy", format="legacy", te_spec=False)
        m1 = _megatron_model(hcfg, name)
        state = torch.load(
            legacy / "iter_0000000/mp_rank_00/model_optim_rng.pt", weights_only=False
        )
        missing, unexpected = m1.load_state_dict(state["model"], strict=False)
        assert not unexpected, unexpected
        assert all(k.endswith("_extra_state") for k in missing), missing

        dist_dir = hf_to_megatron(
            tmp / name, tmp / f"{name}-dist", format="torch_dist", te_spec=False,
            tensor_parallel=tp, pipeline_parallel=pp, virtual_pipeline=vp, expert_parallel=ep,
        )  # fmt: skip
        m2 = _megatron_model(hcfg, name)
        loaded = dist_checkpointing.load(
            m2.sharded_state_dict(), str(dist_dir / "iter_0000000"), strict=StrictHandling.LOG_ALL
        )
        m2.load_state_dict(loaded, strict=False)
        s2 = m2.state_dict()
        compared = 0
        for n, t in m1.state_dict().items():
            if isinstance(t, torch.Tensor) and not n.endswith("_extra_state"):
                assert torch.equal(t, s2[n]), (name, n)
                compared += 1
        assert compared > 10, compared

        errors = []
        for model in (m1, m2):
            with torch.no_grad():
                # [batch, seq, padded vocab]: the rows past the real vocabulary are padding.
                got = model(ids, positions, causal)[..., : _COMMON["vocab_size"]]
            errors.append(((got - want).norm() / want.norm()).item())
        assert max(errors) < TOLERANCE, (name, errors)
        print(
            f"{name}: legacy and torch_dist logits match (torch_dist at tp={tp} pp={pp} vp={vp} "
            f"ep={ep}); "
            f"relative error {max(errors):.2e}"
        )


if __name__ == "__main__":
    _check()
