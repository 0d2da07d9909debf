"""LoRA layouts beyond test_lora_tp.py, each against one process's per-step losses and gradient
norms (the adapters' only: the base stays frozen):

- FP8 (``per_tensor``) base linears inside LoRA layers under TP2 x FSDP2: the adapter style runs
  an ``nn.Linear`` subclass on its DTensor shards (forge_parallel.tp_adapter), so the FP8
  amaxes are reduced over the tensor-parallel ranks as under the layer's own style.
- LoRA dropout 0.1 under TP2 + SP x FSDP2: the masks are keyed by the data
  (forge_train.lora_dropout), so every data-parallel split and micro-batching draws the single
  process's, a column-parallel layer the same on both tensor-parallel ranks and a row-parallel
  layer its features' slice.
- LoRA on a model loaded from a Hugging Face folder (saved by ``transformers``) on the meta
  device, TP2 x FSDP2, against the single process that loads it on the CPU: the adapters drawn
  from the seed after the load alike, the checkpoint read into the LoRA layers' base linears.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from forge_core.testing import import_path

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")

#: LoRA on every attention projection (q/k/v column-, o row-parallel; Qwen2's q/k/v biases)
#: and on the MLP's packed gate_up (``colwise_packed``) and down projection.
_LORA = (
    "recipe=lora",
    "data=stdlib",
    "model.config.family=qwen2",
    "+model.config.attention_bias=true",
    "lora.rank=4",
    "lora.alpha=8",
    "lora.targets=[*.q_proj,*.k_proj,*.v_proj,*.o_proj,*.gate_up_proj,*.down_proj]",
    "optim.weight_decay=0",
)
_RUN = (  # one 2-row micro-batch per data-parallel rank, two in one process
    "data.global_batch_rows=4",
    "data.micro_batch_rows=2",
    "train.steps=2",
    "train.eval_batches=0",
    "checkpoint.interval=0",
    "checkpoint.save_final=false",
    "checkpoint.export_hf=false",
)
_TP2_FSDP2 = ("parallel=tp2-fsdp", "parallel.sequence_parallel=false")


def _rows(output_dir: str, *overrides: str) -> list[list[float]]:
    """Per-step ``[loss, gradient norm]`` (rank 0's; a pool job)."""
    return tiny.train_losses_and_norms(
        *tiny.TINY, *_RUN, *_LORA, f"train.output_dir={output_dir}", *overrides
    )


def _close(
    got: list[list[float]], single: list[list[float]], msg: Callable[[str], str] | None = None
) -> None:
    assert len(single) == 2, single
    torch.testing.assert_close(
        torch.tensor(got), torch.tensor(single), rtol=1e-5, atol=1e-6, msg=msg
    )


def test_fp8_inside_lora_under_tp2_fsdp2_matches_one_process(tmp_path, dist_pool):
    """``lr=1e-5`` as in test_fp8_tp.py: AdamW's first ``lr * sign(grad)`` steps turn a
    last-bit FP8 rounding flip of a near-zero gradient into a visible weight change. Without
    the tensor-parallel amax reduction (the base on plain local shards, each rank its own
    scales) the gradient norms differ by up to 2e-2 relative (one layer, two steps)."""
    fp8 = ("train.fp8=per_tensor", "optim.lr=1e-5", "model.config.num_layers=1")
    single = _rows(f"{tmp_path}/single", *fp8)
    _close(dist_pool(4).run(_rows, f"{tmp_path}/tp2", *fp8, *_TP2_FSDP2)[0], single)


def _transformers_llama(folder: Path) -> None:
    """A tiny Llama saved by ``transformers`` (the default tokenizer's vocabulary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from forge_data import default_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=default_tokenizer().vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    default_tokenizer().save(folder)  # a model folder carries its tokenizer


def _hf_rows(output_dir: str, *overrides: str) -> list[list[float]]:
    """Per-step ``[loss, gradient norm]`` of a LoRA run from a Hugging Face folder (a pool
    job)."""
    lora = [o for o in _LORA if "qwen2" not in o and "attention_bias" not in o]
    return tiny.train_losses_and_norms(
        *tiny.TINY_RUN, *_RUN, *lora, "optim.lr=5e-2", f"train.output_dir={output_dir}",
        *overrides,
    )  # fmt: skip


def test_lora_on_a_meta_loaded_hf_model_matches_the_device_loaded_one(tmp_path, dist_pool):
    """Without seeding the adapters of the CPU-loaded model from ``train.seed`` (they were
    drawn from whatever state the process's generator was in) the gradient norms differ."""
    source = tmp_path / "source"
    _transformers_llama(source)
    hf = ("model=hf", f"model.hf_path={source}")
    single = _hf_rows(f"{tmp_path}/single", *hf, "model.init_device=device")
    assert single[1][0] != single[0][0]
    got = dist_pool(4).run(_hf_rows, f"{tmp_path}/tp2", *hf, "model.init_device=meta", *_TP2_FSDP2)
    _close(got[0], single)


def test_lora_dropout_under_tp2_with_fsdp_pipeline_or_context_parallelism_matches_one_process(
    tmp_path, dist_pool
):
    """The keyed masks under TP2 (+ SP) beside FSDP2, pipeline stages or context-parallel
    shards. Without the row-parallel layers' feature offsets (each rank the mask of the first
    features) the gradient norms differ by up to 0.5 relative. PP2 x TP2 recomputes its
    blocks: under 1F1B the first stage runs micro-batch 1's forward before micro-batch 0's
    backward, so a recomputation reading the latest forward's keys instead of its own
    (:class:`forge_train.lora_dropout.MicrobatchKeys`) gives other gradients. CP2 x TP2 cuts the
    keys as the tokens (zigzag)."""
    dropout = ("lora.dropout=0.1", "optim.lr=5e-2")
    single = _rows(f"{tmp_path}/single", *dropout)
    no_dropout = _rows(f"{tmp_path}/no_dropout", "optim.lr=5e-2", "train.steps=1")
    assert single[0][1] != no_dropout[0][1]  # the masks change the gradients
    pool = dist_pool(4)
    for name, layout in (
        ("tp2", ("parallel=tp2-fsdp", "parallel.sequence_parallel=true")),
        ("pp2_tp2", ("parallel=pp2-fsdp", "parallel.tp=2", "parallel.recompute=full")),
        ("cp2_tp2", ("parallel=cp2-fsdp", "parallel.tp=2", "parallel.sequence_parallel=true")),
    ):
        got = pool.run(_rows, f"{tmp_path}/{name}", *dropout, *layout)[0]
        _close(got, single, msg=lambda detail, name=name: f"{name}: {detail}")


def test_dropout_keys_follow_the_tokens_not_the_layout():
    """A token's key depends on its ``(epoch, doc, offset)`` only, wherever the rows put it;
    a row-parallel rank's mask is its slice of the whole one; about ``p`` is dropped."""
    from forge_train.lora_dropout import dropout_mask, token_keys

    # (row, epoch, doc, start, length): two rows of 6 slots, the first padded by one.
    pieces = torch.tensor([[0, 0, 5, 0, 3], [0, 0, 7, 2, 2], [1, 0, 9, 0, 6]])
    swapped = torch.tensor([[0, 0, 9, 0, 6], [1, 0, 5, 0, 3], [1, 0, 7, 2, 2]])
    keys, other = (token_keys(p, rows=2, seq_len=6) for p in (pieces, swapped))
    assert torch.equal(keys[:6], other[6:])
    assert torch.equal(keys[6:], other[:6])
    assert keys[5] == -1  # padding
    assert len(set(keys.tolist())) == 12  # every token its own key
    # A piece starting later in its document continues the document's keys.
    later = token_keys(torch.tensor([[0, 0, 5, 1, 2]]), rows=1, seq_len=2)
    assert torch.equal(later, keys[1:3])
    mask = {"features": 8, "p": 0.5, "seed": 0, "layer": 1}
    whole = dropout_mask(keys, feature_offset=0, **mask)
    halves = [dropout_mask(keys, feature_offset=o, **{**mask, "features": 4}) for o in (0, 4)]
    assert torch.equal(whole, torch.cat(halves, dim=1))
    assert not torch.equal(whole, dropout_mask(keys, feature_offset=0, **{**mask, "layer": 2}))
    kept = dropout_mask(torch.arange(4096), features=256, feature_offset=0, p=0.1, seed=0, layer=0)
    assert abs(kept.float().mean().item() - 0.9) < 0.005


def test_visual_dropout_keys_follow_the_pixel_blocks_not_the_call():
    """A vision or projector layer's row keys (forge_train.lora_dropout.VisualCall) depend on
    the row's sample block and its place in it only: the same with other blocks before it
    (another micro-batch), in a layer with 4 rows per pixel row (a tile's patches) or 1 per 4
    (a merged patch group); a projector taking the images apart gets the image blocks; a call
    on other pixels (a stand-in image) gets its own block; rows out of proportion are refused."""
    from forge_train.lora_dropout import VisualKeys

    cpu = torch.device("cpu")
    # (stream, epoch, sample, 0, pixel rows): two images, then a video
    both = VisualKeys(torch.tensor([[0, 0, 5, 0, 4], [0, 1, 2, 0, 8], [1, 0, 7, 0, 4]]))
    alone = VisualKeys(torch.tensor([[0, 1, 2, 0, 8]]))
    for per_pixel in (1, 4, 0.25):

        def rows(pixels: int, per_pixel: float = per_pixel) -> int:
            return int(pixels * per_pixel)

        joined = both.call(16, None).row_keys(rows(16), cpu)
        mine = alone.call(8, "image").row_keys(rows(8), cpu)
        assert torch.equal(joined[rows(4) : rows(12)], mine), per_pixel
        assert len(set(joined.tolist())) == rows(16)  # every row its own key
    images = both.call(12, "image").row_keys(12, cpu)
    assert torch.equal(images, both.call(16, None).row_keys(16, cpu)[:12])
    stand_in = both.call(1, "video").row_keys(4, cpu)
    assert not set(stand_in.tolist()) & set(both.call(16, None).row_keys(64, cpu).tolist())
    with pytest.raises(ValueError, match="in proportion"):
        both.call(16, None).row_keys(6, cpu)
