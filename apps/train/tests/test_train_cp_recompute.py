"""``parallel.recompute=selective`` under context parallelism (was refused): 4-process CP2 x
FSDP2 runs of the tiny model give the single process's losses and gradient norms; so does
``parallel.recompute_modules`` (in one process).

Selective recompute (Korthikanti et al. 2022, arXiv:2205.05198) keeps the projections and
recomputes the attention core; under context parallelism the core is the ring / Ulysses
attention with its exchanges, which the policy treats as one unit, recomputed whole in the
same order on every rank (``forge_parallel.replay_checkpoint.recomputed_whole``). Op by op the
policy cached the ring's receive buffers and replayed only some exchanges: the ranks
deadlocked in backward.
"""

from __future__ import annotations

from pathlib import Path

import torch

from forge_core.testing import import_path

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")

_RUN = (*tiny.TINY, *tiny.TWO_STEPS)


def _losses(output_dir: str, *overrides: str) -> list[list[float]]:
    """Per-step ``[loss, gradient norm]`` (a pool job: rank 0's are the run's)."""
    return tiny.train_losses_and_norms(*_RUN, f"train.output_dir={output_dir}", *overrides)


def _close(ranks: list[list[list[float]]], single: list[list[float]]) -> None:
    torch.testing.assert_close(torch.tensor(ranks[0]), torch.tensor(single), rtol=1e-5, atol=1e-6)


def test_selective_recompute_under_cp2_fsdp2_matches_one_process(tmp_path, dist_pool):
    pool = dist_pool(4)
    single = _losses(f"{tmp_path}/single")
    selective = ("parallel=cp2-fsdp", "parallel.recompute=selective")
    # ring attention, zigzag (load-balanced) layout
    _close(pool.run(_losses, f"{tmp_path}/ring", *selective), single)
    # DeepSpeed-Ulysses: the all-to-alls and the attention core between them, one unit
    ulysses = (*selective, "parallel.cp_style=ulysses")
    _close(pool.run(_losses, f"{tmp_path}/ulysses", *ulysses), single)
    # Megatron-Core's recompute_modules (attn and mlp checkpointed whole, autograd keeps the
    # rest of each block), in this process; under CP2 x FSDP2 in forge-parallel's
    # test_cp_selective_recompute.py
    modules = ("parallel.recompute=selective", "parallel.recompute_modules=[attn,mlp]")
    _close([_losses(f"{tmp_path}/modules", *modules)], single)


def test_recompute_modules_reach_forge_parallel():
    from forge_train.components import _recompute
    from forge_train.compose import compose_run_config

    cfg = compose_run_config(
        [*_RUN, "parallel.recompute=selective", "parallel.recompute_modules=[attn,mlp]"]
    )
    assert _recompute(cfg).modules == ("attn", "mlp")
    assert _recompute(cfg).ops is None
