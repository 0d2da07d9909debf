"""Exactness of DeepSeek-V3 against transformers' ``DeepseekV3ForCausalLM`` (float32, <= 1e-5).

Two tiny configs cover multi-head latent attention with and without the q latent, YaRN RoPE
with ``mscale_all_dim`` (softmax scale and cos/sin factor) and plain RoPE, interleaved and
half-split RoPE channels, attention biases, group-limited routing (``n_group > 1`` with
``topk_group``) and ungrouped routing, one and two shared experts, dense first layers, with and
without top-k renormalization, and a random aux-loss-free selection bias. Each is built with
random weights, saved with ``save_pretrained``, loaded with ``forge_models.from_pretrained`` and
compared on unpadded, padded and packed inputs (logits and every parameter's gradient), with
labels, and with DeepSeek-V3's sequence-wise balance loss computed by hand from the reference
router's choices (eqs. 17-20). transformers' DeepSeek MoE path is differentiable (its experts and
the gather of the sigmoid scores), so the gradients are compared directly. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import forge_models
from forge_core.testing import import_path
from forge_models import shift_labels

ph = import_path(Path(__file__).with_name("parity_helpers.py"), "forge_models_tests_parity_helpers")
RTOL = ph.RTOL
V = 61
E = 8

_COMMON = {
    "vocab_size": V, "hidden_size": 32, "intermediate_size": 40, "moe_intermediate_size": 16,
    "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": E,
    "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 12,
    "max_position_embeddings": 64, "initializer_range": 0.1, "routed_scaling_factor": 2.5,
}  # fmt: skip
_YARN = {
    "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 1.0,
    "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1, "rope_theta": 10000.0,
}  # fmt: skip

CASES = {
    "qlora-groups-yarn-dense1": {
        "q_lora_rank": 12, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 3,
        "n_shared_experts": 1, "first_k_dense_replace": 1, "num_hidden_layers": 2,
        "rope_parameters": _YARN, "norm_topk_prob": True,
    },
    "noqlora-nogroup-2shared-bias-halfrope": {
        "q_lora_rank": None, "n_group": 1, "topk_group": 1, "num_experts_per_tok": 2,
        "n_shared_experts": 2, "first_k_dense_replace": 1, "num_hidden_layers": 3,
        "attention_bias": True, "rope_interleave": False, "norm_topk_prob": False,
    },
}  # fmt: skip


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("FORGE_KERNELS_IMPL", "reference")


class Pair(ph.HFPair):
    def __init__(self, name: str, tmp_path_factory) -> None:
        config = {**_COMMON, **CASES[name]}
        super().__init__(
            "DeepseekV3Config", "DeepseekV3ForCausalLM", config, tmp_path_factory.mktemp(name)
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


def test_config_and_layers(pair):
    cfg, config = pair.ref.config, pair.model.config
    assert config.mla.q_lora_rank == cfg.q_lora_rank
    assert config.moe.mlp_only_layers == tuple(range(cfg.first_k_dense_replace))
    for i, (ref_layer, layer) in enumerate(
        zip(pair.ref.model.layers, pair.model.layers, strict=True)
    ):
        assert layer.is_moe == hasattr(ref_layer.mlp, "experts"), i
        if layer.is_moe:  # the selection bias came through the checkpoint
            assert torch.equal(layer.mlp.expert_bias, ref_layer.mlp.gate.e_score_correction_bias)


def test_unpadded_and_padded_logits_and_grads(pair):
    ids = _ids(2, 10)
    probe = _probe((2, 10))
    pair.zero_grad()
    ref_logits = pair.ref(ids).logits
    logits = pair.model(ids)
    assert ph.rel(logits, ref_logits) <= RTOL
    (ref_logits * probe).sum().backward()
    (logits * probe).sum().backward()
    pair.assert_grads_match()

    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, -2:] = 0  # right padding
    ids = ids.masked_fill(mask == 0, 0)
    valid = mask.bool()
    pair.zero_grad()
    ref_logits = pair.ref(ids, attention_mask=mask).logits
    logits = pair.model(ids, attention_mask=mask)
    assert ph.rel(logits[valid], ref_logits[valid]) <= RTOL
    (ref_logits[valid] * probe[valid]).sum().backward()
    (logits[valid] * probe[valid]).sum().backward()
    pair.assert_grads_match()


def test_packed_matches_documents_run_separately(pair):
    lengths = [4, 3, 6]
    docs = [_ids(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    cu_seqlens = torch.tensor([0, 4, 7, 13], dtype=torch.int32)
    probes = [_probe((1, n), seed=20 + i) for i, n in enumerate(lengths)]
    pair.zero_grad()
    ref_logits = [pair.ref(d).logits for d in docs]
    sum((r * p).sum() for r, p in zip(ref_logits, probes, strict=True)).backward()
    logits = pair.model(torch.cat(docs, dim=1), cu_seqlens=cu_seqlens)
    assert ph.rel(logits, torch.cat(ref_logits, dim=1)) <= RTOL
    (logits * torch.cat(probes, dim=1)).sum().backward()
    pair.assert_grads_match()


def _hand_sequence_loss(router_outputs, rows: list[torch.Tensor]) -> torch.Tensor:
    """DeepSeek-V3 eqs. 17-20, from the reference router's (logits, weights, indices) per layer:
    per sequence ``sum_i f_i P_i``, ``f_i = E / (K T) * #{t: i chosen}``,
    ``P_i = mean_t s_{i,t} / sum_j s_{j,t}``; averaged over sequences, summed over layers."""
    total = torch.zeros((), dtype=torch.float64)
    for logits, _, indices in router_outputs:
        s = logits.double().sigmoid()
        per_seq = []
        for row in rows:  # token positions of one sequence (flat)
            t, k = len(row), indices.shape[-1]
            chosen = torch.zeros(E, dtype=torch.float64)
            for tok in row.tolist():
                for e in indices[tok].tolist():
                    chosen[e] += 1
            f = chosen * E / (k * t)
            p = (s[row] / s[row].sum(-1, keepdim=True)).mean(0)
            per_seq.append((f * p).sum())
        total = total + torch.stack(per_seq).mean()
    return total


def _reference_with_routers(pair, ids, **kwargs):
    """The reference's logits and its routers' ``(logits, weights, indices)`` per MoE layer."""
    captured = []
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda m, i, o: captured.append(o))
        for layer in pair.ref.model.layers
        if hasattr(layer.mlp, "gate")
    ]
    try:
        with torch.no_grad():
            logits = pair.ref(ids, **kwargs).logits
    finally:
        for hook in hooks:
            hook.remove()
    return logits, captured


def test_loss_with_labels_and_sequence_balance_loss(pair):
    ids = _ids(2, 10, seed=4)
    pair.zero_grad()
    ref_loss = pair.ref(ids, labels=ids).loss
    loss = pair.model(ids, labels=ids)
    assert abs(loss.item() - ref_loss.item()) <= RTOL * ref_loss.item()
    ref_loss.backward()
    loss.backward()
    pair.assert_grads_match()

    # With router logits: + alpha * the sequence-wise balance loss, checked against the
    # equations on the reference router's choices; each row (its real tokens) is a sequence.
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    alpha = pair.model.config.moe.router_aux_loss_coef
    for attention_mask, rows in (
        (None, [torch.arange(0, 10), torch.arange(10, 20)]),
        (mask, [torch.arange(0, 10), torch.arange(13, 20)]),
    ):
        ref_logits, routers = _reference_with_routers(pair, ids, attention_mask=attention_mask)
        expected = _hand_sequence_loss(routers, rows)
        loss = pair.model(ids, attention_mask=attention_mask, labels=ids, output_router_logits=True)
        assert ph.rel(pair.model.moe_stats.aux_loss, expected) <= RTOL
        targets = shift_labels(ids, attention_mask=attention_mask)
        ce = F.cross_entropy(ref_logits.reshape(-1, V).double(), targets.reshape(-1))
        assert abs(loss.item() - (ce + alpha * expected).item()) <= RTOL * ce.item()


def test_save_pretrained_round_trip_is_bit_exact(pair, tmp_path):
    out = forge_models.save_pretrained(pair.model, tmp_path / "out")
    ours = load_file(out / "model.safetensors")
    ref = load_file(pair.hf_dir / "model.safetensors")
    assert sorted(ours) == sorted(ref)
    for name, t in ref.items():
        assert torch.equal(ours[name], t), name
    # A config generated from forge's (no source config.json) loads in transformers.
    model = forge_models.build_model(pair.model.config)
    model.load_state_dict(pair.model.state_dict())
    gen = forge_models.save_pretrained(model, tmp_path / "generated")
    reloaded = pair.ref_cls.from_pretrained(gen).eval()
    ids = _ids(1, 9, seed=6)
    with torch.no_grad():
        assert ph.rel(model(ids), reloaded(ids).logits) <= RTOL
        assert torch.equal(reloaded(ids).logits, pair.ref(ids).logits)


@pytest.mark.parametrize("name", ["deepseek-v2-lite-debug", "deepseek-v3-debug"])
def test_generated_export_of_a_preset_runs_in_transformers(name, tmp_path):
    """A preset built by name (no source config.json) exports a folder transformers runs to the
    same logits: without expert groups (``n_group`` None, written as one group of which one is
    chosen) and with groups and an MTP module (which transformers does not hold)."""
    import transformers

    torch.manual_seed(0)
    model = forge_models.build_model(name).eval()
    ph.perturb(model, seed=3, scale=0.2)  # routers, biases and norms off their initial values
    out = forge_models.save_pretrained(model, tmp_path / name)
    ref = transformers.DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = ph.ids(model.config.vocab_size, 2, 9, seed=4)
    with torch.no_grad():
        assert ph.rel(model(ids), ref(ids).logits) <= RTOL
    family = forge_models.get_family("deepseek_v3")
    config = model.config.replace(mtp_depth=0)  # transformers' config says 1, holding none
    read = family.config_from_hf(json.loads((out / "config.json").read_text()), mtp_depth=0)
    assert read == config
