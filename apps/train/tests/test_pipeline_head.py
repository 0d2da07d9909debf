"""The loss head of a language model's last pipeline stage (forge_train.pipeline_head), in one
process: the stages of a DeepSeek-V3-style model with two multi-token prediction modules,
chained, give the whole model's summed loss and gradients, fused or from the logits, and
record the next-token and each depth's cross-entropy for the step's report; and the layout it
cannot carry is refused before any compute."""

from __future__ import annotations

import pytest
import torch

import forge_models
from forge_parallel.pipeline import PipelineConfig, split_stages
from forge_train.config import ConfigError
from forge_train.pipeline_head import CausalLMLossHead
from forge_train.pipeline_model import check_pipeline_model


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return forge_models.build_model(
        "deepseek-v3-debug", vocab_size=97, num_layers=4, mtp_depth=2, mtp_loss_weight=0.4
    )


@pytest.mark.parametrize("fused", [True, False])
def test_the_stages_with_the_loss_head_compute_the_whole_models_loss(fused):
    """Fused (the linear cross-entropy) and from the logits (what a tensor-parallel or
    zero-bubble last stage computes)."""
    model = _model()
    config = model.config
    ids = torch.randint(0, 97, (1, 12))
    labels = torch.randint(0, 97, (1, 12))
    labels[0, 3] = -100
    batch = {"input_ids": ids, "labels": labels, "cu_seqlens": torch.tensor([0, 5, 12])}
    expected = model(**batch, loss_reduction="sum", output_router_logits=False)
    parts = torch.stack([model.main_loss, *model.mtp_losses])  # next-token, depth 1, depth 2
    expected.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    pipeline = PipelineConfig(microbatches=2)
    also = {"embed_tokens": (-1,)}
    (_, (first,), _, _), (_, (last,), _, _) = (
        split_stages(model, pp=2, pp_rank=r, config=pipeline, also_used=also) for r in (0, 1)
    )
    assert "embed_tokens.weight" in dict(last.named_parameters())  # for the MTP modules
    head = CausalLMLossHead(config, fused=fused)
    last.post_forward = head
    inputs = model.attention_inputs(ids, cu_seqlens=batch["cu_seqlens"])
    for stage in (first, last):
        stage.set_block_args([(inputs,)])
    head.load([batch])
    last.in_schedule = True  # as the schedule sets it: the head records this micro-batch
    loss = last(first(ids))
    torch.testing.assert_close(loss, expected.reshape(1))
    # The step reports the next-token cross-entropy and the depths' as the head took them
    # (not the loss less the weighted depths): fused, the model's own computation bit for bit.
    sums = head.sums(torch.device("cpu"))
    if fused:
        assert torch.equal(sums, parts), (sums, parts)
    else:
        torch.testing.assert_close(sums, parts)
    loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for name, grad in want.items():  # one model: the embedding's two uses already summed
        torch.testing.assert_close(got[name], grad, msg=name)
    head.load(None)
    with pytest.raises(RuntimeError, match="no targets for micro-batch 0"):
        last(first(ids))


def test_zbv_with_multi_token_prediction_is_refused():
    """ZB-V puts the first and the last stage, which both hold the embedding, on one rank;
    tensor parallelism and the zero-bubble schedule are allowed."""
    model = _model()
    with pytest.raises(ConfigError, match="embedding the multi-token prediction modules share"):
        check_pipeline_model(model, model.config, pp=2, virtual_stages=2, schedule="zbv")
    check_pipeline_model(model, model.config, pp=2, tp=2, schedule="zero_bubble")
