"""Optional: vision-language exports load into megatron-core's modules and compute what
transformers computes (a LLaVA-OneVision ``LLaVAModel``, an InternViT ``CLIPViTModel``).

Skipped unless megatron-core is installed (not in the workspace lock); run with
``uv run --with 'megatron-core==0.16.*' pytest packages/forge-ckpt/tests/test_megatron_core_vlm.py``.
On CPU, as :mod:`test_megatron_core` (``megatron_core_cpu.init_megatron_on_cpu``), with local layer specs: the
SigLIP layers as Megatron-LM's ``examples/multimodal/layer_specs.get_layer_spec(is_vit=True)``
(LayerNorm, no attention mask, GELU-tanh MLP with biases), the language model as GPTModel's local
spec. Two CPU-only adjustments, no numerics replaced: ``CLIPViTModel`` moves its
``position_ids`` with ``.cuda()`` (made a no-op), and without Transformer Engine it builds
``ln_post`` from ``torch.nn.LayerNorm`` with a ``config=`` keyword that class does not take
(megatron-core 0.16), so it is given megatron's ``WrappedTorchNorm`` (the same LayerNorm).

A tiny random LLaVA-OneVision exported at one rank (legacy, local spec) loads with
``load_state_dict`` (no key missing but Transformer Engine ``_extra_state``; the one extra,
``vision_projection.image_newline``, which ``LLaVAModel`` has no parameter for, dropped); the
``torch_dist`` export written at TP2 x PP2 loads through ``dist_checkpointing.load`` into the
one-rank model (the same one extra key) with the same tensors; and in float32: ``vision_model`` gives the SigLIP tower's ``last_hidden_state`` (``ln_post`` is its
``post_layernorm``), ``vision_projection`` the projector's output, ``language_model`` the
language model's logits.

InternVL's vision tower loads (strict) into ``CLIPViTModel(model_subtype="internvit300M")`` with
Megatron-LM's InternViT-300M layer (``examples/multimodal/nvlm/internvit.py``): its
``LayerScalingTransformerLayer`` (``ls1`` / ``ls2`` scaling the residual branches) lives in
Megatron-LM's examples, not in megatron-core, so :class:`_LayerScalingTransformerLayer`
transcribes it (``examples/multimodal/layer_scaling.py``), and gives the tower's
``last_hidden_state``. InternVL's projector (its LayerNorm fused into a Transformer Engine
``linear_fc1``) needs Transformer Engine and is not built here. The checks run in a subprocess
(process group, parallel state).
"""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest

TOLERANCE = 1e-5  # relative error in float32 (measured about 2e-7)


def test_megatron_core_vlm_modules_compute_transformers_outputs():
    pytest.importorskip("megatron.core")
    pytest.importorskip("transformers")
    run = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, timeout=500, check=False
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "llava_onevision: LLaVAModel matches transformers" in run.stdout, run.stdout
    assert "internvl: CLIPViTModel(internvit300M) matches transformers" in run.stdout, run.stdout


def _bias_dropout_add_layer_scaling(ls, training, fused):
    """Megatron-LM's ``get_bias_dropout_add_layer_scaling``: ``residual + dropout(x + b) * ls``."""

    def bias_dropout_add(x_with_bias, residual, prob):
        import torch

        x, bias = x_with_bias
        x = x if bias is None else x + bias
        return residual + torch.nn.functional.dropout(x, p=prob, training=training) * ls

    return bias_dropout_add


def _layer_scaling_layer():
    """Megatron-LM's ``LayerScalingTransformerLayer``: a TransformerLayer with ``ls1`` / ``ls2``."""
    import torch
    from megatron.core.transformer.transformer_layer import TransformerLayer

    class _LayerScalingTransformerLayer(TransformerLayer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.ls1 = torch.nn.Parameter(torch.ones(self.config.hidden_size))
            self.ls2 = torch.nn.Parameter(torch.ones(self.config.hidden_size))
            self.self_attn_bda = functools.partial(self.self_attn_bda, self.ls1)
            self.mlp_bda = functools.partial(self.mlp_bda, self.ls2)

    return _LayerScalingTransformerLayer


def _vit_layer_spec(*, layer_scaling: bool = False):
    """Megatron-LM's ViT layer (``get_layer_spec(is_vit=True)``) with megatron-core's modules;
    ``layer_scaling``: its InternViT-300M layer (``get_internvit300M_layer_spec``, local)."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_layer import (
        TransformerLayer,
        TransformerLayerSubmodules,
    )

    attention = SelfAttentionSubmodules(
        linear_qkv=ColumnParallelLinear,
        core_attention=DotProductAttention,
        linear_proj=RowParallelLinear,
    )
    bda = _bias_dropout_add_layer_scaling if layer_scaling else get_bias_dropout_add
    return ModuleSpec(
        module=_layer_scaling_layer() if layer_scaling else TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=attention,
            ),
            self_attn_bda=bda,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear
                ),
            ),
            mlp_bda=bda,
        ),
    )


def _llava_model(hc):
    """megatron-core's LLaVAModel (float32, no dropout or fusions) for a LLaVA-OneVision config."""
    import torch
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.multimodal.llava_model import LLaVAModel
    from megatron.core.models.vision.clip_vit_model import CLIPViTModel
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_config import TransformerConfig

    init = CLIPViTModel.__init__
    init.__defaults__ = tuple(
        WrappedTorchNorm if d is torch.nn.LayerNorm else d for d in init.__defaults__
    )
    from megatron_core_cpu import CPU_CONFIG

    common = {**CPU_CONFIG, "params_dtype": torch.float32}
    t, v = hc.text_config, hc.vision_config
    language = TransformerConfig(
        num_layers=t.num_hidden_layers, hidden_size=t.hidden_size,
        num_attention_heads=t.num_attention_heads, num_query_groups=t.num_key_value_heads,
        ffn_hidden_size=t.intermediate_size, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, normalization="RMSNorm",
        layernorm_epsilon=t.rms_norm_eps, add_bias_linear=False, add_qkv_bias=True, **common,
    )  # fmt: skip
    vision = TransformerConfig(
        num_layers=v.num_hidden_layers, hidden_size=v.hidden_size,
        num_attention_heads=v.num_attention_heads, ffn_hidden_size=v.intermediate_size,
        gated_linear_unit=False, normalization="LayerNorm", layernorm_epsilon=v.layer_norm_eps,
        activation_func=functools.partial(torch.nn.functional.gelu, approximate="tanh"),
        add_bias_linear=True, add_qkv_bias=True, **common,
    )  # fmt: skip
    vision.vision_model_type = "siglip"
    projection = TransformerConfig(
        num_layers=1, hidden_size=t.hidden_size, num_attention_heads=1,
        ffn_hidden_size=t.hidden_size, gated_linear_unit=False,
        activation_func=torch.nn.functional.gelu, add_bias_linear=True, **common,
    )  # fmt: skip
    theta = (getattr(t, "rope_parameters", None) or {}).get("rope_theta") or t.rope_theta
    return LLaVAModel(
        language_transformer_config=language,
        language_transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        language_vocab_size=128, language_max_sequence_length=64,
        vision_transformer_config=vision, vision_transformer_layer_spec=_vit_layer_spec(),
        drop_vision_class_token=False, vision_projection_config=projection,
        vision_projection_layer_spec=MLPSubmodules(
            linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear
        ),
        share_embeddings_and_output_weights=t.tie_word_embeddings or hc.tie_word_embeddings,
        language_position_embedding_type="rope", language_rotary_base=int(theta),
        img_h=v.image_size, img_w=v.image_size, patch_dim=v.patch_size,
    ).eval()  # fmt: skip


def _relative_error(got, want) -> float:
    return ((got - want).norm() / want.norm()).item()


def _check_internvit(tmp) -> None:
    """InternVL's tower in CLIPViTModel(internvit300M) against transformers' (module doc)."""
    import torch
    import transformers
    from megatron.core.models.vision.clip_vit_model import CLIPViTModel
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron_core_cpu import CPU_CONFIG
    from test_megatron_vlm import _save

    from forge_ckpt.megatron import hf_to_megatron

    src = _save("internvl", tmp / "internvl")
    hf = transformers.InternVLForConditionalGeneration.from_pretrained(src).eval()
    v = hf.config.vision_config
    assert (v.hidden_act, v.norm_type, v.use_mean_pooling) == ("gelu", "layer_norm", True)
    config = TransformerConfig(
        num_layers=v.num_hidden_layers, hidden_size=v.hidden_size,
        num_attention_heads=v.num_attention_heads, ffn_hidden_size=v.intermediate_size,
        gated_linear_unit=False, activation_func=torch.nn.functional.gelu,
        normalization="LayerNorm", layernorm_epsilon=v.layer_norm_eps, add_bias_linear=True,
        add_qkv_bias=True, params_dtype=torch.float32, **CPU_CONFIG,
    )  # fmt: skip
    tower = CLIPViTModel(
        config, _vit_layer_spec(layer_scaling=True), add_class_token=True, class_token_len=1,
        patch_dim=v.patch_size[0], img_h=v.image_size[0], img_w=v.image_size[1],
        model_subtype="internvit300M",
    ).eval()  # fmt: skip
    out = hf_to_megatron(src, tmp / "internvl-mc", format="legacy", te_spec=True)
    state = torch.load(out / "iter_0000000/mp_rank_00/model_optim_rng.pt", weights_only=False)
    prefix = "vision_model."
    own = {k[len(prefix) :]: t for k, t in state["model"].items() if k.startswith(prefix)}
    tower.load_state_dict(own, strict=True)
    pixels = torch.randn(2, 3, *v.image_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        err = _relative_error(tower(pixels), hf.model.vision_tower(pixels).last_hidden_state)
    assert err < TOLERANCE, err
    print(f"internvl: CLIPViTModel(internvit300M) matches transformers; relative error {err:.2e}")


def _check_llava_onevision(tmp) -> None:
    """LLaVA-OneVision in LLaVAModel against transformers (module doc)."""
    import torch
    import transformers
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from test_megatron_vlm import _save

    from forge_ckpt.megatron import hf_to_megatron

    src = _save("llava_onevision", tmp / "hf")
    hf = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(src).eval()
    out = hf_to_megatron(src, tmp / "mc", format="legacy", te_spec=False)
    state = torch.load(out / "iter_0000000/mp_rank_00/model_optim_rng.pt", weights_only=False)
    state = state["model"]
    state.pop("vision_projection.image_newline")  # no LLaVAModel parameter (see vlm_families)
    model = _llava_model(hf.config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("_extra_state") for k in missing), missing

    # torch_dist written at TP2 x PP2 (encoder on the first stage), loaded by megatron-core's
    # dist_checkpointing into the one-rank model: the same tensors as the legacy export.
    dist_dir = hf_to_megatron(
        src, tmp / "dist", format="torch_dist", te_spec=False, tensor_parallel=2,
        pipeline_parallel=2,
    )  # fmt: skip
    other = _llava_model(hf.config)
    loaded, only_in_checkpoint, only_in_model = dist_checkpointing.load(
        other.sharded_state_dict(), str(dist_dir / "iter_0000000"), strict=StrictHandling.RETURN_ALL
    )
    # The checkpoint's one key the model lacks, and the model's Transformer Engine metadata.
    assert set(only_in_checkpoint) == {"vision_projection.image_newline"}, only_in_checkpoint
    assert all(k.endswith("._extra_state") for k in only_in_model), only_in_model
    other.load_state_dict(loaded, strict=False)
    want_state, got_state = model.state_dict(), other.state_dict()
    compared = [n for n, t in want_state.items() if isinstance(t, torch.Tensor)]
    compared = [n for n in compared if not n.endswith("_extra_state")]
    for n in compared:
        assert torch.equal(got_state[n], want_state[n]), n
    assert len(compared) > 30, compared

    size = hf.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    ids = torch.randint(0, 90, (2, 10), generator=torch.Generator().manual_seed(1))
    causal = torch.ones(10, 10, dtype=torch.bool).triu(1)[None, None]  # True: masked out
    with torch.no_grad():
        tower = hf.model.vision_tower(pixels).last_hidden_state
        vision = model.vision_model(pixels)  # [tiles, patches, h]
        projected = model.vision_projection(vision.transpose(0, 1).contiguous()).transpose(0, 1)
        logits = hf.lm_head(hf.model.language_model(ids).last_hidden_state)
        got = model.language_model(ids, torch.arange(10).expand_as(ids), causal)
        errors = {
            "vision_model": _relative_error(vision, tower),
            "vision_projection": _relative_error(projected, hf.model.multi_modal_projector(tower)),
            "language_model": _relative_error(got[..., : logits.shape[-1]], logits),
        }
    assert max(errors.values()) < TOLERANCE, errors
    print(f"llava_onevision: LLaVAModel matches transformers; relative errors {errors}")


def _check() -> None:
    import tempfile
    from pathlib import Path

    import torch
    from megatron_core_cpu import init_megatron_on_cpu

    init_megatron_on_cpu()
    torch.Tensor.cuda = lambda self, *a, **k: self  # CLIPViTModel's position_ids
    tmp = Path(tempfile.mkdtemp())
    _check_llava_onevision(tmp)
    _check_internvit(tmp)


if __name__ == "__main__":
    _check()
