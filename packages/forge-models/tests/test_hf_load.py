"""``from_pretrained``'s fill strategies: memory-mapped sharing on CPU, part-by-part joins, casts.

Every strategy must give the same bits as copying each joined tensor; a shared (memory-mapped)
parameter must stay a private, writable copy-on-write mapping, so training never writes the file.
"""

from __future__ import annotations

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
