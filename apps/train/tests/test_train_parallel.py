"""4-process layouts of the tiny run against one process (issue 8's acceptance): tensor x data
parallel (TP2 x FSDP2) and pipeline x data parallel (PP2 x FSDP2, the tied embedding and head
on the first and the last stage) give the single-process losses, and a checkpoint saved by the
pipeline run resumes in one process with the losses the pipeline run went on to have."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from forge_core.testing import import_path

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")

#: Two micro-batches per data-parallel rank (the pipeline's micro-batches), tiny steps.
_RUN = (
    "data.global_batch_rows=8",
    "data.micro_batch_rows=2",
    "train.steps=4",
    "train.eval_batches=0",
    "checkpoint.export_hf=false",
)


def _losses(root: str, name: str, *overrides: str) -> list[float]:
    return tiny.run_losses(f"{root}/{name}", *_RUN, *overrides)


def _close(ranks: list[list[float]], single: list[float]) -> None:
    assert all(r == ranks[0] for r in ranks), ranks  # every rank reports the global loss
    torch.testing.assert_close(torch.tensor(ranks[0]), torch.tensor(single), rtol=1e-5, atol=1e-5)


def test_tp2_fsdp2_and_pp2_fsdp2_match_one_process(tmp_path, dist_pool):
    """Both layouts build the model on the meta device and initialize their shards and stages
    after parallelization: they draw the weights one process draws (forge_models.init)."""
    pool = dist_pool(4)
    root = str(tmp_path)
    # The output layer padded to 8256 rows: no layout may count the padding columns' logits.
    pad = "+model.config.vocab_pad_multiple=96"
    single = _losses(root, "single", "model.init_device=device", pad)  # tied embedding and head
    meta = ("model.init_device=meta", pad)
    _close(pool.run(_losses, root, "tp2", "parallel=tp2-fsdp", *meta), single)
    # PP2 x TP2 (+ sequence parallel): the last stage keeps the logits sharded by vocabulary
    # and the loss is the vocabulary-parallel cross-entropy.
    pp_tp = ("parallel=pp2-fsdp", "parallel.tp=2", "parallel.sequence_parallel=true")
    _close(pool.run(_losses, root, "pp2_tp2", *pp_tp, *meta), single)
    pipeline = pool.run(_losses, root, "pp2", "parallel=pp2-fsdp", *meta, "checkpoint.interval=2")
    _close(pipeline, single)
    # Resume the pipeline run's step-2 checkpoint (PP2 x FSDP2) in one process.
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(
        tmp_path / "pp2" / "checkpoints" / "step_00000002", resumed_dir / "step_00000002"
    )
    resumed = _losses(root, "resumed", pad)
    torch.testing.assert_close(
        torch.tensor(resumed), torch.tensor(pipeline[0][2:]), rtol=1e-5, atol=1e-5
    )


def _run_metrics(root: str, name: str, *overrides: str) -> list[list[float]]:
    """Per-step ``[loss, gradient norm]`` of the tiny run (a pool job: rank 0's are the run's)."""
    return tiny.train_losses_and_norms(
        *tiny.TINY, *_RUN, f"train.output_dir={root}/{name}", *overrides
    )


def test_pp2_with_ddp_zero1_and_zero2_on_the_stages_matches_one_process(tmp_path, dist_pool):
    """PP2 x DP2 with DDP (FSDP2's replicate), ZeRO-1 and ZeRO-2 on the stages (Megatron-LM's
    PP x distributed optimizer) give the single process's losses and gradient norms; the tied
    embedding and head are summed over the first and last stage before the ZeRO optimizer
    reduces them over the data-parallel ranks (ZeRO-2 at the step, its other buckets after
    each micro-batch). A PP2 x ZeRO-1 checkpoint resumes in one process. (PP2 x HSDP needs 8
    ranks: forge-parallel's test_pipeline covers it.)"""
    pool = dist_pool(4)
    root = str(tmp_path)
    single = _run_metrics(root, "single")
    pp2 = ("parallel=pp2-fsdp", "model.init_device=meta")

    def close(ranks: list[list[list[float]]]) -> None:
        torch.testing.assert_close(
            torch.tensor(ranks[0]), torch.tensor(single), rtol=1e-5, atol=1e-6
        )

    ddp = ("parallel.data_parallel=ddp", "parallel.dp_replicate=2", "parallel.dp_shard=1")
    close(pool.run(_run_metrics, root, "ddp", *pp2, *ddp))
    close(pool.run(_run_metrics, root, "zero2", *pp2, "parallel.data_parallel=zero2"))
    zero1 = ("parallel.data_parallel=zero1", "checkpoint.interval=2")
    pipeline = pool.run(_run_metrics, root, "zero1", *pp2, *zero1)
    close(pipeline)
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(
        tmp_path / "zero1" / "checkpoints" / "step_00000002", resumed_dir / "step_00000002"
    )
    resumed = _run_metrics(root, "resumed")
    torch.testing.assert_close(
        torch.tensor(resumed), torch.tensor(pipeline[0][2:]), rtol=1e-5, atol=1e-6
    )


def _transformers_llama(folder: Path) -> None:
    """A tiny Llama saved by ``transformers`` itself (tied embedding and head, safetensors),
    with the default tokenizer's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from forge_data import default_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=default_tokenizer().vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    default_tokenizer().save(folder)  # a model folder carries its tokenizer


def _model_losses(output_dir: str, *overrides: str) -> list[float]:
    """Losses of a tiny run of the model the overrides name (a pool job)."""
    return tiny.train_losses(*tiny.TINY_RUN, f"train.output_dir={output_dir}", *overrides)


def test_continued_pretraining_from_a_transformers_folder_under_pp2(tmp_path, dist_pool):
    """``recipe=continued`` from a folder ``transformers`` wrote: one process (loaded on the
    CPU) and PP2 x FSDP2 with two virtual stages per rank (interleaved 1F1B) built on the meta
    device, each rank reading only its stages' slices of the checkpoint, give the same losses;
    the export loads back into ``transformers``."""
    from transformers import LlamaForCausalLM

    source = tmp_path / "source"
    _transformers_llama(source)
    root = str(tmp_path)
    continued = ("recipe=continued", f"model.hf_path={source}", "optim.lr=1e-2")
    single = _model_losses(f"{root}/single", *_RUN[:-1], *continued, "model.init_device=device")
    assert single[0] > single[-1]
    pipeline = dist_pool(4).run(
        _model_losses,
        f"{root}/pp2",
        *_RUN,
        *continued,
        "parallel=pp2-fsdp",
        "parallel.pp_schedule=interleaved_1f1b",  # 2 stages per rank: layers 0, 2 and 1, 3
        "parallel.pp_virtual_stages=2",
        "model.init_device=meta",
    )
    _close(pipeline, single)
    exported = LlamaForCausalLM.from_pretrained(tmp_path / "single" / "hf")
    assert exported.config.tie_word_embeddings
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()


#: Two steps of the tiny run (tied embedding and head) with 2 micro-batches per rank.
_SHORT = (*_RUN[:2], "train.steps=2", *_RUN[3:])


def test_multi_token_prediction_under_pp2_fsdp2(tmp_path, dist_pool):
    """A multi-token prediction module on the last stage embeds the shifted ids with that
    stage's copy of the first stage's embedding (here also the tied head): PP2 x FSDP2 gives
    the single-process losses, to which the module's loss counts; TP2 + SP x FSDP2 its losses
    and gradient norms."""
    root = str(tmp_path)
    mtp = ("+model.config.mtp_depth=1", "+model.config.mtp_loss_weight=0.5")
    single = tiny.run_losses(f"{root}/single", *_SHORT, *mtp)
    # The logged loss is the main cross-entropy alone, about ln(vocab) (the module's, about
    # as large, is logged apart as mtp_1_loss and weighted into the gradient only).
    assert abs(single[0] - math.log(8192)) < 0.2 * math.log(8192)
    pipeline = dist_pool(4).run(tiny.run_losses, f"{root}/pp2", *_SHORT, *mtp, "parallel=pp2-fsdp")
    _close(pipeline, single)
    # TP2 + SP x FSDP2: the module split like a decoder layer on each rank's sequence shard
    # (its norms, eh_proj replicated with the gradient summed over tp, its block's plan).
    run = (*tiny.TINY, *_SHORT, *mtp)
    single = tiny.train_losses_and_norms(*run, f"train.output_dir={root}/single_norms")
    ranks = dist_pool(4).run(
        tiny.train_losses_and_norms, *run, f"train.output_dir={root}/tp2_sp", "parallel=tp2-fsdp"
    )
    torch.testing.assert_close(torch.tensor(ranks[0]), torch.tensor(single), rtol=1e-5, atol=1e-6)


#: DeepSeek-V3-style MoE (a dense first layer, then MoE layers with expert-bias balancing)
#: with its sequence-wise balance loss on, weighted so that it moves the losses, and a
#: multi-token prediction module (whose block is a MoE block too).
_MOE = (
    "model=tiny-deepseek",
    "model.config.num_layers=4",
    "+model.config.moe.output_router_logits=true",
    "model.config.moe.router_aux_loss_coef=0.5",
    "+model.config.mtp_depth=1",
)


def test_moe_with_balance_loss_and_expert_bias_under_pp2_fsdp2(tmp_path, dist_pool):
    """Each stage adds its MoE layers' balance-loss gradient and updates their expert biases
    from the data-parallel load, the prediction module's MoE block on the last stage too, which
    holds a copy of the (untied) embedding for it: PP2 x FSDP2 gives the single-process
    losses."""
    root = str(tmp_path)
    single = _model_losses(f"{root}/single", *_RUN, *_MOE)
    pipeline = dist_pool(4).run(_model_losses, f"{root}/pp2", *_RUN, *_MOE, "parallel=pp2-fsdp")
    _close(pipeline, single)


#: Qwen3-MoE-style MoE with a dense first layer, the switch balance loss weighted 0.5 and
#: expert-bias balancing.
_TP_MOE = (
    "model=tiny-moe",
    "+model.config.moe.mlp_only_layers=[0]",
    "model.config.moe.router_aux_loss_coef=0.5",
    "+model.config.moe.expert_bias=true",
)


def test_moe_under_tp2_fsdp2(tmp_path, dist_pool):
    """Tensor parallelism on a MoE model: attention and the dense layer split, each MoE layer
    whole on every tensor-parallel rank (forge_train.components._text_plan), the balance loss
    added from the logits path. TP2 x FSDP2, with and without sequence parallelism, gives the
    single-process losses and gradient norms, and so does PP2 x TP2 + SP."""
    root = str(tmp_path)
    single = _losses_and_norms(f"{root}/single", *_SHORT, *_TP_MOE)
    pool = dist_pool(4)
    # Losses and gradient norms: Qwen3's per-head q_norm / k_norm gradients, summed over the
    # tensor-parallel ranks (replicate_partial), were 67% off and moved the losses only 2e-5.
    # With sequence parallelism each rank runs the MoE layers on its own sequence shard and the
    # switch loss and the expert load are summed over the ranks (forge_train.sharded_routing).
    # PP2 x TP2 + SP: the last stage sums the carried switch-loss sums over the tensor-parallel
    # ranks, the MoE stage its expert load (forge_train.pipeline_moe).
    pp_tp = ("parallel=pp2-fsdp", "parallel.tp=2", "parallel.sequence_parallel=true")
    for name, layout in (
        ("tp2", ("parallel=tp2-fsdp", "parallel.sequence_parallel=false")),
        ("tp2_sp", ("parallel=tp2-fsdp", "parallel.sequence_parallel=true")),
        ("pp2_tp2_sp", pp_tp),
    ):
        ranks = pool.run(_losses_and_norms, f"{root}/{name}", *_SHORT, *_TP_MOE, *layout)
        torch.testing.assert_close(
            torch.tensor(ranks[0]), torch.tensor(single), rtol=1e-5, atol=1e-6
        )


#: A short ``recipe=vlm`` run with every part trained.
_VLM = (
    "recipe=vlm",
    "train.freeze=[]",
    "train.steps=3",
    "train.eval_batches=0",
    "data.global_batch_rows=4",
    "data.micro_batch_rows=2",
    "logging.progress=plain",
    "logging.tensorboard=false",
)


def _vlm_losses(output_dir: str, *overrides: str) -> list[float]:
    """Losses of the ``_VLM`` run (a pool job)."""
    return tiny.train_losses(*_VLM, f"train.output_dir={output_dir}", *overrides)


def test_vlm_with_a_tp2_language_model_and_a_data_parallel_encoder(tmp_path, dist_pool):
    """Heterogeneous layout in one job: the language model TP2 (sequence parallel, the visual
    features scattered before the sequence is split) x FSDP2, the vision encoder and projector
    FSDP over all 4 ranks, gives the single-process losses."""
    root = str(tmp_path)
    single = _vlm_losses(f"{root}/single")
    layout = ("parallel=tp2-fsdp", "parallel.sequence_parallel=true")
    _close(dist_pool(4).run(_vlm_losses, f"{root}/tp2", *layout), single)


def _losses_and_norms(output_dir: str, *overrides: str) -> list[list[float]]:
    """Per-step ``[loss, grad norm]`` of a tiny run (a pool job; rank 0's are the run's)."""
    return tiny.train_losses_and_norms(*tiny.TINY_RUN, f"train.output_dir={output_dir}", *overrides)


#: DeepSeek-V3-style: multi-head latent attention, a dense first layer, MoE with expert bias.
_MLA = ("model=tiny-deepseek", "model.init_device=meta", *_SHORT)
_MLA_MTP = (
    "+model.config.mtp_depth=1",
    "+model.config.moe.output_router_logits=true",
    "model.config.moe.router_aux_loss_coef=0.5",
)


def test_multi_head_latent_attention_under_tp2_fsdp2(tmp_path, dist_pool):
    """MLA split over heads: the latent down-projections replicated on the whole sequence
    (``gathered_input``), the rotary key every head reads with its gradient summed over the
    tensor-parallel ranks (``reduce_grad``). TP2 x FSDP2 (with a multi-token prediction module,
    unsplit, its logits through the tensor-parallel head), and TP2 + SP x FSDP2 (the module
    split like a decoder layer on sequence shards, expert bias; also with the sequence-wise
    balance loss, its per-document sums summed over tp), give the single process's
    losses and gradient norms (a missing reduction of
    the rotary key's gradient moves the norm first: Adam hides it in the loss)."""
    pool = dist_pool(4)
    singles: dict[tuple[str, ...], list[list[float]]] = {}
    for name, extra, layout in (
        # with a multi-token prediction module and the sequence-wise balance loss weighted 0.5
        ("tp2", _MLA_MTP, ("parallel.sequence_parallel=false",)),
        # sequence parallel, the multi-token prediction module split like a decoder layer on
        # the rank's sequence shard, its MoE block's expert load summed over tp
        ("tp2_sp", ("+model.config.mtp_depth=1",), ("parallel.sequence_parallel=true",)),
        # ... and the sequence-wise balance loss of every MoE block (the module's too) from
        # each rank's per-document sums of its contiguous chunk, summed over tp
        ("tp2_sp_balance", _MLA_MTP, ("parallel.sequence_parallel=true",)),
        # ... also on 2 pipeline stages x TP2 + SP, each stage's MoE blocks summing their sums
        # over tp, the module on the last stage (its loss from the stage's head's logits)
        ("pp2_tp2_sp_balance", _MLA_MTP, ("parallel.sequence_parallel=true", "parallel.pp=2")),
    ):
        if extra not in singles:
            singles[extra] = _losses_and_norms(f"{tmp_path}/single_{name}", *_MLA, *extra)
        single = singles[extra]
        ranks = pool.run(
            _losses_and_norms, f"{tmp_path}/{name}", *_MLA, *extra, "parallel=tp2-fsdp", *layout
        )
        torch.testing.assert_close(
            torch.tensor(ranks[0]), torch.tensor(single), rtol=1e-5, atol=1e-6
        )
