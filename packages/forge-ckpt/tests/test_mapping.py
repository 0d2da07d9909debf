"""Mappings as data: invertible transforms, bit-exact HF -> forge -> HF round trips, clear errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from forge_ckpt import (
    CheckpointMismatchError,
    HFCheckpoint,
    get_mapping,
    load_hf_as_forge,
    mapping_for_hf_config,
    register_mapping,
    save_forge_as_hf,
)
from forge_ckpt.mapping import PAD_VOCAB, Concat, MappingSpec, PadDim, Rule, Transpose
from forge_ckpt.mapping.spec import REQUIRED

# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


def test_concat_equal_parts_round_trip():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    c = Concat(dim=0)
    joined = c.join([a, b], {})
    assert joined.shape == c.joined_shape([(3, 4), (3, 4)], {}) == (6, 4)
    back = c.split(joined, 2, {})
    assert torch.equal(back[0], a)
    assert torch.equal(back[1], b)
    with pytest.raises(ValueError, match="equal"):
        c.joined_shape([(3, 4), (2, 4)], {})
    with pytest.raises(ValueError, match="cannot be concatenated"):
        c.joined_shape([(3, 4), (3, 5)], {})


def test_concat_sizes_from_context():
    q, k, v = torch.randn(8, 4), torch.randn(2, 4), torch.randn(2, 4)
    c = Concat(dim=0, sizes=("q_size", "kv_size", "kv_size"))
    ctx = {"q_size": 8, "kv_size": 2}
    parts = c.split(c.join([q, k, v], ctx), 3, ctx)
    assert all(torch.equal(x, y) for x, y in zip(parts, (q, k, v), strict=True))
    with pytest.raises(ValueError, match="expected"):
        c.joined_shape([(8, 4), (2, 4), (3, 4)], ctx)


def test_transpose_and_pad_are_exact_inverses():
    ctx = {"vocab_size": 10, "vocab_pad_multiple": 8}
    t = torch.randn(10, 3)
    padded = PAD_VOCAB.to_forge(t, ctx)
    assert padded.shape == PAD_VOCAB.forge_shape((10, 3), ctx) == (16, 3)
    assert torch.equal(padded[:10], t)
    assert not padded[10:].any()
    assert torch.equal(PAD_VOCAB.to_hf(padded, ctx), t)
    assert PAD_VOCAB.to_forge(t, {**ctx, "vocab_pad_multiple": 1}) is t
    with pytest.raises(ValueError, match="extent"):
        PAD_VOCAB.to_forge(torch.randn(9, 3), ctx)
    tr = Transpose(0, 1)
    assert torch.equal(tr.to_hf(tr.to_forge(t, {}), {}), t)
    assert tr.forge_shape((10, 3), {}) == (3, 10)
    assert PadDim(size=3, multiple=4, dim=1).forge_shape((2, 3), {}) == (2, 4)


def test_rule_validation():
    with pytest.raises(ValueError, match="concat"):
        Rule("a", ("b", "c"))
    with pytest.raises(ValueError, match="both sides"):
        Rule("layers.{i}.w", "model.w")
    with pytest.raises(ValueError, match="num_layers"):
        MappingSpec(name="x", hf_model_types=("x",), rules=(Rule("l.{i}", "m.{i}"),))


# --------------------------------------------------------------------------------------------
# A synthetic spec: streaming, ordering, errors
# --------------------------------------------------------------------------------------------

TOY = MappingSpec(
    name="toy",
    hf_model_types=("toy",),
    rules=(
        Rule("emb", "model.emb", transforms=(PAD_VOCAB,)),
        Rule("l.{i}.gu", ("m.{i}.gate", "m.{i}.up"), concat=Concat(dim=0)),
        Rule("l.{i}.w", "m.{i}.w", transforms=(Transpose(),)),
        Rule("head", "head", when="!tied"),
    ),
    context_keys={
        "num_layers": ("n_layers", REQUIRED),
        "vocab_size": ("vocab", REQUIRED),
        "tied": ("tied", False),
    },
    ignored_hf=(("head", "tied"),),
)


def _toy_hf(layers=2, vocab=5, tied=False):
    g = torch.Generator().manual_seed(1)
    hf = {"model.emb": torch.randn(vocab, 3, generator=g)}
    for i in range(layers):
        hf[f"m.{i}.gate"] = torch.randn(4, 3, generator=g)
        hf[f"m.{i}.up"] = torch.randn(4, 3, generator=g)
        hf[f"m.{i}.w"] = torch.randn(3, 2, generator=g)
    if not tied:
        hf["head"] = torch.randn(vocab, 3, generator=g)
    return hf


def test_toy_round_trip_streams_in_any_order():
    ctx = TOY.context({"n_layers": 2, "vocab": 5}, vocab_pad_multiple=4)
    hf = _toy_hf()
    order = ["m.1.up", "head", "m.0.gate", "m.0.w", "m.1.w", "model.emb", "m.0.up", "m.1.gate"]
    produced = []

    def source():
        for name in order:
            produced.append(name)
            yield name, hf[name]

    forge = {}
    for name, t in TOY.hf_to_forge(source(), ctx):
        forge[name] = t
        if name == "l.0.gu":  # yielded as soon as its second part arrived
            assert produced[-1] == "m.0.up"
            assert "m.1.gate" not in produced
    assert forge["emb"].shape == (8, 3)
    assert forge["l.0.w"].shape == (2, 3)
    assert torch.equal(forge["l.1.gu"], torch.cat([hf["m.1.gate"], hf["m.1.up"]]))
    back = dict(TOY.forge_to_hf(forge.items(), ctx))
    assert sorted(back) == sorted(hf)
    assert all(torch.equal(back[n].contiguous(), hf[n]) for n in hf)


def test_toy_tied_head_is_ignored_on_import_and_absent_on_export():
    ctx = TOY.context({"n_layers": 1, "vocab": 5, "tied": True})
    hf = _toy_hf(layers=1, tied=False)  # has a head, which a tied config ignores
    forge = dict(TOY.hf_to_forge(hf.items(), ctx))
    assert "head" not in forge
    assert "head" not in dict(TOY.forge_to_hf(forge.items(), ctx))


def test_mismatch_errors_list_missing_unexpected_and_misshaped():
    ctx = TOY.context({"n_layers": 2, "vocab": 5})
    hf = _toy_hf()
    shapes = {n: tuple(t.shape) for n, t in hf.items()}
    del shapes["m.1.up"]
    shapes["extra.bias"] = (3,)
    shapes["m.0.w"] = (4, 2)
    forge_shapes = {"emb": (5, 3), "l.0.gu": (8, 3), "l.1.gu": (8, 3), "l.0.w": (2, 3),
                    "l.1.w": (2, 3), "head": (5, 3), "surplus": (1,)}  # fmt: skip
    with pytest.raises(CheckpointMismatchError) as info:
        TOY.check_hf(shapes, ctx, forge_shapes)
    err = info.value
    assert "m.1.up" in err.missing
    assert any(m.startswith("surplus") for m in err.missing)
    assert err.unexpected == ["extra.bias"]
    assert [m[0] for m in err.mismatched] == ["l.0.w (from m.0.w)"]
    text = str(err)
    for piece in ("missing from the checkpoint", "unexpected", "mis-shaped", "[2, 4]", "[2, 3]"):
        assert piece in text
    with pytest.raises(CheckpointMismatchError, match="unexpected"):
        list(TOY.hf_to_forge([("bogus", torch.ones(1))], ctx))
    with pytest.raises(CheckpointMismatchError, match=r"m\.1\.up"):
        list(TOY.hf_to_forge([(n, t) for n, t in hf.items() if n != "m.1.up"], ctx))
    with pytest.raises(ValueError, match="lacks 'n_layers'"):
        TOY.context({"vocab": 5})


def test_registry():
    assert get_mapping("llama").name == "llama"
    assert mapping_for_hf_config({"model_type": "qwen3"}).name == "qwen3"
    with pytest.raises(ValueError, match="supported model types"):
        mapping_for_hf_config({"model_type": "gpt2"})
    with pytest.raises(KeyError, match="known"):
        get_mapping("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_mapping(get_mapping("qwen2"))
    spec = MappingSpec(name="toy-registered", hf_model_types=("toy",), rules=(Rule("a", "b"),))
    register_mapping(spec)
    with pytest.raises(ValueError, match="already registered"):
        register_mapping(spec)
    assert "gate_up_proj" in get_mapping("llama").describe(
        get_mapping("llama").context({"num_hidden_layers": 1, "vocab_size": 9})
    )


# --------------------------------------------------------------------------------------------
# Real checkpoints from transformers: every family, bit-exact round trips
# --------------------------------------------------------------------------------------------

_COMMON = {
    "vocab_size": 61,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}

CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-tied-bias": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True, "attention_bias": True}),
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 4}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "qwen3-tied": ("Qwen3Config", "Qwen3ForCausalLM", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_dir(request, tmp_path_factory):
    import transformers

    config_cls, model_cls, extra = CASES[request.param]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**_COMMON, **extra})
    model = getattr(transformers, model_cls)(config)
    out = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(out, max_shard_size="4KB")  # several shards: gate and up split apart
    return out


def _all_tensors(folder):
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize("pad", [1, 8])
def test_hf_forge_hf_round_trip_is_bit_exact(hf_dir, tmp_path, pad):
    forge, config = load_hf_as_forge(hf_dir, vocab_pad_multiple=pad)
    spec = mapping_for_hf_config(config)
    assert sorted(forge) == sorted(spec.forge_names(spec.context(config)))
    assert forge["embed_tokens.weight"].shape[0] % pad == 0
    assert ("lm_head.weight" in forge) != bool(config.get("tie_word_embeddings"))
    out = save_forge_as_hf(
        forge, tmp_path / "out", config=config, max_shard_size="3KB", vocab_pad_multiple=pad
    )
    original, again = _all_tensors(hf_dir), _all_tensors(out)
    assert sorted(again) == sorted(original)
    for name, t in original.items():
        assert again[name].dtype == t.dtype, name
        assert torch.equal(again[name], t), name
    assert HFCheckpoint(out).config == config


def test_checkpoint_of_another_model_is_rejected(hf_dir):
    config = HFCheckpoint(hf_dir).config
    other = "qwen2" if config["model_type"] != "qwen2" else "llama"
    with pytest.raises(CheckpointMismatchError) as info:
        load_hf_as_forge(hf_dir, mapping=other)
    err = info.value
    assert err.missing or err.unexpected


def test_tensors_older_checkpoints_carry_are_ignored():
    spec = get_mapping("llama")
    ctx = spec.context({"num_hidden_layers": 2, "vocab_size": 8, "tie_word_embeddings": True})
    hf = {name: torch.ones(8, 2) for name in spec.hf_names(ctx)}
    hf["model.layers.1.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # transformers < 4.31
    hf["lm_head.weight"] = torch.ones(8, 2)  # saved although tied
    spec.check_hf({n: t.shape for n, t in hf.items()}, ctx)
    forge = dict(spec.hf_to_forge(hf.items(), ctx))
    assert sorted(forge) == sorted(spec.forge_names(ctx))
    assert "inv_freq" in spec.describe(ctx)
