"""Exactness of the MoE families against transformers: logits, gradients, aux loss (float32).

Qwen3-MoE and Qwen2-MoE references are built from tiny configs with random weights (top-k 1
and 2, ``norm_topk_prob`` on and off, the Qwen2-MoE shared expert, dense layers through
``mlp_only_layers`` and ``decoder_sparse_step``), saved with ``save_pretrained`` (which writes
the per-expert layout), loaded with ``forge_models.from_pretrained`` and compared on unpadded
, padded (left and right) and packed inputs and with labels plus the router load-balancing loss. Gradients are mapped
back to the reference's stacked parameter names through the forge-ckpt mapping
(``stacked_experts=True``). Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import forge_models
from forge_core.testing import import_path

ph = import_path(Path(__file__).with_name("parity_helpers.py"), "forge_models_tests_parity_helpers")
RTOL = ph.RTOL
_rel = ph.rel
V = 61

_COMMON = {
    "vocab_size": V,
    "hidden_size": 32,
    "intermediate_size": 40,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "initializer_range": 0.1,
    "num_experts": 4,
    "moe_intermediate_size": 16,
}

# name -> (config class, model class, config changes)
CASES = {
    "qwen3moe-top2-norm": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"num_experts_per_tok": 2, "norm_topk_prob": True, "head_dim": 16}),
    "qwen3moe-top1-densel1": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"num_experts_per_tok": 1, "norm_topk_prob": False, "mlp_only_layers": [1]}),
    "qwen2moe-top2-shared-step2": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {"num_experts_per_tok": 2, "shared_expert_intermediate_size": 24, "decoder_sparse_step": 2, "num_hidden_layers": 3}),
    "qwen2moe-top1-norm-densel0": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {"num_experts_per_tok": 1, "norm_topk_prob": True, "shared_expert_intermediate_size": 24, "mlp_only_layers": [0]}),
}  # fmt: skip


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("FORGE_KERNELS_IMPL", "reference")


class Pair(ph.HFPair):
    def __init__(self, name: str, tmp_path_factory) -> None:
        config_cls, model_cls, changes = CASES[name]
        super().__init__(
            config_cls, model_cls, {**_COMMON, **changes}, tmp_path_factory.mktemp(name)
        )

    def assert_grads_match(self) -> None:
        super().assert_grads_match(stacked_experts=True)  # the reference's parameter names


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    return Pair(request.param, tmp_path_factory)


def _ids(*shape: int, seed: int = 1) -> torch.Tensor:
    return ph.ids(V, *shape, seed=seed)


def _probe(shape, seed: int = 2) -> torch.Tensor:
    return ph.probe(V, shape, seed=seed)


def test_layer_types_follow_the_config(pair):
    cfg = pair.ref.config
    for i, (ref_layer, layer) in enumerate(
        zip(pair.ref.model.layers, pair.model.layers, strict=True)
    ):
        assert layer.is_moe == hasattr(ref_layer.mlp, "experts"), i
    assert pair.model.config.moe.num_experts == cfg.num_experts


def test_unpadded_logits_and_grads(pair):
    ids = _ids(2, 10)
    probe = _probe((2, 10))
    pair.zero_grad()
    ref_logits = pair.ref(ids).logits
    logits = pair.model(ids)
    assert _rel(logits, ref_logits) <= RTOL
    (ref_logits * probe).sum().backward()
    (logits * probe).sum().backward()
    pair.assert_grads_match()
    stats = pair.model.moe_stats
    assert stats.router_logits is None
    assert stats.aux_loss is None
    k = pair.model.config.moe.num_experts_per_tok
    assert stats.tokens_per_expert.shape == (len(stats.layers), 4)
    assert stats.tokens_per_expert.sum(dim=1).tolist() == [20 * k] * len(stats.layers)


def test_padded_logits_and_grads(pair):
    ids = _ids(2, 10, seed=3)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, -2:] = 0  # right padding
    ids = ids.masked_fill(mask == 0, 0)
    valid = mask.bool()
    probe = _probe((2, 10))
    pair.zero_grad()
    ref_logits = pair.ref(ids, attention_mask=mask).logits
    logits = pair.model(ids, attention_mask=mask)
    assert _rel(logits[valid], ref_logits[valid]) <= RTOL
    # Padding tokens are routed too (as in transformers) but only real tokens get a probe.
    (ref_logits[valid] * probe[valid]).sum().backward()
    (logits[valid] * probe[valid]).sum().backward()
    pair.assert_grads_match()
    # The load-balancing loss leaves padding out, as transformers' with attention_mask.
    ref_aux = pair.ref(ids, attention_mask=mask, output_router_logits=True).aux_loss
    pair.model(ids, attention_mask=mask, output_router_logits=True)
    assert _rel(pair.model.moe_stats.aux_loss, ref_aux) <= RTOL


def test_packed_matches_documents_run_separately(pair):
    lengths = [4, 3, 6]
    docs = [_ids(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    cu_seqlens = torch.tensor([0, 4, 7, 13], dtype=torch.int32)
    probes = [_probe((1, n), seed=20 + i) for i, n in enumerate(lengths)]
    pair.zero_grad()
    ref_logits = [pair.ref(d).logits for d in docs]
    sum((r * p).sum() for r, p in zip(ref_logits, probes, strict=True)).backward()
    logits = pair.model(torch.cat(docs, dim=1), cu_seqlens=cu_seqlens)
    assert _rel(logits, torch.cat(ref_logits, dim=1)) <= RTOL
    (logits * torch.cat(probes, dim=1)).sum().backward()
    pair.assert_grads_match()


def test_loss_with_router_aux_loss(pair):
    ids = _ids(2, 10, seed=4)
    pair.zero_grad()
    ref_out = pair.ref(ids, labels=ids, output_router_logits=True)
    loss = pair.model(ids, labels=ids, output_router_logits=True)
    aux = pair.model.moe_stats.aux_loss
    assert abs(aux.item() - ref_out.aux_loss.item()) <= RTOL * ref_out.aux_loss.item()
    assert abs(loss.item() - ref_out.loss.item()) <= RTOL * ref_out.loss.item()
    ref_out.loss.backward()
    loss.backward()
    pair.assert_grads_match()  # the router gradient includes the aux-loss term
    # Without router logits, no aux term (as transformers' default).
    plain = pair.model(ids, labels=ids)
    ref_plain = pair.ref(ids, labels=ids).loss
    assert abs(plain.item() - ref_plain.item()) <= RTOL * ref_plain.item()


def test_save_pretrained_loads_in_transformers(pair, tmp_path):
    """``save_pretrained`` of a forge MoE model loads in transformers with every tensor (none
    missing, unexpected or mis-shaped) and gives forge's logits: a model loaded and then changed
    (the source config.json passed through) and one built from scratch by forge (config.json
    generated from the forge config: expert count, shared expert, dense layers)."""
    loaded = forge_models.from_pretrained(pair.hf_dir, mmap=False)
    ph.perturb(loaded, seed=41)
    torch.manual_seed(42)
    fresh = forge_models.build_model(pair.model.config)
    ids = _ids(2, 9, seed=43)
    for name, model in (("loaded", loaded), ("fresh", fresh)):
        out = forge_models.save_pretrained(model, tmp_path / name)
        reloaded, info = pair.ref_cls.from_pretrained(out, output_loading_info=True)
        assert not any(info.values()), (name, info)
        with torch.no_grad():
            ours, theirs = model(ids), reloaded.eval()(ids).logits
            source = pair.ref(ids).logits
        assert _rel(ours, theirs) <= RTOL, (name, _rel(ours, theirs))
        assert _rel(theirs, source) > 1e-2, name  # not the source model's weights


def test_save_pretrained_round_trip_is_bit_exact(pair, tmp_path):
    from safetensors.torch import load_file

    forge_models.save_pretrained(pair.model, tmp_path / "out")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    ref = load_file(pair.hf_dir / "model.safetensors")
    assert sorted(ours) == sorted(ref)
    for name, t in ref.items():
        assert torch.equal(ours[name], t), name
