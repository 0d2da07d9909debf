"""Converting without a model still checks shapes against config.json and refuses integer
weights: a plain-copy rule (q_proj -> q_proj) cannot see a mis-shaped tensor by itself."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from forge_ckpt import CheckpointMismatchError, get_mapping
from forge_ckpt.cli import main
from forge_ckpt.convert import load_hf_as_forge

_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 32,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}


def _llama_tensors() -> dict[str, torch.Tensor]:
    spec = get_mapping("llama")
    ctx = spec.context(_CONFIG)
    shapes = spec.expected_hf_shapes(_CONFIG, ctx)
    assert set(shapes) == set(spec.hf_names(ctx))  # every tensor of this llama is described
    torch.manual_seed(0)
    return {name: torch.randn(shape) for name, shape in shapes.items()}


def _folder(tmp_path, tensors) -> str:
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_CONFIG))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return str(folder)


def test_hf_to_forge_refuses_a_tensor_of_the_wrong_shape(tmp_path, capsys):
    tensors = _llama_tensors()
    assert main(["hf-to-forge", _folder(tmp_path, tensors), str(tmp_path / "ok"), "--quiet"]) == 0
    q = "model.layers.0.self_attn.q_proj.weight"
    tensors[q] = tensors[q][:8].clone()  # half the query heads
    bad = tmp_path / "bad"
    bad.mkdir()
    src = _folder(bad, tensors)
    capsys.readouterr()
    assert main(["hf-to-forge", src, str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{q} (shape from config.json): checkpoint [8, 16], model expects [16, 16]" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointMismatchError, match=r"q_proj\.weight .*checkpoint \[8, 16\]"):
        load_hf_as_forge(src)


def test_an_integer_tensor_for_a_float_weight_is_refused(tmp_path, capsys):
    tensors = _llama_tensors()
    norm = "model.layers.0.input_layernorm.weight"
    tensors[norm] = torch.ones(16, dtype=torch.int32)
    src = _folder(tmp_path, tensors)
    assert main(["hf-to-forge", src, str(tmp_path / "out"), "--quiet"]) == 2
    assert f"{norm}: I32" in capsys.readouterr().err
    # A loader that streams tensors without the header check refuses it too.
    spec = get_mapping("llama")
    with pytest.raises(CheckpointMismatchError, match=rf"{norm}: torch\.int32"):
        dict(spec.hf_to_forge(tensors.items(), spec.context(_CONFIG)))


@pytest.mark.parametrize(
    ("model_type", "extra"),
    [
        ("llama", {"attention_bias": True, "head_dim": 8}),
        ("qwen2", {}),
        ("qwen3", {"head_dim": 8}),
        ("qwen2_moe", {"num_experts": 2, "num_experts_per_tok": 1, "mlp_only_layers": [0],
                       "moe_intermediate_size": 8, "shared_expert_intermediate_size": 8}),
        ("qwen3_moe", {"num_experts": 2, "num_experts_per_tok": 1, "mlp_only_layers": [0],
                       "moe_intermediate_size": 8}),
    ],
)  # fmt: skip
def test_config_shapes_match_transformers(model_type, extra):
    """The shapes a config implies are those transformers builds from it (meta device)."""
    transformers = pytest.importorskip("transformers")
    config = {**_CONFIG, "model_type": model_type, "num_hidden_layers": 2, **extra}
    config.pop("architectures")
    hf_config = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    built = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    spec = get_mapping(model_type)
    expected = spec.expected_hf_shapes(config, spec.context(config))
    assert len(expected) >= 9 * 2 - 2
    for name, shape in expected.items():
        assert built[name] == shape, name
