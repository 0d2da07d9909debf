"""Module-level selective recompute (Megatron-Core's ``--recompute-modules``; Korthikanti et
al. 2022, arXiv:2205.05198, checkpoint the core attention only): ``RecomputeConfig(mode=
"selective", modules=(...))`` checkpoints the matched submodules of each block and lets
autograd decide everywhere else; the ``"attention"`` preset runs its policy inside each
block's attention submodule only. One process: gradients equal no recompute exactly (forge's
tiny decoder and a ``transformers`` Llama), the right ops are recomputed, the summary names
the checkpointed modules. ``torch.compile`` after a submodule checkpoint:
``test_parallelize.py::test_compile_each_block_after_recompute[selective]`` (the attention
preset) and here with whole ``attn`` and ``mlp``. Under context, tensor and data parallelism:
``test_cp_selective_recompute.py`` and ``test_exactness.py``. Zero-bubble pipelines (a split
backward: input-gradient pass, then weight-gradient pass) run whole-submodule checkpoints and
refuse per-op policies, which allow one backward per region.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from forge_core.testing import import_path
from forge_parallel import CompileConfig, RecomputeConfig, parallelize

tm = import_path(Path(__file__).with_name("tiny_models.py"), "forge_parallel_tests_tiny_models")

SDPA = "aten._scaled_dot_product_flash_attention_for_cpu"


def _backward(model, tokens) -> tuple[Counter[str], dict[str, torch.Tensor]]:
    loss = tm.logits_of(model, tokens).logsumexp(-1).mean()
    with tm.OpCounter() as mode:
        loss.backward()
    return mode.counts, {n: p.grad for n, p in model.named_parameters()}


def _extra_backward_ops(plain, config):
    """Ops run again in backward with ``config`` (against none), after checking that every
    gradient equals the one without recompute bit for bit."""
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    result = parallelize(copy.deepcopy(plain), None, recompute=config)
    base_ops, base_grads = _backward(plain, tokens)
    ops, grads = _backward(result.model, tokens)
    for name, grad in base_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)
    extra = {op: ops[op] - base_ops[op] for op in set(ops) | set(base_ops)}
    return {op: n for op, n in extra.items() if n}, result


# (config, ops recomputed per backward of the 2-block tiny decoder, ops never recomputed)
_TINY_CASES = {
    # the preset: the attention core (and rotary embedding) inside attn; projections kept
    "attention_preset": (RecomputeConfig(mode="selective"), {SDPA: 2}, {"aten.mm", "aten.rsqrt"}),
    # whole attn: its projections too (o_proj's input is what backward needs: not rerun)
    "modules_attn": (
        RecomputeConfig(mode="selective", modules=("attn",)),
        {SDPA: 2, "aten.mm": 6},
        {"aten.silu", "aten.rsqrt"},
    ),
    # whole mlp: gate_up_proj and silu (down_proj's input is what backward needs)
    "modules_mlp": (
        RecomputeConfig(mode="selective", modules=("mlp",)),
        {"aten.silu": 2, "aten.mm": 2},
        {SDPA, "aten.rsqrt"},
    ),
    "modules_norms": (
        RecomputeConfig(mode="selective", modules=("*_norm",)),
        {"aten.rsqrt": 4},
        {SDPA, "aten.mm", "aten.silu"},
    ),
    # a per-op policy inside the matched module: silu only, the matmuls kept
    "modules_mlp_silu": (
        RecomputeConfig(mode="selective", modules=("mlp",), ops=("aten.silu",)),
        {"aten.silu": 2},
        {SDPA, "aten.mm", "aten.rsqrt"},
    ),
    "modules_attn_mlp_pointwise": (
        RecomputeConfig(mode="selective", modules=("attn", "mlp"), ops="pointwise"),
        {"aten.silu": 2},
        {SDPA, "aten.mm", "aten.rsqrt"},
    ),
}


@pytest.mark.parametrize("case", list(_TINY_CASES))
def test_modules_give_exact_gradients_and_recompute_what_they_say(case):
    config, recomputed, kept = _TINY_CASES[case]
    extra, _ = _extra_backward_ops(tm.build_tiny(), config)
    for op, count in recomputed.items():
        assert extra.get(op, 0) == count, (op, extra)
    for op in kept:
        assert op not in extra, (op, extra)


def test_summary_names_each_checkpointed_submodule():
    config = RecomputeConfig(mode="selective", modules=("attn", "mlp.gate_up_proj"))
    result = parallelize(tm.build_tiny(), None, recompute=config)
    rows = {r.name: r.recompute for r in result.summary.rows}
    assert rows["layers.1.attn.q_proj"] == rows["layers.1.attn.o_proj"] == "full"
    assert rows["layers.1.mlp.gate_up_proj"] == "full"
    assert rows["layers.1.mlp.down_proj"] == rows["layers.1.attn_norm"] == "-"
    printed = [line for line in str(result.summary).splitlines() if "layers.0.attn.v_proj" in line]
    assert len(printed) == 1, printed
    assert "full" in printed[0], printed
    preset = parallelize(tm.build_tiny(), None, recompute=RecomputeConfig(mode="selective"))
    assert preset.summary.row("layers.0.attn.k_proj").recompute == "selective (attention)"
    assert preset.summary.row("layers.0.mlp.down_proj").recompute == "-"


def test_transformers_llama_modules_and_attention_preset_give_exact_gradients():
    pytest.importorskip("transformers")
    plain = tm.build_hf_llama()
    extra, result = _extra_backward_ops(
        plain, RecomputeConfig(mode="selective", modules=("self_attn", "mlp"))
    )
    assert extra.get("aten.silu") == 2, extra
    assert extra.get(SDPA) == 2, extra
    assert result.summary.row("model.layers.0.mlp.up_proj").recompute == "full"
    assert result.summary.row("model.layers.0.input_layernorm").recompute == "-"
    # the preset finds self_attn: the attention core recomputed there, the MLP untouched
    plain.zero_grad()
    extra, result = _extra_backward_ops(plain, RecomputeConfig(mode="selective"))
    assert extra.get(SDPA) == 2, extra
    assert "aten.silu" not in extra, extra
    assert "aten.mm" not in extra, extra
    row = result.summary.row("model.layers.1.self_attn.o_proj")
    assert row.recompute == "selective (attention)"


def test_unmatched_pattern_names_it_and_lists_the_block_paths():
    config = RecomputeConfig(mode="selective", modules=("attn", "self_attn"))
    with pytest.raises(ValueError, match=r"\['self_attn'\] match no submodule of any block"):
        parallelize(tm.build_tiny(), None, recompute=config)
    with pytest.raises(ValueError, match=r"has: attn_norm, attn, attn\.q_proj"):
        parallelize(tm.build_tiny(), None, recompute=config)


class _ExpertsBlock(torch.nn.Module):
    """A block whose experts sit in a ModuleList the block indexes (its forward never runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))

    def forward(self, x):
        return sum(expert(x).relu() for expert in self.experts)


def test_a_pattern_naming_a_container_checkpoints_its_members():
    from forge_parallel import apply_recompute

    blocks = [(f"layers.{i}", _ExpertsBlock()) for i in range(2)]
    applied = apply_recompute(blocks, RecomputeConfig(mode="selective", modules=("experts",)))
    assert sorted(applied) == [f"layers.{i}.experts.{e}" for i in range(2) for e in range(2)]
    assert all(blocks[0][1].experts[e]._forge_recompute for e in range(2))
    assert not hasattr(blocks[0][1].experts, "_forge_recompute")


def test_a_pipeline_stage_gets_the_patterns_its_blocks_have():
    """Layer 0 dense, layer 1 with experts (DeepSeek-V3's first dense layers): the stage with
    only layer 0 gets no recompute for an experts-only pattern; a pattern no layer has is an
    error, also on a stage that has none of the layers it would match."""
    from forge_parallel.recompute import stage_recompute

    dense = torch.nn.Module()
    dense.mlp = torch.nn.Linear(8, 8)
    moe = _ExpertsBlock()
    model_blocks = [("layers.0", dense), ("layers.1", moe)]
    config = RecomputeConfig(mode="selective", modules=("experts", "mlp"))
    assert stage_recompute(config, model_blocks[:1], model_blocks).modules == ("mlp",)
    assert stage_recompute(config, model_blocks[1:], model_blocks).modules == ("experts",)
    experts_only = RecomputeConfig(mode="selective", modules=("experts",))
    assert stage_recompute(experts_only, model_blocks[:1], model_blocks) is None
    with pytest.raises(ValueError, match=r"\['attn'\] match no submodule of any block"):
        stage_recompute(
            RecomputeConfig(mode="selective", modules=("attn",)), model_blocks[:1], model_blocks
        )
    full = RecomputeConfig(mode="full")
    assert stage_recompute(full, model_blocks[:1], model_blocks) is full


def test_recompute_applies_once_also_with_modules():
    from forge_parallel import apply_recompute

    model = tm.build_tiny()
    blocks = [(f"layers.{i}", b) for i, b in enumerate(model.layers)]
    apply_recompute(blocks, RecomputeConfig(mode="selective", modules=("mlp",)))
    with pytest.raises(
        ValueError, match=re.escape("layers.0 (or a submodule) is already checkpointed")
    ):
        apply_recompute(blocks, RecomputeConfig(mode="full"))


def test_config_errors():
    with pytest.raises(ValueError, match=r"modules=\('attn',\) choose .* but mode='full'"):
        RecomputeConfig(mode="full", modules=("attn",))
    with pytest.raises(ValueError, match=re.escape("modules must be a tuple of submodule path")):
        RecomputeConfig(mode="selective", modules="attn")
    with pytest.raises(ValueError, match=re.escape("modules must be a tuple of submodule path")):
        RecomputeConfig(mode="selective", modules=("attn", ""))
    with pytest.raises(
        ValueError, match="ops='pointwise' is the per-op policy of mode='selective'"
    ):
        RecomputeConfig(mode="full", ops="pointwise")
    with pytest.raises(ValueError, match="unknown selective recompute preset 'mlp'"):
        RecomputeConfig(mode="selective", modules=("mlp",), ops="mlp")


def test_compile_after_whole_submodule_checkpoints_gives_eager_gradients():
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    plain = tm.build_tiny()
    config = RecomputeConfig(mode="selective", modules=("attn", "mlp"))
    compiled = parallelize(
        copy.deepcopy(plain), None, recompute=config, compile=CompileConfig(backend="aot_eager")
    )
    eager = parallelize(copy.deepcopy(plain), None, recompute=config)
    assert compiled.summary.row("layers.1").compiled == "aot_eager"
    assert compiled.summary.row("layers.1.mlp.down_proj").recompute == "full"
    for model in (plain, compiled.model, eager.model):
        tm.logits_of(model, tokens).logsumexp(-1).mean().backward()
    for name, p in plain.named_parameters():
        torch.testing.assert_close(
            compiled.model.get_parameter(name).grad, p.grad, rtol=1e-6, atol=1e-7, msg=name
        )
        torch.testing.assert_close(eager.model.get_parameter(name).grad, p.grad, msg=name)


def _zero_bubble_job() -> dict[str, dict[str, float]]:
    ph = import_path(
        Path(__file__).with_name("pipeline_helpers.py"), "forge_parallel_tests_pipeline_helpers"
    )
    whole = RecomputeConfig(mode="selective", modules=("attn", "mlp"))
    layout = {"dims": {"pp": 2, "dp_shard": 1}, "pipeline": {"schedule": "zero_bubble"}}
    return ph.run_pipeline_layouts(
        "tiny4", {"whole": {**layout, "stage_parallel": {"recompute": whole}}}
    )


def test_zero_bubble_pipeline_with_whole_submodule_checkpoints_trains_like_one_process(
    dist_pool,
):
    # 5 AdamW steps, 2 micro-batches, clipping that bites: losses, gradient norms and final
    # parameters against one process without recompute (pipeline_helpers.py).
    for errors in dist_pool(2).run(_zero_bubble_job):
        worst = max(v for k, v in errors["whole"].items() if k != "seconds")
        assert worst <= 1e-5, errors


@pytest.mark.parametrize(
    ("config", "detail"),
    [
        (RecomputeConfig(mode="selective"), "without modules runs the 'attention' preset"),
        (RecomputeConfig(mode="selective", ops="pointwise"), "with ops='pointwise'"),
        (
            RecomputeConfig(mode="selective", modules=("mlp",), ops=("aten.silu",)),
            r"with ops=\('aten.silu',\)",
        ),
        (RecomputeConfig(mode="auto", memory_budget=2**20), "mode='auto' may choose"),
    ],
)
def test_zero_bubble_refuses_per_op_policies_and_names_whole_submodules(config, detail):
    from forge_parallel.pipeline.config import PipelineConfig
    from forge_parallel.pipeline.schedule import _check_split_backward

    for schedule, virtual in (("zero_bubble", 1), ("zbv", 2)):
        with pytest.raises(ValueError, match=f"{detail}.*modules=\\('attn', 'mlp'\\)"):
            _check_split_backward(
                PipelineConfig(schedule=schedule, virtual_stages=virtual), {"recompute": config}
            )
    whole = RecomputeConfig(mode="selective", modules=("attn", "mlp"))
    _check_split_backward(PipelineConfig(schedule="zero_bubble"), {"recompute": whole})
    _check_split_backward(PipelineConfig(schedule="1f1b"), {"recompute": config})
