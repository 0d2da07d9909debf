"""Pipeline parallelism for vision-language models with the encoder decoupled from the pipeline
(forge_train.vlm_pipeline): the encoder-work assignment, the layouts refused, and 4-process
runs of the Qwen2.5-VL preset (every part trained, the encoders through the feature exchange;
M-RoPE positions and image blocks as block arguments; the token embedding ahead of the
pipeline tied to the head on the last stage) against one process: PP2 x FSDP2 (1F1B) with the
same losses, its checkpoint resumed in one process and the same Hugging Face export; TP2 with
sequence parallelism x PP2 on virtual stages (interleaved 1F1B); PP2 x CP2 zero bubble; and
one PP2 x FSDP2 step whose micro-batches are partly text-only (the encoder runs on the stand-in
image, and every pipeline rank encodes as many micro-batches on each data-parallel rank)."""

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
    # 7 -> rank 1 (ties to the highest rank), 5 -> rank 0, 3 -> rank 1 (rank 0 has room for one)
    assert assign_encoder_work([3, 7, 5], 2) == [1, 1, 0]
    assert assign_encoder_work([4, 4, 4, 4], 4) == [3, 2, 1, 0]
    # micro-batches without images stay on rank 0, which needs no features for them
    assert assign_encoder_work([0, 2, 0], 2) == [0, 1, 0]


def _text(*, frozen=(), **fields):
    base = {"num_layers": 2, "moe": None, "mtp_depth": 0, "tie_word_embeddings": False}
    return SimpleNamespace(text=SimpleNamespace(**{**base, **fields}), frozen=list(frozen))


@pytest.mark.parametrize(
    ("text", "parallel", "message"),
    [
        ({"num_layers": 1}, {}, "at least 2 language model layers"),
        (
            {"tie_word_embeddings": True},
            {"pp_schedule": "zbv", "pp_virtual_stages": 2},
            "zbv places the first",
        ),
    ],
)
def test_layouts_not_carried_yet_are_refused(text, parallel, message):
    settings = ParallelSettings(**{"pp": 2, "dp_shard": -1, "data_parallel": "fsdp", **parallel})
    with pytest.raises(ConfigError, match=message):
        check_vlm_pipeline(_text(**text), settings)
    fine = ParallelSettings(pp=2, dp_shard=-1, data_parallel="fsdp")
    check_vlm_pipeline(_text(), fine)
    check_vlm_pipeline(_text(tie_word_embeddings=True), fine)  # the head tied across stages
    check_vlm_pipeline(_text(moe=SimpleNamespace()), fine)  # forge_train.pipeline_moe
    tp = ParallelSettings(pp=2, tp=2, dp_shard=-1, data_parallel="fsdp")
    check_vlm_pipeline(_text(moe=SimpleNamespace()), tp)  # MoE blocks whole on the tp ranks
    check_vlm_pipeline(_text(frozen=["language_model"]), fine)  # its stages train nothing


#: Qwen2.5-VL tiny with 4 language model layers (4 virtual stages at PP2), its embedding
#: tied to the head, every part trained; two micro-batches per data-parallel rank.
_RUN = (
    "recipe=vlm",
    "model=qwen2_5-vl-tiny",
    "+model.config.text.num_layers=4",
    "train.freeze=[]",
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


def _close(ranks: list[list[float]], single: list[float]) -> None:
    assert all(r == ranks[0] for r in ranks), ranks  # every rank reports the global loss
    torch.testing.assert_close(torch.tensor(ranks[0]), torch.tensor(single), rtol=1e-5, atol=0)


def test_vlm_pipeline_layouts_match_one_process(tmp_path, dist_pool):
    pytest.importorskip("skimage")
    from safetensors.torch import load_file

    root = str(tmp_path)
    export = "checkpoint.export_hf=true"
    single = _vlm_losses(root, "single", export)
    pool = dist_pool(4)
    ranks = pool.run(_vlm_losses, root, "pp2", "parallel=pp2-fsdp", "checkpoint.interval=1", export)
    _close(ranks, single)
    tp_virtual = (
        "parallel.tp=2",
        "parallel.sequence_parallel=true",
        "parallel.pp_virtual_stages=2",
    )
    interleaved = pool.run(
        _vlm_losses, root, "tp2", "parallel=pp2-fsdp", *tp_virtual,
        "parallel.pp_schedule=interleaved_1f1b",
    )  # fmt: skip
    _close(interleaved, single)
    # Zero bubble x CP2: each context-parallel rank embeds the whole rows, stage 0 takes its
    # positions; the embedding's gradient goes back through them (forge_train.vlm_pipeline).
    zero_bubble = pool.run(
        _vlm_losses, root, "zb", "parallel=pp2-fsdp", "parallel.pp_schedule=zero_bubble",
        "parallel.cp=2",
    )  # fmt: skip
    _close(zero_bubble, single)
    # Text-only micro-batches: one step on a fixed batch, data-parallel rank 1's mostly text.
    mixed = _mixed_step(root, "mixed-single")
    for rank in pool.run(_mixed_step, root, "mixed-pp2", "parallel=pp2-fsdp"):
        torch.testing.assert_close(torch.tensor(rank), torch.tensor(mixed), rtol=1e-5, atol=1e-6)
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


def _text_only(sample: dict) -> dict:
    """``sample``'s caption alone: the tokens after its image (and the image's end token)."""
    start = int((sample["block_ids"] >= 0).nonzero().max()) + 2
    ids = sample["input_ids"][start:]
    return {
        "key": f"{sample['key']}-text",
        "input_ids": ids,
        "loss_mask": sample["loss_mask"][start:],
        "block_ids": torch.full_like(ids, -1),
    }


def _mixed_step(root: str, name: str, *layout: str) -> list[float]:
    """``[loss, gradient norm]`` of one step on a fixed global batch of 6 one-row micro-batches:
    4 of 24-patch images, then 2 text-only ones (a caption without its image), which run the
    encoder on the 16-patch stand-in image (``dummy_visual``). At dp 2 each data-parallel rank
    takes 3: by cost alone rank 0's would be encoded 1 + 2 over the pipeline ranks and rank
    1's 2 + 1 (FSDP's all-gathers of the encoder unpaired: a hang), and without the stand-ins
    rank 1 would encode 1 + 0 (gloo's "Received data size doesn't match expected size").
    Also a pool job."""
    from forge_train.loop import Trainer
    from forge_train.vlm_data import collate_micro_batches

    cfg = tiny.compose_run_config(
        [*_RUN, f"train.output_dir={root}/{name}", "data.global_batch_rows=6",
         "data.micro_batch_rows=1", *layout]
    )  # fmt: skip
    trainer = Trainer(cfg)
    try:
        with tiny.reference_kernels():
            trainer._build()
            parts = trainer.parts
            data = parts.data.train
            s = data.samples
            rows = [s[2], s[3], s[4], s[5], _text_only(s[0]), _text_only(s[1])]
            batches = collate_micro_batches(
                [[r] for r in rows], data, micro_batch_rows=1, pad_id=parts.pad_id
            )
            assert ["dummy_visual" in b for b in batches] == [False] * 4 + [True] * 2
            per = len(batches) // parts.dp_size
            mine = batches[parts.dp_rank * per : (parts.dp_rank + 1) * per]
            loss, grad_norm, _ = trainer.runner.run(0, mine)
    finally:
        trainer.close()
    return [float(loss), float(grad_norm)]
