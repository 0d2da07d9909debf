"""Context and expert parallelism chosen by config (issue 8: "every parallel layout
forge-parallel offers"): 4-process runs of the tiny models give the single-process losses.

- ``parallel=cp2-fsdp``: every packed micro-batch row split over 2 context-parallel ranks (ring
  attention, zigzag layout; Ulysses and the contiguous layout too), FSDP over dp_shard x cp;
  documents of the packed row never attend across each other on any rank.
- ``parallel=ep2-fsdp`` on a MoE model: the experts sharded over 2 of the 4 FSDP ranks, tokens
  sent to them by all-to-all (also chunked to overlap), built on the meta device.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from forge_core.testing import import_path

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")

_RUN = (
    "data.global_batch_rows=8",
    "data.micro_batch_rows=2",
    "train.steps=2",
    "train.eval_batches=1",
    "checkpoint.export_hf=false",
)
#: The single-process references skip the held-out evaluation (one process's is tested in
#: test_train_e2e; the parallel runs keep theirs, so that it runs under every layout).
_NO_EVAL = "train.eval_batches=0"
#: The expert-parallel run whose step-2 checkpoint is resumed, and its reference, go on a step.
_THREE_STEPS = "train.steps=3"


def _losses(output_dir: str, *overrides: str) -> list[list[float]]:
    """Per-step ``[loss, gradient norm]`` of a tiny run (a pool job: rank 0's are the run's)."""
    return tiny.train_losses_and_norms(
        *tiny.TINY_RUN, *_RUN, f"train.output_dir={output_dir}", *overrides
    )


def _close(ranks: list[list[list[float]]], single: list[list[float]]) -> None:
    torch.testing.assert_close(torch.tensor(ranks[0]), torch.tensor(single), rtol=1e-5, atol=1e-6)


def test_context_parallel_layouts_match_one_process(tmp_path, dist_pool):
    pool = dist_pool(4)
    # The dense model with a multi-token prediction module (DeepSeek-V3 section 2.2): its input
    # ids and targets moved on the whole row, then cut like the shard
    # (forge_train.context_parallel); its block's attention context-parallel like the
    # decoder's. (A shard's own shift gives gradient norms 4% off.) The MoE runs below have none.
    model = (*tiny.TINY_MODEL, "model.init_device=meta", "+model.config.mtp_depth=1")
    single = _losses(f"{tmp_path}/single", *model, _NO_EVAL)
    ulysses = ("parallel=cp2-fsdp", "parallel.cp_style=ulysses", "parallel.cp_load_balance=false")
    _close(pool.run(_losses, f"{tmp_path}/ulysses", *model, *ulysses), single)
    # Ring attention, zigzag layout (the MoE runs below: without recompute), with full
    # recompute: the blocks replay their forward in backward under the router.
    recompute = ("parallel=cp2-fsdp", "parallel.recompute=full")
    _close(pool.run(_losses, f"{tmp_path}/cp2_recompute", *model, *recompute), single)
    # 2 pipeline stages x CP2: each stage's attention context-parallel, per micro-batch
    # document boundaries, the last stage's fused loss (and its MTP module's) on its shard of
    # the shifted targets.
    pp_cp = ("parallel=pp2-fsdp", "parallel.cp=2", "parallel.dp_shard=1")
    _close(pool.run(_losses, f"{tmp_path}/pp2_cp2", *model, *pp_cp), single)
    # TP2 x CP2: the losses from the logits, each depth's against its shard of the targets.
    tp_cp = ("parallel=tp2-fsdp", "parallel.cp=2", "parallel.sequence_parallel=false")
    _close(pool.run(_losses, f"{tmp_path}/tp2_cp2", *model, *tp_cp), single)
    # A MoE model: the switch loss and the expert-bias load summed over the ranks that split a
    # row (forge_train.sharded_routing). Under CP2 x TP2 with sequence parallelism each rank
    # routes a tensor-parallel chunk of its context shard, the statistics summed over cp x tp
    # (one expert bias, the switch loss of every token: summed over cp alone, step 1's grad
    # norm is 77% off). CP alone: the pipeline run below, and tests/test_vlm_cp_moe.py.
    moe = (*_MOE, "model.config.moe.router_aux_loss_coef=0.5", "+model.config.moe.expert_bias=true")
    single = _losses(f"{tmp_path}/single_moe", *moe, _NO_EVAL)
    cp_tp_sp = ("parallel=tp2-fsdp", "parallel.cp=2", "parallel.sequence_parallel=true")
    _close(pool.run(_losses, f"{tmp_path}/tp2_sp_cp2_moe", *moe, *cp_tp_sp), single)
    # ... and under 2 pipeline stages x CP2: the last stage sums the carried switch-loss sums
    # over the context-parallel ranks, each stage its expert load (forge_train.pipeline_moe).
    _close(pool.run(_losses, f"{tmp_path}/pp2_cp2_moe", *moe, *pp_cp), single)
    # DeepSeek-V3-style: multi-head latent attention (value heads narrower than query/key
    # heads) under Ulysses, MoE with expert bias and the sequence-wise balance loss weighted
    # so that it moves the losses: each rank's per-document sums (its tokens mapped to their
    # documents of the whole zigzag-cut row) summed over cp (forge_train.sharded_routing),
    # the MoE block of its multi-token prediction module's router among them.
    deepseek = (
        "model=tiny-deepseek",
        "model.init_device=meta",
        "+model.config.mtp_depth=1",
        "+model.config.moe.output_router_logits=true",
        "model.config.moe.router_aux_loss_coef=0.5",
    )
    single = _losses(f"{tmp_path}/single_deepseek", *deepseek, _NO_EVAL)
    ulysses = ("parallel=cp2-fsdp", "parallel.cp_style=ulysses")
    _close(pool.run(_losses, f"{tmp_path}/cp2_deepseek", *deepseek, *ulysses), single)
    # ... and on 2 pipeline stages (ring, zigzag): each stage's MoE blocks sum their
    # per-document sums over cp (forge_train.pipeline_moe).
    _close(pool.run(_losses, f"{tmp_path}/pp2_cp2_deepseek", *deepseek, *pp_cp), single)


#: A short vision-language run: Qwen2.5-VL tiny (M-RoPE positions, causal attention).
_VLM = (
    "recipe=vlm",
    "model=qwen2_5-vl-tiny",
    "train.freeze=[]",
    "data.global_batch_rows=4",
    "logging.progress=plain",
    "logging.tensorboard=false",
    "train.steps=2",
    "train.eval_batches=0",
    "checkpoint.export_hf=false",
)


#: vlm-tiny with causal image attention, to show that its bidirectional blocks matter.
_CAUSAL_IMAGES = "model.config.image_attention=causal"


def _vlm_losses(output_dir: str, *overrides: str) -> list[list[float]]:
    """Per-step ``[loss, gradient norm]`` of the ``_VLM`` run (a pool job; a ``model=``
    override replaces its model)."""
    run = _VLM
    if any(o.startswith("model=") for o in overrides):
        run = tuple(o for o in _VLM if not o.startswith("model="))
    return tiny.train_losses_and_norms(*run, f"train.output_dir={output_dir}", *overrides)


def test_vision_language_model_under_cp2_fsdp2(tmp_path, dist_pool):
    """Each context-parallel rank runs the vision encoder on all of its batch's images, places
    the features and M-RoPE positions on the whole packed row and runs the language model on
    its shard (zigzag): CP2 x FSDP2 gives the single process's losses and gradient norms.
    vlm-tiny's bidirectional image attention too: the whole row's image blocks go to the
    context-parallel attention (ring and Ulysses), which applies them on global positions."""
    pool = dist_pool(4)
    single = _vlm_losses(f"{tmp_path}/single")
    _close(pool.run(_vlm_losses, f"{tmp_path}/cp2", "parallel=cp2-fsdp"), single)
    tiny_vlm = "model=vlm-tiny"  # image_attention=bidirectional
    single = _vlm_losses(f"{tmp_path}/single_bidirectional", tiny_vlm)
    causal = _vlm_losses(f"{tmp_path}/single_causal", tiny_vlm, _CAUSAL_IMAGES)
    assert not torch.allclose(torch.tensor(causal), torch.tensor(single))  # the blocks matter
    _close(pool.run(_vlm_losses, f"{tmp_path}/cp2_bidirectional", tiny_vlm, "parallel=cp2-fsdp"),
           single)  # fmt: skip
    ulysses = ("parallel=cp2-fsdp", "parallel.cp_style=ulysses")
    _close(pool.run(_vlm_losses, f"{tmp_path}/ulysses_bidirectional", tiny_vlm, *ulysses), single)


#: tiny-moe without the balance loss, with a dense first layer (not expert-parallel).
_MOE = ("model=tiny-moe", "+model.config.moe.mlp_only_layers=[0]", "model.init_device=meta")


def test_expert_parallel_layouts_match_one_process(tmp_path, dist_pool):
    """EP2 x FSDP4 (and its checkpoint resumed in one process), EP2 x TP2 (expert tensor
    parallelism), with and without sequence parallelism, and PP2 x EP2 with the balance loss; EP4 over dp_shard 2 x cp 2, the
    all-to-all in two chunks, without it."""
    pool = dist_pool(4)
    single = _losses(f"{tmp_path}/single", *_MOE, _THREE_STEPS, _NO_EVAL)
    ep2 = pool.run(
        _losses,
        f"{tmp_path}/ep2",
        *_MOE,
        "parallel=ep2-fsdp",
        "checkpoint.interval=2",
        _THREE_STEPS,
    )
    _close(ep2, single)
    # Its step-2 checkpoint (experts sharded over ep x FSDP) resumes in one process and gives
    # the step-3 loss and gradient norm the EP2 run went on to have.
    resumed = tmp_path / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    step = "step_00000002"
    shutil.copytree(tmp_path / "ep2" / "checkpoints" / step, resumed / step)
    _close([_losses(f"{tmp_path}/resumed", *_MOE, _THREE_STEPS, _NO_EVAL)], ep2[0][2:])
    single = single[:2]  # the runs below take 2 steps
    # EP2 x TP2: each expert also split over the tensor-parallel ranks (etp = tp).
    tp_ep = ("parallel=tp2-fsdp", "parallel.sequence_parallel=false", "parallel.ep=2")
    _close(pool.run(_losses, f"{tmp_path}/tp2_ep2", *_MOE, *tp_ep), single)
    # With sequence parallelism: each tensor-parallel rank routes its own sequence shard (the
    # switch loss summed over tp), the dispatched rows gathered over etp for the experts.
    tp_sp_ep = ("parallel=tp2-fsdp", "parallel.sequence_parallel=true", "parallel.ep=2")
    _close(pool.run(_losses, f"{tmp_path}/tp2_sp_ep2", *_MOE, *tp_sp_ep), single)
    # 2 pipeline stages x EP2: the first stage holds only the dense layer, the second shards
    # its experts; the switch loss's sums travel between the stages.
    _close(pool.run(_losses, f"{tmp_path}/pp2_ep2", *_MOE, "parallel=pp2-fsdp", "parallel.ep=2"),
           single)  # fmt: skip
    no_aux = (*_MOE, "model.config.moe.output_router_logits=false")
    single = _losses(f"{tmp_path}/single_no_aux", *no_aux, _NO_EVAL)
    cp_ep = ("parallel=cp2-fsdp", "parallel.ep=4", "parallel.ep_chunks=2")
    _close(pool.run(_losses, f"{tmp_path}/cp2_ep4", *no_aux, *cp_ep), single)


#: Tensor x context parallelism on 4 processes (contiguous layout: a row of 2 x cp chunks is
#: not needed).
_TP_CP = ("parallel.cp=2", "parallel.dp_shard=1", "parallel.cp_load_balance=false")


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (
            ("parallel=cp2-fsdp", "parallel.cp_style=ulysses", "model.config.num_kv_heads=1"),
            4,
            "must divide the head counts",
        ),
        (("parallel=cp2-fsdp", "data.seq_len=63"), 4, "cannot be cut into 4 equal chunks"),
        (  # tp x cp Ulysses: each rank's tp shard of the heads is split over cp
            (
                "parallel=tp2-fsdp",
                *_TP_CP,
                "parallel.cp_style=ulysses",
                "model.config.num_kv_heads=2",
            ),
            4,
            r"tp x cp = 2 x 2 = 4 must divide the head counts \(num_heads=8, num_kv_heads=2\)",
        ),
        (  # sequence parallelism cuts the packed row (63 tokens) into tp shards
            ("parallel=tp2-fsdp", "data.seq_len=63", "data.micro_batch_rows=1"),
            4,
            r"63 x 1 = 63 tokens cannot be cut into 2 equal sequence shards",
        ),
        (  # ... each context-parallel rank's part of it (66 / cp=2 = 33 tokens)
            ("parallel=tp2-fsdp", *_TP_CP, "data.seq_len=33"),
            4,
            r"66 / cp=2 = 33 tokens per rank\) .* multiple of tp x cp = 2 x 2 = 4",
        ),
        # (one row per micro-batch: 4 rows split over the 4 data-parallel ranks)
        (("parallel=ep2-fsdp", "data.micro_batch_rows=1"), 4, "has no mixture-of-experts layers"),
        (
            (
                "parallel=ep2-fsdp",
                "data.micro_batch_rows=1",
                "model=tiny-moe",
                "parallel.ep=4",
                "parallel.dp_shard=4",
                "model.config.moe.num_experts=6",
            ),
            4,
            "does not divide the model's 6 experts",
        ),
    ],
)
def test_bad_context_and_expert_layouts_are_refused(tmp_path, overrides, world, message):
    from forge_train.components import build_components
    from forge_train.compose import compose_run_config
    from forge_train.config import ConfigError

    cfg = compose_run_config([*tiny.TINY_RUN, f"train.output_dir={tmp_path}", *overrides])
    with pytest.raises(ConfigError, match=message):
        build_components(
            cfg, world_size=world, degrees=cfg.parallel.resolve(world), device=torch.device("cpu")
        )
