"""An export cast to bfloat16 keeps the tensors transformers keeps in float32 (its
``_keep_in_fp32_modules_strict``; DeepSeek-V3's router selection bias) in float32, as
transformers' own ``save_pretrained`` of a bfloat16 model does: a bfloat16 cast would drop the
bits the aux-loss-free balancing trained (a bias near 1 moves in steps of 2**-7 there), and
transformers' float32 upcast on load cannot bring them back. forge's ``from_pretrained`` reads
the tensor in either dtype."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import forge_models
from forge_ckpt import HFCheckpoint
from forge_models.hf import KEEP_FP32_MODULES, keep_fp32_patterns

BIAS = "model.layers.1.mlp.gate.e_score_correction_bias"
#: Selection biases bf16 cannot hold (its spacing at 1 is 2**-7).
VALUES = 1 + 1e-3 * torch.arange(8, dtype=torch.float32)

#: Every ``model_type`` a forge export's ``config.json`` (or one of its sub-configs) names.
SUB_MODEL_TYPES = (
    "qwen2_5_vl_text", "qwen2_5_vl_vision", "siglip_vision_model", "siglip2_vision_model",
    "internvl_vision",
)  # fmt: skip


def _model_with_bias():
    model = forge_models.build_model("deepseek-v3-debug")
    block = model.layers[1].mlp
    block.expert_bias.copy_(VALUES)
    return model


def _file_dtypes(folder) -> dict[str, str]:
    return {name: info.dtype for name, info in HFCheckpoint(folder).tensor_info().items()}


def test_bf16_export_writes_the_router_bias_in_fp32(tmp_path):
    model = _model_with_bias()
    out = forge_models.save_pretrained(model, tmp_path / "hf", dtype=torch.bfloat16)
    dtypes = _file_dtypes(out)
    assert dtypes[BIAS] == "F32"
    assert {d for n, d in dtypes.items() if "e_score_correction_bias" not in n} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert torch.equal(load_file(out / "model.safetensors")[BIAS], VALUES)

    back = forge_models.from_pretrained(out)  # a bfloat16 model with its fp32 bias buffer
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
    assert torch.equal(back.layers[1].mlp.expert_bias, VALUES)


def test_from_pretrained_reads_a_bias_stored_in_bf16(tmp_path):
    out = forge_models.save_pretrained(_model_with_bias(), tmp_path / "hf", dtype=torch.bfloat16)
    tensors = load_file(out / "model.safetensors")
    tensors[BIAS] = tensors[BIAS].to(torch.bfloat16)  # an export of another tool
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    bias = forge_models.from_pretrained(out).layers[1].mlp.expert_bias
    assert bias.dtype == torch.float32
    assert torch.equal(bias, VALUES.to(torch.bfloat16).float())


def test_patterns_by_dtype_and_sub_config():
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
    assert keep_fp32_patterns(config, torch.bfloat16) == ("e_score_correction_bias",)
    assert keep_fp32_patterns(config, torch.float16) == ("e_score_correction_bias",)
    assert keep_fp32_patterns(config, torch.float32) == ()
    nested = {"model_type": "some_vlm", "text_config": {"model_type": "deepseek_v3"}}
    assert keep_fp32_patterns(nested, torch.bfloat16) == ("e_score_correction_bias",)
    assert keep_fp32_patterns({"model_type": "llama"}, torch.bfloat16) == ()


def _transformers_keep_lists(model_type: str) -> tuple[set[str], set[str]] | None:
    """``(strict, fp16_only)`` keep-lists of transformers' base model class of ``model_type``
    (``None`` when this transformers has none)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    name = MODEL_MAPPING_NAMES.get(model_type)
    try:
        cls = getattr(transformers, name) if isinstance(name, str) else None
    except (ImportError, AttributeError, RuntimeError):  # a class it lacks, a broken extra
        cls = None
    if cls is None:
        return None
    strict = set(getattr(cls, "_keep_in_fp32_modules_strict", None) or ())
    return strict, set(getattr(cls, "_keep_in_fp32_modules", None) or ())


def test_table_matches_the_installed_transformers():
    pytest.importorskip("transformers")
    exported = {
        t for f in forge_models.list_families() for t in forge_models.get_family(f).hf_model_types
    }
    checked = []
    for model_type in sorted(exported | set(SUB_MODEL_TYPES)):
        found = _transformers_keep_lists(model_type)
        if found is None:
            continue  # no base model class of this type in this transformers
        strict, fp16 = found
        want = KEEP_FP32_MODULES.get(model_type, ((), ()))
        assert (tuple(sorted(strict)), tuple(sorted(fp16))) == want, model_type
        checked.append(model_type)
    assert {"deepseek_v3", "internvl", "qwen3_moe", "llama"} <= set(checked)
