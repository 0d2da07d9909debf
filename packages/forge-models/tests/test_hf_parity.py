"""Exactness against transformers: logits and every parameter's gradient, float32, <= 1e-5.

For each family and several small configs (GQA ratios 1/2/4, q/k/v(/o) biases, tied
embeddings, a padding token, Llama 3 RoPE scaling, Qwen3 q/k norm with a decoupled head_dim), the
transformers model is built with random weights, saved with ``save_pretrained`` (sometimes in
several shards), loaded with ``forge_models.from_pretrained`` and compared on unpadded, padded
(left and right) and packed inputs, with and without labels. ``save_pretrained`` from forge
must load back into transformers with bit-identical weights. Nothing is downloaded.

The kernels run through their eager references here (``FORGE_KERNELS_IMPL=reference``): the
Triton kernels are tested against those references in forge-kernels, and one test below runs
the default dispatch end to end.
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
_rel = ph.rel
V = 101

_COMMON = {
    "vocab_size": V,
    "hidden_size": 32,
    "intermediate_size": 40,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "initializer_range": 0.1,
    "rms_norm_eps": 1e-6,
}
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
    "rope_theta": 500000.0,
}

# name -> (transformers config class, model class, config changes, max_shard_size)
CASES = {
    "llama-mha": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 4}, None),
    "llama3-gqa4-ropescaling": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 1, "rope_parameters": _LLAMA3_ROPE}, "8KB"),
    "llama-bias-tied-padtoken": ("LlamaConfig", "LlamaForCausalLM", {"attention_bias": True, "tie_word_embeddings": True, "pad_token_id": 0}, None),
    "qwen2-gqa2-tied": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}, None),
    "qwen2-mha": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 4}, "8KB"),
    "qwen3-gqa2-tied-headdim": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16, "tie_word_embeddings": True}, None),
    "qwen3-gqa4-bias": ("Qwen3Config", "Qwen3ForCausalLM", {"num_key_value_heads": 1, "attention_bias": True}, "8KB"),
}  # fmt: skip


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("FORGE_KERNELS_IMPL", "reference")


class Pair(ph.HFPair):
    """A transformers model, its saved folder and the forge model loaded from it."""

    def __init__(self, name: str, tmp_path_factory) -> None:
        config_cls, model_cls, changes, shard = CASES[name]
        super().__init__(
            config_cls,
            model_cls,
            {**_COMMON, **changes},
            tmp_path_factory.mktemp(name),
            max_shard_size=shard,
        )
        self.tied = bool(changes.get("tie_word_embeddings"))


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    return Pair(request.param, tmp_path_factory)


def _ids(*shape: int, seed: int = 1) -> torch.Tensor:
    return ph.ids(V, *shape, seed=seed)


def _probe(shape, seed: int = 2) -> torch.Tensor:
    return ph.probe(V, shape, seed=seed)


def test_unpadded_logits_and_grads(pair):
    ids = _ids(2, 12)
    probe = _probe((2, 12))
    pair.zero_grad()
    ref_logits = pair.ref(ids).logits
    logits = pair.model(ids)
    assert logits.shape == ref_logits.shape
    assert _rel(logits, ref_logits) <= RTOL
    (ref_logits * probe).sum().backward()
    (logits * probe).sum().backward()
    pair.assert_grads_match()


def test_padded_logits_and_grads(pair):
    ids = _ids(2, 12, seed=3)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, -4:] = 0  # right padding
    ids = ids.masked_fill(mask == 0, 0)
    probe = _probe((2, 12)) * mask[..., None]  # only real tokens count
    valid = mask.bool()
    pair.zero_grad()
    ref_logits = pair.ref(ids, attention_mask=mask).logits
    logits = pair.model(ids, attention_mask=mask)
    assert _rel(logits[valid], ref_logits[valid]) <= RTOL
    (ref_logits[valid] * probe[valid]).sum().backward()
    (logits[valid] * probe[valid]).sum().backward()
    pair.assert_grads_match()


def test_packed_matches_documents_run_separately(pair):
    flat = pair.model.config.family != "llama"  # input_ids [T] for Qwen cases, [1, T] for Llama
    lengths = [5, 3, 8]
    docs = [_ids(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    packed = torch.cat(docs, dim=1)
    cu_seqlens = torch.tensor([0, 5, 8, 16], dtype=torch.int32)
    probes = [_probe((1, n), seed=20 + i) for i, n in enumerate(lengths)]
    pair.zero_grad()
    ref_logits = [pair.ref(d).logits for d in docs]
    sum((r * p).sum() for r, p in zip(ref_logits, probes, strict=True)).backward()
    logits = pair.model(packed[0] if flat else packed, cu_seqlens=cu_seqlens)
    assert logits.shape == ((16, V) if flat else (1, 16, V))
    ref_all = torch.cat(ref_logits, dim=1).reshape(logits.shape)
    assert _rel(logits, ref_all) <= RTOL
    (logits * torch.cat(probes, dim=1).reshape(logits.shape)).sum().backward()
    pair.assert_grads_match()


def test_loss_with_labels(pair):
    ids = _ids(2, 12, seed=4)
    pair.zero_grad()
    ref_loss = pair.ref(ids, labels=ids).loss
    loss = pair.model(ids, labels=ids)
    assert abs(loss.item() - ref_loss.item()) <= RTOL * ref_loss.item()
    ref_loss.backward()
    loss.backward()
    pair.assert_grads_match()

    # Padded: forge ignores predictions at and of padding; compare with cross-entropy of the
    # reference logits on the same targets.
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :2] = 0
    mask[1, -3:] = 0
    targets = shift_labels(ids, attention_mask=mask)
    ref_padded = F.cross_entropy(
        pair.ref(ids, attention_mask=mask).logits.reshape(-1, V), targets.reshape(-1)
    )
    ours = pair.model(ids, attention_mask=mask, labels=ids)
    assert abs(ours.item() - ref_padded.item()) <= RTOL * ref_padded.item()

    # Packed: the last token of a document does not predict the next document.
    cu_seqlens = torch.tensor([0, 7, 12], dtype=torch.int32)
    row = ids[:1]
    targets = shift_labels(row, cu_seqlens=cu_seqlens)
    assert targets[0, 6] == -100
    assert targets[0, 11] == -100
    ref_logits = torch.cat([pair.ref(row[:, :7]).logits, pair.ref(row[:, 7:]).logits], dim=1)
    ref_packed = F.cross_entropy(ref_logits.reshape(-1, V), targets.reshape(-1))
    ours = pair.model(row, cu_seqlens=cu_seqlens, labels=row)
    assert abs(ours.item() - ref_packed.item()) <= RTOL * ref_packed.item()
    # Pre-shifted targets (a context-parallel shard's) give the same loss as the labels.
    shifted = pair.model(row, cu_seqlens=cu_seqlens, targets=targets)
    assert torch.equal(shifted, ours)
    with pytest.raises(ValueError, match=r"labels .* or targets .*, not both"):
        pair.model(row, labels=row, targets=targets)
    with pytest.raises(ValueError, match="targets must have the shape of input_ids"):
        pair.model(row, targets=targets[:, :-1])


def test_save_pretrained_round_trip(pair, tmp_path):
    out = forge_models.save_pretrained(pair.model, tmp_path / "saved", max_shard_size="6KB")
    # Bit-exact: same tensor names, dtypes and bits; the source config.json passed through.
    original, saved = {}, {}
    for folder, into in ((pair.hf_dir, original), (out, saved)):
        for file in folder.glob("*.safetensors"):
            into.update(load_file(file))
    assert sorted(saved) == sorted(original)
    assert all(torch.equal(saved[n], original[n]) for n in original)
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (pair.hf_dir / "config.json").read_text()
    )
    # And transformers loads it to the same logits.
    reloaded = pair.ref_cls.from_pretrained(out).eval()
    ids = _ids(1, 9, seed=5)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, pair.ref(ids).logits)


def test_generated_config_loads_in_transformers(pair, tmp_path):
    """A model without a source config.json (built by name) saves one transformers reads."""
    model = forge_models.build_model(pair.model.config)
    model.load_state_dict(pair.model.state_dict())
    out = forge_models.save_pretrained(model, tmp_path / "generated")
    reloaded = pair.ref_cls.from_pretrained(out).eval()
    ids = _ids(1, 9, seed=6)
    with torch.no_grad():
        assert _rel(model(ids), reloaded(ids).logits) <= RTOL
        assert torch.equal(reloaded(ids).logits, pair.ref(ids).logits)


def test_vocab_padding_changes_nothing(tmp_path_factory):
    pair = Pair("llama-bias-tied-padtoken", tmp_path_factory)
    padded = forge_models.from_pretrained(pair.hf_dir, vocab_pad_multiple=64)
    assert padded.embed_tokens.weight.shape[0] == 128
    assert not padded.embed_tokens.weight[V:].any()
    ids = _ids(2, 7, seed=7)
    logits = padded(ids)
    assert logits.shape[-1] == V
    assert torch.equal(logits, pair.model(ids))
    assert torch.equal(padded(ids, labels=ids), pair.model(ids, labels=ids))
    out = forge_models.save_pretrained(padded, tmp_path_factory.mktemp("unpadded"))
    assert load_file(out / "model.safetensors")["model.embed_tokens.weight"].shape[0] == V


def test_default_kernels_end_to_end(monkeypatch, tmp_path_factory):
    """The default dispatch (Triton kernels, interpreted on CPU) gives the same model outputs."""
    monkeypatch.delenv("FORGE_KERNELS_IMPL")
    pair = Pair("qwen3-gqa4-bias", tmp_path_factory)
    ids = _ids(2, 6, seed=8)
    ref_out = pair.ref(ids, labels=ids)
    ref_out.loss.backward()
    loss = pair.model(ids, labels=ids)
    loss.backward()
    assert abs(loss.item() - ref_out.loss.item()) <= RTOL * ref_out.loss.item()
    assert _rel(pair.model(ids), ref_out.logits) <= RTOL
    pair.assert_grads_match()
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    valid = mask.bool()
    with torch.no_grad():
        ref_logits = pair.ref(ids, attention_mask=mask).logits
        assert _rel(pair.model(ids, attention_mask=mask)[valid], ref_logits[valid]) <= RTOL
