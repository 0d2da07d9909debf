"""``parallel.recompute=auto``: forge-parallel's automatic recompute policy from the trainer.

Each block is measured on its first forward and gets the option with the least extra compute
whose activations kept for backward fit ``parallel.recompute_budget_mib`` (Chen et al. 2016's
compute-for-memory trade; Korthikanti et al. 2022's observation that the cheap-to-recompute
activations are the ones worth dropping: ``forge_parallel.auto_recompute``). Recomputation
changes what is kept, not what is computed: the losses and gradient norms are those of a run
without recompute, in one process and under TP2 + SP x FSDP2. The trainer logs what was chosen
after the first step, so the tests read the choice from that line: a budget that is lost on the
way to forge-parallel shows as another choice.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

from forge_core.testing import import_path
from forge_train.compose import compose_run_config
from forge_train.config import ConfigError

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")

_RUN = (*tiny.TINY, *tiny.TWO_STEPS)
_AUTO = ("parallel.recompute=auto",)
_LINE = re.compile(r"recompute auto \(blocks per choice\): (.*)")


def _losses_and_choices(output_dir: str, *overrides: str) -> tuple[list[list[float]], str]:
    """Per-step ``[loss, gradient norm]`` and the trainer's line of recompute choices (a pool
    job: rank 0's are the run's; the line is ``""`` on the other ranks, which do not log)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rows = tiny.train_losses_and_norms(*_RUN, f"train.output_dir={output_dir}", *overrides)
    found = _LINE.findall(printed.getvalue())
    assert len(found) <= 1, found  # once per run
    return rows, found[0] if found else ""


def _choices(line: str) -> list[tuple[int, str, float]]:
    """``(blocks, choice, MiB kept per block)`` of each choice in the trainer's line."""
    found = re.findall(r"(\d+) x (auto: [^;]*?)\(?([0-9.]+) MiB\)", line)
    assert found, line
    assert len(found) == line.count(" x auto: "), line
    return [(int(n), choice, float(mib)) for n, choice, mib in found]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (_AUTO, r"parallel.recompute_budget_mib: is required with parallel.recompute=auto.*"
         r"recompute_budget_mib=64"),
        (("parallel.recompute_budget_mib=64",),
         r"recompute_budget_mib: is the budget of parallel.recompute=auto \(it is none\)"),
        (("parallel.recompute=full", "parallel.recompute_budget_scope=total"),
         r"recompute_budget_scope: applies to parallel.recompute=auto only \(it is full\)"),
        ((*_AUTO, "parallel.recompute_budget_mib=-1"),
         r"recompute_budget_mib: must be a finite number of MiB >= 0.*got -1.0"),
        ((*_AUTO, "parallel.recompute_budget_mib=8", "parallel.recompute_budget_scope=layer"),
         r"parallel.recompute_budget_scope: must be one of block, total, got 'layer'"),
        ((*_AUTO, "parallel.recompute_budget_mib=8", "parallel.recompute_modules=[attn]"),
         r"recompute_modules: parallel.recompute=auto picks the submodules to checkpoint itself"),
        ((*_AUTO, "parallel.recompute_budget_mib=8", "parallel=pp2-fsdp",
          "parallel.pp_schedule=zero_bubble"),
         r"parallel.recompute: auto may choose a per-op policy.*pp_schedule=zero_bubble"),
        ((*_AUTO, "parallel.recompute_budget_mib=8", "parallel=pp2-fsdp",
          "parallel.pp_schedule=zbv", "parallel.pp_virtual_stages=2"),
         r"parallel.recompute: auto may choose a per-op policy.*pp_schedule=zbv"),
        ((*_AUTO, "parallel.recompute_budget_mib=8", "parallel.recompute_budget_scope=total",
          "parallel=pp2-fsdp", "parallel.pp_schedule=interleaved_1f1b",
          "parallel.pp_virtual_stages=2"),
         r"recompute_budget_scope: total is shared by the blocks of each pipeline stage"),
        ((*_AUTO, "parallel.recompute_budget_mib=8", "parallel.recompute_budget_scope=total",
          "recipe=vlm"),
         r"recompute_budget_scope: total is ambiguous for a vision-language model"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_run_config(list(overrides))


def test_the_budget_reaches_forge_parallel_in_bytes():
    from forge_train.components import _recompute

    for extra, scope in (((), "block"), (("parallel.recompute_budget_scope=total",), "total")):
        cfg = compose_run_config([*_AUTO, "parallel.recompute_budget_mib=1.5", *extra])
        recompute = _recompute(cfg)
        assert (recompute.mode, recompute.memory_budget) == ("auto", 1.5 * 2**20)
        assert recompute.budget_scope == scope
    # 0: as little as possible; 1F1B pipelines take auto (forge-parallel's blocks, each stage's)
    compose_run_config([*_AUTO, "parallel.recompute_budget_mib=0"])
    compose_run_config([*_AUTO, "parallel.recompute_budget_mib=8", "parallel=pp2-fsdp"])


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> list[list[float]]:
    """The one-process run without recompute (shared by the module's comparisons)."""
    rows, line = _losses_and_choices(str(tmp_path_factory.mktemp("no-recompute")))
    assert line == ""  # no line without auto
    return rows


def test_one_process_auto_keeps_the_losses_and_logs_a_choice_within_budget(tmp_path, single):
    # The tiny model's 2 blocks keep about 0.3 MiB each without recompute: 0.05 MiB forces a
    # selective policy (or whole children), not nothing and not the whole block.
    auto, line = _losses_and_choices(
        f"{tmp_path}/auto", *_AUTO, "parallel.recompute_budget_mib=0.05"
    )
    assert re.fullmatch(
        r"2 x auto: (selective \(saves \d+ ops, |modules \S+ \()[0-9.]+ MiB\)", line
    )
    assert all(kept <= 0.05 for _, _, kept in _choices(line)), line
    assert auto == single  # exact: recompute replays the same ops


def test_auto_under_tp2_sp_fsdp2_matches_one_process(tmp_path, dist_pool, single):
    """TP2 + SP x FSDP2 on 4 ranks, one budget shared by the 2 blocks (each measured on its
    tensor-parallel shards): the single process's losses and gradient norms."""
    pool = dist_pool(4)
    layout = ("parallel=tp2-fsdp", *_AUTO, "parallel.recompute_budget_scope=total")
    ranks = pool.run(_losses_and_choices, f"{tmp_path}/tp2", *layout,
                     "parallel.recompute_budget_mib=0.2")  # fmt: skip
    rows, line = ranks[0]
    torch.testing.assert_close(torch.tensor(rows), torch.tensor(single), rtol=1e-5, atol=1e-6)
    choices = _choices(line)
    assert sum(n for n, _, _ in choices) == 2, line
    assert not any(c.startswith(("auto: none", "auto: full")) for _, c, _ in choices), line
    # the total, shared out in forward order (each block's MiB printed to 0.005)
    assert sum(n * kept for n, _, kept in choices) <= 0.2 + 0.005 * 2, line
