"""forge-bench's torchtitan runner: torchtitan's own Llama 3, built from the case's config and
loaded from the shared Hugging Face folder, computes what forge computes. Skipped when torchtitan
is not installed (``uv run --with torchtitan pytest apps/bench/tests/test_torchtitan.py``)."""

from __future__ import annotations

import pytest

pytest.importorskip("torchtitan")

import torch
from forge_bench.data import packed_batch
from forge_bench.plan import Impl
from forge_bench.titan import load_torchtitan_llama, torchtitan_llama_config
from forge_bench.worker import Job, run_job

import forge_models

SEQ = 48


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A Llama 3 config whose head_dim is not hidden / heads, with Llama 3 RoPE scaling that
    matters at SEQ, and its random weights as a Hugging Face folder."""
    config = forge_models.get_config(
        "llama3-debug", hidden_size=64, intermediate_size=96, num_heads=4, num_kv_heads=2,
        head_dim=32, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = forge_models.build_model(config, dtype=torch.float32)
    folder = tmp_path_factory.mktemp("hf") / "llama"
    forge_models.save_pretrained(model, folder)
    return config, str(folder)


def test_logits_match_forge_on_the_same_weights(tiny):
    config, folder = tiny
    forge = forge_models.from_pretrained(folder, dtype=torch.float32)
    titan = load_torchtitan_llama(folder, config, seq=SEQ, dtype=torch.float32,
                                  device=torch.device("cpu"), varlen=False)  # fmt: skip
    ids = torch.randint(0, config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = forge(ids), titan(ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # wrong RoPE scaling: 5e-3


def test_varlen_boundaries_are_forges_cu_seqlens():
    from torchtitan.models.common.attention import create_varlen_metadata_for_document

    batch = packed_batch(rows=3, seq=SEQ, vocab_size=100, seed=2)
    forge = batch.forge_inputs(torch.device("cpu"))
    hf = batch.hf_inputs(torch.device("cpu"), packed=True)
    meta = create_varlen_metadata_for_document(hf["position_ids"])
    assert meta.cu_seq_q.tolist() == forge["cu_seqlens"].tolist()
    assert meta.max_q == forge["max_seqlen"]


def test_training_steps_with_and_without_full_ac_agree(tiny):
    config, folder = tiny
    losses = {}
    for recompute in (False, True):
        impl = Impl(name="torchtitan", runner="torchtitan", recompute=recompute)
        job = Job(impl=impl, hf_dir=folder, moe=False, rows=2, seq=SEQ, vocab_size=config.vocab_size,
                  device="cpu", dtype="float32", warmup=0, steps=2, config=config)  # fmt: skip
        result = run_job(job)
        losses[recompute] = (result["loss_first"], result["loss_last"])
        assert result["tokens_per_s"] > 0
        assert any("causal over each packed row" in n for n in result["notes"])
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    assert losses[False][1] < losses[False][0]  # AdamW moved the weights the right way


def test_rejects_what_it_cannot_build():
    moe = forge_models.get_config("qwen3-moe-debug")
    with pytest.raises(ValueError, match="dense Llama models only"):
        torchtitan_llama_config(moe, seq=SEQ, varlen=False)


def test_varlen_attention_builds_without_the_fa3_package(monkeypatch):
    """On Hopper torchtitan asks for FA3; where its package is missing the runner builds the
    attention on torch's own FlashAttention kernels instead of failing."""
    import importlib.util

    from forge_bench.titan import flash_attention_for_varlen
    from torchtitan.models.common.attention import VarlenAttention

    if importlib.util.find_spec("flash_attn_interface") is not None:
        pytest.skip("FA3 is installed here")
    monkeypatch.setattr("torchtitan.tools.utils.get_cuda_flash_attention_impl", lambda: "FA3")
    with pytest.raises(ImportError):
        VarlenAttention(VarlenAttention.Config())  # what torchtitan alone does
    context, note = flash_attention_for_varlen()
    with context:
        VarlenAttention(VarlenAttention.Config())
    assert "built-in FlashAttention 2, not torchtitan's FA3" in note
