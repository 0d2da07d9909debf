"""``from_pretrained``'s fill strategies: memory-mapped sharing on CPU, part-by-part joins, casts.

Every strategy must give the same bits as copying each joined tensor; a shared (memory-mapped)
parameter must stay a private, writable copy-on-write mapping, so training never writes the file.
"""

from __future__ import annotations

import pytest
import torch

import forge_models
from forge_ckpt import HFCheckpoint, get_mapping
from forge_models.hf import loading_context
from forge_models.registry import build_model, get_family


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _file_ranges(path) -> list[tuple[int, int]]:
    """Address ranges of ``path``'s memory mappings in this process."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith(str(path)):
                start, stop = (int(x, 16) for x in line.split()[0].split("-"))
                ranges.append((start, stop))
    return ranges


def _saved(tmp_path, name: str, **overrides):
    torch.manual_seed(0)
    source = build_model(name, **overrides)
    folder = forge_models.save_pretrained(source, tmp_path / name)
    return source, folder


def test_mmap_and_copy_loads_hold_the_same_bits_and_share_only_unfused_tensors(tmp_path):
    source, folder = _saved(tmp_path, "qwen2-moe-debug")
    shared = forge_models.from_pretrained(folder)
    copied = forge_models.from_pretrained(folder, mmap=False)
    want = source.state_dict()
    for name, tensor in shared.state_dict().items():
        assert torch.equal(tensor, want[name]), name
        assert torch.equal(copied.state_dict()[name], want[name]), name
    mapped = _file_ranges(folder / "model.safetensors")
    assert mapped, "the checkpoint file is not memory-mapped"

    def in_file(t: torch.Tensor) -> bool:
        return any(a <= t.data_ptr() < b for a, b in mapped)

    ckpt = HFCheckpoint(folder)
    spec = get_mapping(get_family(shared.config.family).ckpt_mapping)
    rules = spec.bind(loading_context(spec, ckpt, shared.config))
    fused = {b.forge for b in rules if b.rule.concat is not None}
    assert fused
    assert len(fused) < len(rules)
    for name, param in shared.named_parameters():
        # unfused tensors keep the file's pages; fused ones are joined into the model's memory
        assert in_file(param) == (name not in fused), name
    assert not any(in_file(p) for p in copied.parameters())


def test_a_shared_parameter_is_private_and_writable(tmp_path):
    source, folder = _saved(tmp_path, "qwen2-debug")  # tied embeddings
    model = forge_models.from_pretrained(folder)
    assert model.lm_head.weight is model.embed_tokens.weight  # the same parameter objects
    embed = model.embed_tokens.weight
    with torch.no_grad():
        embed.add_(1.0)  # copy-on-write: the file keeps its bits
    assert torch.equal(model.lm_head.weight, embed)
    again = forge_models.from_pretrained(folder)
    assert torch.equal(again.embed_tokens.weight, source.embed_tokens.weight)
    assert torch.equal(embed, source.embed_tokens.weight + 1.0)
    model.embed_tokens(
        torch.tensor([1, 2, 3])
    ).sum().backward()  # autograd sees ordinary leaf parameters
    assert embed.grad is not None


def test_casting_and_joining_loads_match_the_source(tmp_path):
    source, folder = _saved(tmp_path, "qwen2-moe-debug")
    half = forge_models.from_pretrained(folder, dtype=torch.bfloat16)
    for name, tensor in half.state_dict().items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, source.state_dict()[name].to(torch.bfloat16)), name
    # load_hf_weights copies into the given tensors by default: storage addresses stay
    model = build_model("qwen2-moe-debug")
    before = {n: _storage_ptr(t) for n, t in model.state_dict().items()}
    forge_models.load_hf_weights(model, folder)
    for name, tensor in model.state_dict().items():
        assert _storage_ptr(tensor) == before[name], name
        assert torch.equal(tensor, source.state_dict()[name]), name


def test_export_after_a_training_only_change_keeps_the_source_keys(tmp_path):
    """An export keeps the source ``config.json``'s keys forge does not read (token ids,
    ``transformers_version``) and its ``generation_config.json`` after a training-only
    override (the MoE aux loss switched on); transformers reads them back."""
    import dataclasses
    import json

    import transformers

    _, folder = _saved(tmp_path, "qwen3-moe-debug")
    source = json.loads((folder / "config.json").read_text())
    source.update(bos_token_id=7, eos_token_id=[8, 9], transformers_version="5.0.0")
    (folder / "config.json").write_text(json.dumps(source))
    generation = {"bos_token_id": 7, "eos_token_id": [8, 9], "temperature": 0.6}
    (folder / "generation_config.json").write_text(json.dumps(generation))
    model = forge_models.from_pretrained(folder)
    moe = dataclasses.replace(model.config.moe, output_router_logits=True)
    model.config = model.config.replace(moe=moe)
    out = forge_models.save_pretrained(model, tmp_path / "out")
    exported = json.loads((out / "config.json").read_text())
    assert exported["output_router_logits"] is True  # the changed key takes the new value
    assert exported["transformers_version"] == "5.0.0"
    config = transformers.AutoConfig.from_pretrained(out)
    assert (config.bos_token_id, config.eos_token_id) == (7, [8, 9])
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert (gen.bos_token_id, gen.eos_token_id, gen.temperature) == (7, [8, 9], 0.6)


def test_an_architecture_change_overlays_the_keys_transformers_derives():
    """``overlay_hf_config``: changed keys take the new values, a source alias of a changed key
    follows it, per-layer ``layer_types`` follow the layer count, other keys stay."""
    import dataclasses

    from forge_models.families._hf_config import overlay_hf_config

    fam = get_family("qwen3_moe")
    config = forge_models.get_config("qwen3-moe-debug")
    source = {
        **fam.config_to_hf(config),
        "num_local_experts": config.moe.num_experts,
        "layer_types": ["full_attention"] * config.num_layers,
        "eos_token_id": 5,
    }
    grown = config.replace(
        num_layers=config.num_layers + 1, moe=dataclasses.replace(config.moe, num_experts=16)
    )
    out = overlay_hf_config(source, fam.config_to_hf(grown))
    assert (out["num_hidden_layers"], out["num_experts"], out["num_local_experts"]) == (3, 16, 16)
    assert out["layer_types"] == ["full_attention"] * 3
    assert out["eos_token_id"] == 5
    assert fam.config_from_hf(out) == grown


@pytest.mark.parametrize("how", ["quantization_config", "float8 tensor"])
def test_a_quantized_checkpoint_is_refused(tmp_path, how):
    """A quantized folder (``quantization_config``, or float8 weights without one) is refused
    with the method and the fix (dequantize first), not cast number by number."""
    import json

    from safetensors.torch import load_file, save_file

    _, folder = _saved(tmp_path, "llama-debug")
    if how == "quantization_config":
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
        (folder / "config.json").write_text(json.dumps(config))
        match = r"quant_method='fp8'.*dequantize"
    else:
        tensors = load_file(folder / "model.safetensors")
        name = "model.layers.0.mlp.down_proj.weight"
        tensors[name] = tensors[name].to(torch.float8_e4m3fn)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        match = (
            r"quantized dtype \(model\.layers\.0\.mlp\.down_proj\.weight \(F8_E4M3\)\).*dequantize"
        )
    with pytest.raises(ValueError, match=match):
        forge_models.from_pretrained(folder)
    model = build_model("llama-debug")
    with pytest.raises(ValueError, match=match):
        forge_models.load_hf_weights(model, folder)
