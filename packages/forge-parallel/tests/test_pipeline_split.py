"""Pipeline splitting, placement, bubble formulas and validation: pure functions, no processes.

The stage modules of every rank, chained in stage order in one process, must compute exactly
what the whole model computes (the tiny decoder and ``transformers``' Llama).
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch

from forge_core.testing import import_path
from forge_parallel.pipeline import (
    PipelineConfig,
    balanced_partition,
    bubble_fraction,
    decoder_layout,
    layer_costs,
    split_stages,
    stage_plan,
    stage_ranks,
    stages_of_rank,
)

tm = import_path(Path(__file__).with_name("tiny_models.py"), "forge_parallel_tests_tiny_models")


# -- partition and placement ---------------------------------------------------------------


def test_balanced_partition_minimises_the_slowest_stage():
    assert balanced_partition([1.0] * 8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert balanced_partition([1.0] * 5, 2) == [(0, 2), (2, 5)]  # ties: earlier stages smaller
    # a heavy head on the last stage moves layers to the first
    assert balanced_partition([1.0] * 6, 2, last=2.0) == [(0, 4), (4, 6)]
    assert balanced_partition([1.0] * 6, 2, first=2.0) == [(0, 2), (2, 6)]
    assert balanced_partition([5.0, 1.0, 1.0, 1.0, 1.0, 1.0], 2) == [(0, 1), (1, 6)]
    with pytest.raises(ValueError, match="3 stages but only 2 layers"):
        balanced_partition([1.0, 1.0], 3)


def test_virtual_stage_placement():
    assert stage_ranks(2, 2, "loop") == [0, 1, 0, 1]
    assert stage_ranks(4, 2, "v") == [0, 1, 2, 3, 3, 2, 1, 0]
    assert stages_of_rank(0, 4, 2, "v") == [0, 7]
    assert stages_of_rank(1, 2, 3, "loop") == [1, 3, 5]
    with pytest.raises(ValueError, match="virtual_stages=2"):
        stage_ranks(2, 3, "v")


# -- bubble ---------------------------------------------------------------------------------


def test_bubble_fraction_formulas():
    assert bubble_fraction("gpipe", pp=4, microbatches=8) == pytest.approx(3 / 11)
    assert bubble_fraction("1f1b", pp=4, microbatches=8) == pytest.approx(3 / 11)
    assert bubble_fraction(
        "interleaved_1f1b", pp=4, microbatches=8, virtual_stages=2
    ) == pytest.approx(3 / 19)
    assert bubble_fraction("zero_bubble", pp=4, microbatches=8) == pytest.approx(3 / 27)
    assert bubble_fraction("zbv", pp=4, microbatches=8, virtual_stages=2) == 0.0
    # without a separate weight-gradient pass ZB-H1 has 1F1B's bubble
    assert bubble_fraction("zero_bubble", pp=4, microbatches=8, t_w=0.0) == pytest.approx(3 / 11)
    assert bubble_fraction("1f1b", pp=1, microbatches=3) == 0.0


# -- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "check", "message"),
    [
        ({}, {"pp": 4, "num_layers": 2}, r"pp=4 stages but the model has only 2 layers"),
        (
            {"schedule": "interleaved_1f1b", "virtual_stages": 2, "microbatches": 4},
            {"pp": 2, "num_layers": 3},
            r"virtual_stages=2 x pp=2 = 4 stages but the model has only 3 layers",
        ),
        (
            {"schedule": "interleaved_1f1b", "virtual_stages": 2, "microbatches": 6},
            {"pp": 4, "num_layers": 8},
            r"microbatches=6 is not a multiple of 4; use 4 or 8",
        ),
        ({"microbatches": 2}, {"pp": 4, "num_layers": 8}, r"microbatches >= .*\(4\)"),
        (
            {"microbatches": 4},
            {"pp": 2, "num_layers": 4, "batch": 6},
            r"batch size 6 is not divisible by microbatches=4",
        ),
        ({"split": (1, 2)}, {"pp": 2, "num_layers": 4}, r"assigns 3 layers but the model has 4"),
        ({"split": (4,)}, {"pp": 2, "num_layers": 4}, r"1 layer counts but the pipeline has 2"),
    ],
)
def test_validation_names_the_numbers(kwargs, check, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig(**kwargs).validate(**check)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"schedule": "pipedream"}, "unknown pipeline schedule"),
        ({"schedule": "1f1b", "virtual_stages": 2}, "runs one stage per rank"),
        ({"schedule": "zbv", "virtual_stages": 3}, "exactly 2 stages per rank"),
        ({"microbatches": 0}, "microbatches must be a positive integer"),
        ({"split": "random"}, "unknown split"),
        ({"split": (2, 0)}, "tuple of positive layer counts"),
    ],
)
def test_config_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig(**kwargs)


# -- splitting real models ------------------------------------------------------------------


def test_decoder_layout_of_tiny_and_transformers_llama():
    tiny = decoder_layout(tm.build_tiny())
    assert (tiny.pre, tiny.post, tiny.rotary) == (("embed",), ("norm", "lm_head"), None)
    assert tiny.blocks == ("layers.0", "layers.1")
    assert tiny.blocks_pattern == "layers.*"
    hf = decoder_layout(tm.build_hf_llama())
    assert hf.pre == ("model.embed_tokens",)
    assert hf.post == ("model.norm", "lm_head")
    assert hf.rotary == "model.rotary_emb"


def _chain(model, pp, config, tokens, sample=None):
    """Every rank's stages, run in stage order in this process."""
    by_stage, owned = {}, []
    for rank in range(pp):
        indices, modules, _, bounds = split_stages(
            model, pp=pp, pp_rank=rank, config=config, sample_input=sample
        )
        by_stage.update(zip(indices, modules, strict=True))
        owned.append({n for m in modules for n, _ in m.named_parameters()})
    x = tokens
    for s in range(len(bounds)):
        x = by_stage[s](x)
    return x, owned, bounds


@pytest.mark.parametrize(
    "config",
    [
        PipelineConfig(schedule="1f1b"),
        PipelineConfig(schedule="interleaved_1f1b", virtual_stages=2),
        PipelineConfig(schedule="zbv", virtual_stages=2, split="params"),
        PipelineConfig(split=(3, 1)),
    ],
    ids=["1f1b", "interleaved", "zbv_params", "explicit"],
)
def test_stages_chain_to_the_whole_tiny_model(config):
    model = tm.build_tiny(n_layers=4)
    tokens = torch.randint(0, 64, (2, 8))
    out, owned, _ = _chain(model, 2, config, tokens)
    torch.testing.assert_close(out, model(tokens), rtol=0, atol=0)
    names = {n for n, _ in model.named_parameters()}
    assert set().union(*owned) == names
    assert sum(len(o) for o in owned) == len(names)
    assert "embed.weight" in owned[0]
    last_rank = 0 if config.schedule == "zbv" else 1  # V: the last stage is on rank 0
    assert "lm_head.weight" in owned[last_rank]


def test_stages_chain_to_the_whole_transformers_llama():
    model = tm.build_hf_llama()
    tokens = torch.randint(0, 64, (2, 8))
    out, owned, _ = _chain(model, 2, PipelineConfig(), tokens)
    torch.testing.assert_close(out, model(input_ids=tokens).logits, rtol=1e-6, atol=1e-6)
    assert owned[0] == {n for n, _ in model.named_parameters() if ".layers.1." not in n} - {
        "model.norm.weight",
        "lm_head.weight",
    }


def test_flops_split_moves_layers_away_from_a_heavy_head():
    model = tm.build_tiny(n_layers=6, vocab=1024)
    layout = decoder_layout(model)
    tokens = torch.randint(0, 1024, (1, 8))
    blocks, pre, post = layer_costs(model, layout, "flops", tokens)
    assert pre == 0.0
    assert post > 2 * blocks[0] > 0
    _, _, bounds = _chain(model, 2, PipelineConfig(split="flops"), tokens, sample=tokens)
    assert bounds[0][1] - bounds[0][0] > bounds[1][1] - bounds[1][0]
    with pytest.raises(ValueError, match="sample_input"):
        layer_costs(model, layout, "flops")


def test_stage_plan_drops_patterns_a_stage_lacks():
    model = tm.build_tiny(n_layers=2)
    _, (first,), _, _ = split_stages(model, pp=2, pp_rank=0, config=PipelineConfig(microbatches=2))
    plan = stage_plan(tm.tiny_plan(loss_parallel=False), first)
    assert "embed" in plan.styles
    assert "lm_head" not in plan.styles
    assert "norm" not in plan.styles
    assert "layers.*.attn" in plan.attributes


def test_a_rank_keeps_only_its_layers():
    model = tm.build_tiny(n_layers=4)
    unowned = weakref.ref(model.layers[3])
    owned = weakref.ref(model.layers[0])
    _, modules, _, _ = split_stages(model, pp=2, pp_rank=0, config=PipelineConfig())
    del model
    gc.collect()
    assert unowned() is None
    assert owned() is not None
    assert [n for n, _ in modules[0].named_children()] == ["embed", "layers"]


def test_modules_run_ahead_stay_off_the_first_stage_but_tie_to_the_last():
    # A VLM's token embedding runs ahead of the pipeline (visual features scattered in); the
    # head tied to it on the last stage still names and holds it.
    config = PipelineConfig(microbatches=2)
    model = tm.build_tiny(n_layers=2, tie=True)
    _, (first,), _, _ = split_stages(model, pp=2, pp_rank=0, config=config, ahead=("embed",))
    assert [n for n, _ in first.named_children()] == ["layers"]
    x = torch.randn(1, 3, model.embed.embedding_dim)  # the first stage takes embeddings
    torch.testing.assert_close(first(x), model.layers[0](x))
    _, (last,), _, _ = split_stages(model, pp=2, pp_rank=1, config=config, ahead=("embed",))
    assert next(iter(last.named_parameters()))[0] == "embed.weight"
    assert last.get_parameter("embed.weight") is model.embed.weight
    with pytest.raises(ValueError, match=r"ahead=\['norm'\] are not pre-parts"):
        split_stages(model, pp=2, pp_rank=0, config=config, ahead=("norm",))


def test_split_rejects_more_stages_than_layers():
    with pytest.raises(ValueError, match="pp=4 stages but the model has only 2 layers"):
        split_stages(tm.build_tiny(), pp=4, pp_rank=0, config=PipelineConfig())


class _ScaledBlock(torch.nn.Module):
    """A block that takes a per-batch argument besides the hidden states."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x + self.proj(x) * scale


class _ScaledDecoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, 4)
        self.layers = torch.nn.ModuleList(_ScaledBlock() for _ in range(4))
        self.extras = torch.nn.ModuleList()  # empty optional heads: not a stage part
        self.head = torch.nn.Linear(4, 16)

    def forward(self, tokens: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, scale)
        return self.head(x)


def test_block_args_reach_every_block_per_microbatch():
    model = _ScaledDecoder()
    layout = decoder_layout(model)
    assert layout.post == ("head",)  # the empty ModuleList is skipped
    _, stages, _, _ = split_stages(model, pp=1, pp_rank=0, config=PipelineConfig(schedule="gpipe"))
    (stage,) = stages
    tokens = torch.randint(0, 16, (2, 5))
    scales = [torch.tensor(0.5), torch.tensor(2.0)]
    stage.set_block_args([(s,) for s in scales])
    for microbatch, scale in enumerate(scales):
        stage.microbatch = microbatch
        torch.testing.assert_close(stage(tokens), model(tokens, scale), rtol=0, atol=0)
    stage.microbatch = 2
    with pytest.raises(RuntimeError, match="micro-batch 2 has no block arguments"):
        stage(tokens)
    stage.set_block_args(None)
    # Without block arguments the block lacks its scale: the error says how to pass it.
    with pytest.raises(TypeError, match=r"block 'layers.0' \(_ScaledBlock\).*block_args="):
        stage(tokens)


class _FailingBlock(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x)  # a TypeError inside the block, not at its call


def test_a_type_error_inside_a_block_is_not_blamed_on_its_arguments():
    model = _ScaledDecoder()
    model.layers[0] = _FailingBlock()
    _, (stage,), _, _ = split_stages(model, pp=1, pp_rank=0, config=PipelineConfig())
    with pytest.raises(TypeError) as raised:
        stage(torch.randint(0, 16, (2, 5)))
    assert "block_args" not in str(raised.value)


def test_graph_weights_are_the_leaves_the_forward_used():
    """The split backward of zero-bubble schedules finds the weights in the autograd graph (the
    unsharded parameters under FSDP2), not in ``module.parameters()``."""
    from forge_parallel.pipeline.split_backward import graph_weights

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model[2].bias.requires_grad_(False)
    x = torch.randn(3, 4, requires_grad=True)
    stand_in = torch.randn(4, 4, requires_grad=True)  # used instead of model[0].weight
    out = torch.nn.functional.linear(x, stand_in, model[0].bias)
    out = model[2](model[1](out))
    found = graph_weights([out], [x])
    assert {id(t) for t in found} == {id(stand_in), id(model[0].bias), id(model[2].weight)}
    assert graph_weights([out.detach()], [x]) == []


def test_zero_bubble_refuses_selective_recompute(fake_pg):
    from forge_core import ParallelDims
    from forge_parallel import RecomputeConfig
    from forge_parallel.pipeline import pipeline

    with fake_pg(world_size=4, rank=0):
        mesh = ParallelDims(world_size=4, pp=2, dp_shard=2).build_mesh()
        for mode in ("selective", "auto"):
            recompute = RecomputeConfig(mode=mode, memory_budget=0 if mode == "auto" else None)
            with pytest.raises(ValueError, match=f"recompute mode='{mode}'.*mode='full'"):
                pipeline(
                    tm.build_tiny(n_layers=4),
                    mesh,
                    loss_fn=torch.nn.functional.cross_entropy,
                    schedule="zero_bubble",
                    stage_parallel={"recompute": recompute},
                )
