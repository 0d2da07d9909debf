"""bfloat16 checkpoints round-trip bit for bit: HF -> forge -> HF (the CLI, with vocabulary
padding) and HF -> Megatron -> HF (legacy and torch_dist, TP2 x PP2, Transformer Engine and
local layer specs, grouped experts), for one dense (Qwen3) and one MoE (Qwen3-MoE) family.

Every tensor starts with bfloat16 bit patterns that a detour through float32 would change or a
careless copy lose: -0.0, the smallest subnormal and a signaling NaN with a payload (a
float32 -> bfloat16 cast makes any NaN 0x7FC0). Tensors are compared as raw 16-bit integers,
as ``forge-convert --check`` and the replicated-copy checks do (:mod:`forge_ckpt.bits`).
"""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from forge_ckpt.cli import main
from forge_ckpt.megatron import hf_to_megatron, megatron_to_hf

_COMMON = {
    "vocab_size": 61, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
}  # fmt: skip
CASES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
        "moe_intermediate_size": 4, "num_experts_per_tok": 2, "num_experts": 4,
        "mlp_only_layers": [0],
    }),
}  # fmt: skip

#: -0.0, the smallest subnormal, a signaling NaN with payload (as int16 bit patterns).
_SPECIALS = torch.tensor([0x8000 - 0x10000, 0x0001, 0x7F81], dtype=torch.int16)


def _tensors(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _bits(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder as raw 16-bit patterns (all must be bfloat16)."""
    tensors = _tensors(folder)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}, folder
    return {n: t.view(torch.int16) for n, t in tensors.items()}


def _save_bf16(family: str, out: pathlib.Path) -> None:
    import transformers

    config_cls, model_cls, extra = CASES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**_COMMON, **extra})
    getattr(transformers, model_cls)(config).to(torch.bfloat16).save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    tensors = load_file(out / "model.safetensors")
    for t in tensors.values():
        n = min(t.numel(), len(_SPECIALS))
        t.view(torch.int16).view(-1)[:n] = _SPECIALS[:n]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("family", sorted(CASES))
def test_bf16_round_trips_are_bit_exact(tmp_path, capsys, family):
    hf = tmp_path / "hf"
    _save_bf16(family, hf)
    original = _bits(hf)
    assert torch.isnan(_tensors(hf)["model.norm.weight"][2])

    forge, back = tmp_path / "forge", tmp_path / "back"
    assert main(["hf-to-forge", str(hf), str(forge), "--vocab-pad-multiple", "8", "--quiet"]) == 0
    assert {t.dtype for t in _tensors(forge).values()} == {torch.bfloat16}
    assert main(["forge-to-hf", str(forge), str(back), "--quiet"]) == 0
    again = _bits(back)
    assert sorted(again) == sorted(original)
    assert all(torch.equal(again[n], b) for n, b in original.items())
    # --check compares bits: the NaNs match their copies, and a -0.0 turned 0.0 is caught.
    capsys.readouterr()
    assert main(["forge-to-hf", str(forge), str(back), "--check"]) == 0
    assert "check passed" in capsys.readouterr().out
    tensors = load_file(back / "model.safetensors")
    tensors["model.norm.weight"].view(torch.int16)[0] = 0  # -0.0 -> +0.0
    save_file(tensors, back / "model.safetensors", metadata={"format": "pt"})
    assert main(["forge-to-hf", str(forge), str(back), "--check"]) == 1
    assert "model.norm.weight: 1 of 16 values differ" in capsys.readouterr().out

    moe = family.endswith("moe")
    for fmt, te in (("legacy", True), ("torch_dist", True), ("torch_dist", False)):
        tag = f"{fmt}-te{te}"
        mc = hf_to_megatron(
            hf, tmp_path / f"mc-{tag}", tensor_parallel=2, pipeline_parallel=2, format=fmt,
            te_spec=te, grouped_gemm=moe and not te,
        )  # fmt: skip
        again = _bits(megatron_to_hf(mc, tmp_path / f"hf-{tag}"))
        assert sorted(again) == sorted(original), tag
        for name, b in original.items():
            assert torch.equal(again[name], b), (tag, name)
