"""Optional: checkpoints written by forge_ckpt load into a real megatron-core ``GPTModel``.

Skipped unless megatron-core is installed (it is not in the workspace lock); run with
``uv run --with 'megatron-core==0.16.*' pytest packages/forge-ckpt/tests/test_megatron_core.py``.
megatron-core builds its GPTModel on CPU (gloo) but its forward needs CUDA, so this checks that
every tensor loads into the model's own state dict (legacy: ``load_state_dict`` strict apart from
Transformer Engine ``_extra_state``; torch_dist: ``dist_checkpointing.load``) and that both
formats give identical model states, compared with the HF weights through our mapping.
The check runs in a subprocess (it initializes a process group and megatron's parallel state).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


def test_megatron_core_loads_both_formats():
    pytest.importorskip("megatron.core")
    pytest.importorskip("transformers")
    run = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, timeout=500, check=False
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "both formats load" in run.stdout


def _check() -> None:
    import torch
    import torch.distributed as dist
    import transformers
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from forge_ckpt.megatron import hf_to_megatron

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    dist.init_process_group("gloo", rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)
    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    hcfg = transformers.Qwen3Config(
        vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    )  # fmt: skip
    transformers.Qwen3ForCausalLM(hcfg).save_pretrained(tmp / "hf")
    cfg = TransformerConfig(
        num_layers=2, hidden_size=16, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=24,
        kv_channels=8, qk_layernorm=True, gated_linear_unit=True, normalization="RMSNorm",
        add_bias_linear=False, use_cpu_initialization=True, params_dtype=torch.float32,
        activation_func=torch.nn.functional.silu,
    )  # fmt: skip
    spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")

    def build() -> GPTModel:
        return GPTModel(
            config=cfg, transformer_layer_spec=spec, vocab_size=128, max_sequence_length=32,
            share_embeddings_and_output_weights=False, position_embedding_type="rope",
        )  # fmt: skip

    legacy = hf_to_megatron(tmp / "hf", tmp / "legacy", format="legacy", te_spec=False)
    m1 = build()
    state = torch.load(legacy / "iter_0000000/mp_rank_00/model_optim_rng.pt", weights_only=False)
    missing, unexpected = m1.load_state_dict(state["model"], strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("_extra_state") for k in missing), missing

    dist_dir = hf_to_megatron(tmp / "hf", tmp / "dist", format="torch_dist", te_spec=False)
    m2 = build()
    empty = torch.empty
    # megatron-core 0.16 passes torch >= 2.15's TensorProperties.strides on to torch.empty.
    torch.empty = lambda *a, strides=None, **k: empty(*a, **k)
    try:
        loaded = dist_checkpointing.load(
            m2.sharded_state_dict(), str(dist_dir / "iter_0000000"), strict=StrictHandling.LOG_ALL
        )
    finally:
        torch.empty = empty
    m2.load_state_dict(loaded, strict=False)
    s1, s2 = m1.state_dict(), m2.state_dict()
    compared = 0
    for name, t in s1.items():
        if isinstance(t, torch.Tensor) and not name.endswith("_extra_state"):
            assert torch.equal(t, s2[name]), name
            compared += 1
    assert compared == 2 * 8 + 3, compared
    print(f"both formats load: {compared} tensors identical")


if __name__ == "__main__":
    _check()
