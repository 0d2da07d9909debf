"""``train.compile=true`` under context, expert and tensor parallelism: 2-process runs whose
blocks are compiled regionally (forge_parallel.apply_compile) give the losses and gradient
norms of one compiled process.

- CP2 (ring attention, zigzag) x EP2 on a MoE model (the experts sharded over the two
  context-parallel ranks): the context-parallel attention (its P2P ring exchanges) and the
  expert-parallel dispatch / combine (all-to-alls with data-dependent split sizes) run eagerly
  between compiled graphs (``torch.compiler.disable``); the projections, norms, router and MLPs
  stay compiled.
- A vision-language model with a TP2 language model (sequence parallel) and a data-parallel
  (FSDP2) vision encoder, both compiled.

Two processes, not four: on 2 cores Dynamo's tracing on every rank is most of the time, and
each layout's exchanges already run between two ranks.

The runs use the ``aot_eager`` backend (``train.compile_backend``): Dynamo's tracing, its
graph breaks and AOT autograd's joint graphs as under ``inductor``, without generating
kernels (inductor's code generation took ~3x the CPU time of these runs on 2 cores). Each
run also reports why its compiled blocks broke their graphs: only at a function kept out of
the graph on purpose (ours, or FSDP's hooks), never inside the exchanges.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from forge_core.testing import import_path

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")

_COMPILED = ("train.compile=true", "train.compile_backend=aot_eager")
_RUN = (*tiny.TINY_RUN, *tiny.TWO_STEPS)
#: tiny-moe with a dense first layer and no balance loss (the MoE blocks compile differently).
_MOE = (
    "model=tiny-moe",
    "+model.config.moe.mlp_only_layers=[0]",
    "model.config.moe.output_router_logits=false",
    "model.init_device=meta",
)
#: Qwen2.5-VL tiny (window and full vision attention, M-RoPE), every part trained.
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
    "checkpoint.save_final=false",
)


def _compiled_run(*overrides: str) -> tuple[list[list[float]], int, list[str]]:
    """Per-step ``[loss, gradient norm]`` of a compiled run (rank 0's; ``[]`` on the other
    ranks of a pool job), the number of graphs Dynamo compiled and the reasons of its graph
    breaks."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # a fresh cache and counters in a reused pool worker
    rows = tiny.train_losses_and_norms(*overrides, *_COMPILED)
    return rows, counters["stats"]["unique_graphs"], sorted(counters["graph_break"])


def _text(output_dir: str, *overrides: str):
    return _compiled_run(*_RUN, *_MOE, f"train.output_dir={output_dir}", *overrides)


def _vlm(output_dir: str, *overrides: str):
    return _compiled_run(*_VLM, f"train.output_dir={output_dir}", *overrides)


def _check(ranks: list, single: tuple) -> None:
    """Rank 0's losses and gradient norms are the single process's; every rank compiled its
    blocks and broke their graphs only at functions kept out of them on purpose."""
    torch.testing.assert_close(
        torch.tensor(ranks[0][0]), torch.tensor(single[0]), rtol=1e-5, atol=1e-6
    )
    for _rows, graphs, breaks in ranks:
        assert graphs > 0, "nothing was compiled"
        unplanned = [b for b in breaks if "disable" not in b]
        assert not unplanned, "graph breaks inside the compiled blocks:\n" + "\n".join(unplanned)


def test_compiled_context_and_expert_parallel_match_one_process(tmp_path, dist_pool):
    """CP2 (ring, zigzag) x EP2, compiled, gives the compiled single process's losses
    and gradient norms: the ring attention and the expert all-to-alls run between graphs."""
    single = _text(f"{tmp_path}/single")
    layout = ("parallel=cp2-fsdp", "parallel.ep=2")
    _check(dist_pool(2).run(_text, f"{tmp_path}/cp2_ep2", *layout), single)


def test_compiled_vlm_with_a_tp2_language_model_matches_one_process(tmp_path, dist_pool):
    """A vision-language model with its language model TP2 (sequence parallel) and its vision
    encoder FSDP2, both compiled, gives the compiled single process's losses and
    gradient norms."""
    single = _vlm(f"{tmp_path}/single")
    layout = ("parallel=tp2-fsdp", "parallel.sequence_parallel=true")
    _check(dist_pool(2).run(_vlm, f"{tmp_path}/tp2", *layout), single)


def test_unknown_compile_backend_is_refused(tmp_path):
    from forge_train.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.compile_backend.*not a torch.compile backend"):
        tiny.tiny_config(tmp_path, "train.compile=true", "train.compile_backend=inductr")
