"""Optional: checkpoints written by forge_ckpt load into a real megatron-core ``GPTModel`` and give
transformers' logits.

Skipped unless megatron-core is installed (it is not in the workspace lock); run with
``uv run --with 'megatron-core==0.16.*' pytest packages/forge-ckpt/tests/test_megatron_core.py``.
megatron-core builds its GPTModel on CPU (gloo, local layer spec), its CUDA-only bookkeeping
pointed at the CPU by :mod:`megatron_core_cpu` (shared with :mod:`test_megatron_written`); no
numerics are replaced.

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


def _check() -> None:
    import torch
    import transformers
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from megatron_core_cpu import init_megatron_on_cpu, megatron_gpt

    from forge_ckpt.megatron import hf_to_megatron

    init_megatron_on_cpu()
    tmp = Path(tempfile.mkdtemp())
    ids = torch.randint(
        0, _COMMON["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1)
    )
    positions = torch.arange(12).expand_as(ids)
    causal = torch.ones(12, 12, dtype=torch.bool).triu(1)[None, None]  # True: masked out

    def megatron_model(hcfg, name: str):
        return megatron_gpt(hcfg, qk_layernorm=name != "llama")

    for name, (prefix, extra, (tp, pp, vp, ep)) in CASES.items():
        torch.manual_seed(0)
        hcfg = getattr(transformers, f"{prefix}Config")(**_COMMON, **extra)
        hf = getattr(transformers, f"{prefix}ForCausalLM")(hcfg).eval()
        hf.save_pretrained(tmp / name)
        with torch.no_grad():
            want = hf(ids).logits

        legacy = hf_to_megatron(tmp / name, tmp / f"{name}-legacy", format="legacy", te_spec=False)
        m1 = megatron_model(hcfg, name)
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
        m2 = megatron_model(hcfg, name)
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
