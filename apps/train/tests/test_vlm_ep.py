"""Expert parallelism for vision-language models with a MoE language model (Qwen3-VL-MoE
style): the language model's routed experts sharded over ``parallel.ep`` ranks of
``dp_shard x cp`` (``forge_parallel.SubmoduleParallel(expert_parallel=...)`` for the
``language_model`` part), the vision encoder and projector data-parallel over all ranks. 4-process
runs give the single process's losses and gradient norms with the switch balance loss and the
expert bias on (``test_vlm_cp_moe``'s model).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from forge_core.testing import import_path

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")
vlm_moe = import_path(Path(__file__).with_name("test_vlm_cp_moe.py"), "forge_train_tests_vlm_moe")


def test_vlm_moe_under_ep2_fsdp_and_ep2_cp2_matches_one_process(tmp_path, dist_pool):
    """EP2 x FSDP4 (each pair of ranks holds 2 of the 4 experts, FSDP over the pairs' copies)
    and EP2 x CP2 x FSDP2 (the experts' ranks taken from ``dp_shard x cp``, the routing
    statistics summed over cp). Scaling EP's combine by 1.05 in the workers failed the EP2
    comparison (gradient norm off by 1.2e-4 relative)."""
    pool = dist_pool(4)
    losses, moe = vlm_moe._losses, (vlm_moe._MOE, "checkpoint.save_final=false")
    single = losses(f"{tmp_path}/single", *moe)
    vlm_moe._close(pool.run(losses, f"{tmp_path}/ep2", *moe, "parallel=ep2-fsdp"), single)
    cp_ep = ("parallel=cp2-fsdp", "parallel.ep=2")
    vlm_moe._close(pool.run(losses, f"{tmp_path}/cp2_ep2", *moe, *cp_ep), single)


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (("parallel=ep2-fsdp",), 4, "has no mixture-of-experts layers"),  # a dense VLM
        (("parallel=tp2-fsdp", "parallel.ep=2", vlm_moe._MOE), 4, "under tensor parallelism"),
        (("parallel=pp2-fsdp", "parallel.ep=2", vlm_moe._MOE), 4, "under pipeline parallelism"),
    ],
)
def test_vlm_expert_layouts_not_built_are_refused(tmp_path, overrides, world, message):
    from forge_train.components import build_components
    from forge_train.compose import compose_run_config
    from forge_train.config import ConfigError

    cfg = compose_run_config([*vlm_moe._VLM, f"train.output_dir={tmp_path}", *overrides])
    with pytest.raises(ConfigError, match=message):
        build_components(
            cfg, world_size=world, degrees=cfg.parallel.resolve(world), device=torch.device("cpu")
        )


def test_submodule_expert_parallel_needs_its_config():
    """A part with ``ep > 1`` names its experts (forge-parallel's ``SubmoduleParallel``)."""
    from forge_parallel import SubmoduleParallel
    from forge_parallel.expert_parallel import EPConfig

    with pytest.raises(ValueError, match="needs expert_parallel=EPConfig"):
        SubmoduleParallel(ep=2)
    with pytest.raises(ValueError, match="ep must be a positive integer"):
        SubmoduleParallel(ep=0, expert_parallel=EPConfig(experts="layers.*.mlp.experts"))
    assert SubmoduleParallel(ep=2, expert_parallel=EPConfig(experts="layers.*.mlp.experts")).ep == 2
