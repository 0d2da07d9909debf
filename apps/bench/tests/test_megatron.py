"""forge-bench's Megatron-Core runner: the packed-document mask (always) and, where megatron-core
is installed (``uv run --with megatron-core pytest apps/bench/tests/test_megatron.py``), that its
``GPTModel`` holds the shared weights and trains to forge's loss on packed rows (its forward
needs CUDA for bookkeeping, see ``forge_bench.peers.CUDA_ONLY``; the test redirects that)."""

from __future__ import annotations

import pytest
import torch
from forge_bench.data import packed_batch
from forge_bench.megatron import block_causal_mask

import forge_models


def test_block_causal_mask_keeps_each_document_to_itself():
    batch = packed_batch(rows=2, seq=24, vocab_size=10, seed=3)
    mask = block_causal_mask(batch.lengths, 24)
    assert mask.shape == (2, 1, 24, 24)
    assert mask.dtype == torch.bool
    for r, row in enumerate(batch.lengths):
        allowed = ~mask[r, 0]
        start = 0
        for n in row:
            end = start + n
            block = allowed[start:end, start:end]
            assert torch.equal(block, torch.ones(n, n, dtype=torch.bool).tril())
            assert not allowed[start:end, :start].any()  # no earlier document
            start = end
        assert not allowed.triu(1).any()  # nothing from the future


def test_gpt_model_holds_the_hugging_face_weights(tmp_path):
    pytest.importorskip("megatron.core")
    from forge_bench.megatron import load_megatron_gpt, release_parallel_state
    from safetensors.torch import load_file

    import forge_kernels

    config = forge_models.get_config(
        "llama3-debug", hidden_size=64, intermediate_size=96, num_heads=4, num_kv_heads=2,
        head_dim=32, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    forge = forge_models.build_model(config, dtype=torch.float32)
    forge_models.save_pretrained(forge, tmp_path / "hf")
    try:
        model = load_megatron_gpt(str(tmp_path / "hf"), config, seq=32, dtype=torch.float32,
                                  device=torch.device("cpu"), recompute=False)  # fmt: skip
    finally:
        release_parallel_state()
    assert not torch.distributed.is_initialized()
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    torch.testing.assert_close(model.output_layer.weight, tensors["lm_head.weight"])
    torch.testing.assert_close(
        model.decoder.layers[1].mlp.linear_fc2.weight,
        tensors["model.layers.1.mlp.down_proj.weight"],
    )
    # Llama 3 scaling with the case's own original context (Megatron fixes it at 8192).
    expected = forge_kernels.rope_inv_freq(
        config.head_dim, theta=config.rope_theta, llama3_scaling=config.rope_scaling
    )
    torch.testing.assert_close(model.rotary_pos_emb.inv_freq.cpu(), expected)


def test_training_loss_matches_forge_on_packed_rows(tmp_path, monkeypatch):
    """Same weights, same packed batch: Megatron-Core's first loss is forge's. Its forward makes
    two CUDA-only bookkeeping calls (the RoPE table's device, the dropout RNG tracker at dropout
    0); the test points them at the CPU so the numerics are checked here."""
    pytest.importorskip("megatron.core")
    import contextlib

    from forge_bench.megatron import release_parallel_state
    from forge_bench.plan import Impl
    from forge_bench.worker import Job, run_job
    from megatron.core.tensor_parallel import random as megatron_random

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    monkeypatch.setattr(
        megatron_random.CudaRNGStatesTracker, "fork", lambda self, *a, **k: contextlib.nullcontext()
    )
    config = forge_models.get_config(
        "llama3-debug", hidden_size=64, intermediate_size=96, num_heads=4, num_kv_heads=2,
        head_dim=32,
    )  # fmt: skip
    torch.manual_seed(0)
    forge_models.save_pretrained(forge_models.build_model(config), tmp_path / "hf")
    losses = {}
    for runner in ("forge", "megatron-core"):
        job = Job(impl=Impl(name=runner, runner=runner), hf_dir=str(tmp_path / "hf"), moe=False,
                  rows=2, seq=40, vocab_size=config.vocab_size, device="cpu", dtype="float32",
                  warmup=0, steps=2, config=config)  # fmt: skip
        try:
            result = run_job(job)
        finally:
            if runner == "megatron-core":
                release_parallel_state()
        losses[runner] = (result["loss_first"], result["loss_last"])
    assert losses["megatron-core"] == pytest.approx(losses["forge"], rel=1e-5)
