"""Pipeline parallelism for vision-language models with the encoder decoupled from the pipeline
(forge_train.vlm_pipeline): the encoder-work assignment, the layouts refused, and a 4-process
PP2 x FSDP2 run of the Qwen2.5-VL preset (vision frozen, projector trained through the feature
exchange, M-RoPE positions and image blocks as block arguments) against one process: the same
losses, its checkpoint resumed in one process, and the same Hugging Face export."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from forge_core.testing import import_path
from forge_train.config import ConfigError, ParallelSettings
from forge_train.vlm_pipeline import assign_encoder_work, check_vlm_pipeline

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")


def test_encoder_work_goes_largest_first_to_the_least_loaded_rank():
    # 7 -> rank 1 (ties to the highest rank), 5 -> rank 0, 3 -> rank 0 (load 5 < 7)
    assert assign_encoder_work([3, 7, 5], 2) == [0, 1, 0]
    assert assign_encoder_work([4, 4, 4, 4], 4) == [3, 2, 1, 0]
    # micro-batches without images stay on rank 0, which needs no features for them
    assert assign_encoder_work([0, 2, 0], 2) == [0, 1, 0]


def _text(*, frozen=(), **fields):
    base = {"num_layers": 2, "moe": None, "mtp_depth": 0, "tie_word_embeddings": False}
    return SimpleNamespace(text=SimpleNamespace(**{**base, **fields}), frozen=list(frozen))


@pytest.mark.parametrize(
    ("text", "parallel", "message"),
    [
        ({"tie_word_embeddings": True}, {}, "tie_word_embeddings=false"),
        ({"num_layers": 1}, {}, "at least 2 language model layers"),
        ({}, {"pp_schedule": "zero_bubble", "data_parallel": None}, "zero_bubble"),
        ({"frozen": ["language_model"]}, {}, "nothing to train"),
    ],
)
def test_layouts_not_carried_yet_are_refused(text, parallel, message):
    settings = ParallelSettings(**{"pp": 2, "dp_shard": -1, "data_parallel": "fsdp", **parallel})
    with pytest.raises(ConfigError, match=message):
        check_vlm_pipeline(_text(**text), settings)
    check_vlm_pipeline(_text(), ParallelSettings(pp=2, dp_shard=-1, data_parallel="fsdp"))


#: Qwen2.5-VL tiny, untied (the embedding runs ahead of the pipeline, the head on the last
#: stage), two micro-batches per data-parallel rank; vision frozen as in recipe=vlm.
_RUN = (
    "recipe=vlm",
    "model=qwen2_5-vl-tiny",
    "+model.config.text.tie_word_embeddings=false",
    "data.global_batch_rows=8",
    "data.micro_batch_rows=2",
    "train.steps=2",
    "train.eval_batches=0",
    "optim.warmup_steps=1",
    "logging.progress=plain",
    "logging.tensorboard=false",
)


def _vlm_losses(root: str, name: str, *overrides: str) -> list[float]:
    """Losses of the tiny VLM run (also a worker-pool job: every rank runs it)."""
    return tiny.train_losses(*_RUN, f"train.output_dir={root}/{name}", *overrides)


def test_vlm_pp2_fsdp2_matches_one_process(tmp_path, dist_pool):
    pytest.importorskip("skimage")
    from safetensors.torch import load_file

    root = str(tmp_path)
    export = "checkpoint.export_hf=true"
    single = _vlm_losses(root, "single", export)
    ranks = dist_pool(4).run(
        _vlm_losses, root, "pp2", "parallel=pp2-fsdp", "checkpoint.interval=1", export
    )
    assert all(r == ranks[0] for r in ranks), ranks  # every rank reports the global loss
    torch.testing.assert_close(torch.tensor(ranks[0]), torch.tensor(single), rtol=1e-5, atol=0)
    # The export gathers the stages and pipeline rank 0's encoder: the single process's weights
    # (the frozen vision tower's included). Adam turns float noise in near-zero gradients
    # (e.g. the key biases', which attention cancels) into ~1e-6 weight differences.
    ours = load_file(tmp_path / "pp2" / "hf" / "model.safetensors")
    theirs = load_file(tmp_path / "single" / "hf" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-5, msg=key)
    # The pipeline's step-1 checkpoint resumes in one process with the pipeline's step-2 loss.
    resumed = tmp_path / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    shutil.copytree(tmp_path / "pp2" / "checkpoints" / "step_00000001", resumed / "step_00000001")
    last = _vlm_losses(root, "resumed")
    torch.testing.assert_close(torch.tensor(last), torch.tensor(ranks[0][1:]), rtol=1e-5, atol=0)
