"""A model built on the meta device and initialized after sharding (FSDP2, TP, EP), or as one
pipeline stage, holds the values one process draws with the same seed (forge_models.init)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import forge_models
from forge_models import MoEConfig, TransformerConfig, build_model
from forge_models.init import init_, materialized_device

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _config(**kw) -> TransformerConfig:
    base = {
        "vocab_size": 50,
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_layers": 3,
        "num_heads": 4,
        "num_kv_heads": 2,
        "vocab_pad_multiple": 8,  # rows past the vocabulary stay zero, on every shard
        "tie_word_embeddings": False,
    }
    return TransformerConfig(**{**base, **kw})


def _reference(config: TransformerConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    return {k: v.detach().clone() for k, v in build_model(config).state_dict().items()}


def _mismatches(model: nn.Module, reference: dict[str, torch.Tensor], *, seed: int) -> list[str]:
    """Materialize the sharded meta ``model`` with ``seed``; the names of the parameters whose
    gathered values differ from ``reference``'s."""
    from torch.distributed.tensor import DTensor

    torch.manual_seed(seed)
    forge_models.materialize(model, "cpu")
    return [
        name
        for name, param in model.state_dict().items()
        if not torch.equal(
            param.full_tensor() if isinstance(param, DTensor) else param, reference[name]
        )
    ]


def _layout_mismatches(layout: str) -> list[str]:
    """(A pool job.) Build the model on the meta device, shard it as ``layout`` says over the 4
    ranks, materialize and initialize it with seed 7; the parameters whose gathered values
    differ from the single-process model's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    moe = MoEConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8)
    # 50 vocabulary rows over 4 ranks: uneven shards (13, 13, 13, 11).
    config = _config(vocab_pad_multiple=1, **({"moe": moe} if layout == "tp2_ep2_fsdp2" else {}))
    reference = _reference(config)
    model = build_model(config, device="meta")
    if layout == "fsdp4":
        mesh = init_device_mesh("cpu", (4,))
        dp = mesh
    else:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        dp = mesh["dp"]
        # The head's 50 vocabulary rows: 25 per tp rank, then FSDP's uneven 13 + 12 of those.
        parallelize_module(model, mesh["tp"], {"lm_head": ColwiseParallel()})
        for layer in model.layers:
            parallelize_module(
                layer.attn,
                mesh["tp"],
                {
                    "q_proj": ColwiseParallel(),
                    "k_proj": ColwiseParallel(),
                    "v_proj": ColwiseParallel(),
                    "o_proj": RowwiseParallel(),
                },
            )
            experts = layer.mlp.experts
            for pname, p in list(experts.named_parameters()):  # experts split by index
                sharded = distribute_tensor(p.detach(), mesh["tp"], [Shard(0)])
                experts.register_parameter(pname, nn.Parameter(sharded))
    for layer in model.layers:
        fully_shard(layer, mesh=dp)  # over tp-sharded parameters: strided shards of one dim
    fully_shard(model, mesh=dp)
    return _mismatches(model, reference, seed=7)


#: A vision-language model: SigLIP encoder (LeCun-normal patch embedding, Xavier blocks),
#: pixel-shuffle MLP projector, Llama language model.
_VLM = {
    "vision": {
        "name": "siglip",
        "hidden_size": 32,
        "num_layers": 2,
        "num_heads": 2,
        "intermediate_size": 64,
        "image_size": 28,
        "patch_size": 7,
    },
    "projector": {"name": "pixel_shuffle_mlp"},
    "text": {"size": "llama-debug", "num_layers": 2, "vocab_size": 128},
    "image_token_id": 7,
}


def _vlm_mismatches() -> list[str]:
    """(A pool job.) The VLM built on the meta device, every block and the whole model FSDP2
    over the 4 ranks: the parameters whose gathered values differ from one process's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from forge_models.vlm import build_vlm

    torch.manual_seed(3)
    reference = build_vlm(_VLM).state_dict()
    model = build_vlm(_VLM, device="meta")
    mesh = init_device_mesh("cpu", (4,))
    for name, module in model.named_modules():
        if name.endswith(("layers.0", "layers.1", "blocks.0", "blocks.1")):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return _mismatches(model, reference, seed=3)


def test_a_sharded_meta_vision_language_model_holds_the_single_process_values(dist_pool):
    assert dist_pool(4).run(_vlm_mismatches) == [[]] * 4


@pytest.mark.parametrize("layout", ["fsdp4", "tp2_ep2_fsdp2"])
def test_sharded_meta_models_hold_the_single_process_values(dist_pool, layout):
    """FSDP2 over 4 ranks (uneven shards), and TP2 (column and row sharded projections) x EP2
    (experts split by index) x FSDP2 on a MoE model: gathered, every parameter equals the
    single process's."""
    assert dist_pool(4).run(_layout_mismatches, layout) == [[]] * 4


def test_a_pipeline_stage_draws_what_one_process_draws_for_its_layers():
    """Only layer 1 and the head are materialized (a last pipeline stage): the other layers'
    meta parameters still advance the random stream, so the stage holds the single-process
    values."""
    config = _config()
    reference = _reference(config)
    model = build_model(config, device="meta")
    stage = nn.ModuleList([model.layers[2], model.norm, model.lm_head])
    forge_models.materialize(stage, "cpu", init=False)
    torch.manual_seed(7)
    model.init_weights()
    materialized = {n: p for n, p in model.state_dict().items() if not p.is_meta}
    assert len(materialized) == len(dict(stage.named_parameters()))
    for name, param in materialized.items():
        assert torch.equal(param, reference[name]), name
    assert model.layers[0].attn.q_proj.weight.is_meta


def test_a_plain_model_is_initialized_in_place():
    """Unsharded, materialized parameters are drawn in place: ``init_`` does not allocate a
    second tensor for them, and an all-meta module has no device to draw on."""
    w = torch.empty(4, 3)
    before = w.data_ptr()
    init_(w, lambda t: t.fill_(2.0), device=None)
    assert w.data_ptr() == before
    assert torch.equal(w, torch.full((4, 3), 2.0))
    assert materialized_device(nn.Linear(2, 2, device="meta")) is None
    assert materialized_device(nn.Linear(2, 2)) == torch.device("cpu")


def test_materialize_keeps_a_tied_embedding_and_head_tied():
    """Allocating meta parameters gives each module a new parameter; a tied head must still
    share the embedding's (else it keeps uninitialized memory and trains apart)."""
    config = _config(tie_word_embeddings=True)
    reference = _reference(config)
    model = build_model(config, device="meta")
    assert not _mismatches(model, reference, seed=7)
    assert model.lm_head.weight is model.embed_tokens.weight
