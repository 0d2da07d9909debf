"""The last stage's ``post_forward``, modules ``also_used`` by later stages and a ``carry``
beside the hidden states: pure functions on the tiny decoder, no processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from forge_core.testing import import_path
from forge_parallel.pipeline import PipelineConfig, decoder_layout, split_stages
from forge_parallel.pipeline.tied import find_tied_weights

tm = import_path(Path(__file__).with_name("tiny_models.py"), "forge_parallel_tests_tiny_models")


def test_a_module_also_used_by_the_last_stage_is_tied_to_it():
    model = tm.build_tiny(n_layers=4)
    layout = decoder_layout(model)
    bounds = [(0, 2), (2, 4)]
    assert find_tied_weights(model, layout, bounds) == []  # untied: nothing shared
    (weight,) = find_tied_weights(model, layout, bounds, {"embed": (-1,)})
    assert (weight.name, weight.holder, weight.stages) == ("embed.weight", "embed", (0, 1))
    _, (last,), _, _ = split_stages(
        model, pp=2, pp_rank=1, config=PipelineConfig(), also_used={"embed": (-1,)}
    )
    assert last.get_submodule("embed") is model.embed  # held (never run) under its name
    # with a tied head the embedding is one tied weight, used by both stages
    tied = tm.build_tiny(n_layers=4, tie=True)
    (weight,) = find_tied_weights(tied, decoder_layout(tied), bounds, {"embed": (-1,)})
    assert weight.stages == (0, 1)


def test_post_forward_replaces_the_post_parts_of_the_last_stage_only():
    model = tm.build_tiny(n_layers=2)
    config = PipelineConfig(microbatches=2)
    (_, (first,), _, _), (_, (last,), _, _) = (
        split_stages(model, pp=2, pp_rank=r, config=config) for r in (0, 1)
    )
    calls = []

    def head(stage, hidden, block_args):
        calls.append(stage.microbatch)
        return stage.lm_head(stage.norm(hidden)).sum().reshape(1)

    first.post_forward = last.post_forward = head
    tokens = torch.randint(0, 64, (1, 5))
    hidden = first(tokens)
    assert calls == []  # the first stage has no post-parts
    last.microbatch = 1
    torch.testing.assert_close(last(hidden), model(tokens).sum().reshape(1))
    assert calls == [1]


class _SumOfHidden:
    """A carry summing each stage's hidden-state total (differentiable) along the pipeline;
    the last stage adds it to its output."""

    def start(self, stage, carried, x):
        self.total = carried[0] if carried else torch.zeros(())

    def send(self, stage):
        return (self.total + self._hidden,)

    def finish(self, stage, output):
        return output + self.total + self._hidden

    def __call__(self, path, output, block_args):  # block_output: remember the hidden states
        self._hidden = output.sum()
        return output


def test_a_carry_travels_beside_the_hidden_states_and_its_gradient_back():
    model = tm.build_tiny(n_layers=2)
    config = PipelineConfig(microbatches=2)
    (_, (first,), _, _), (_, (last,), _, _) = (
        split_stages(model, pp=2, pp_rank=r, config=config) for r in (0, 1)
    )
    tokens = torch.randint(0, 64, (1, 5))
    with pytest.raises(ValueError, match="no carry"):
        last(torch.zeros(1, 5, model.embed.embedding_dim), torch.zeros(()))
    carry = _SumOfHidden()
    for stage in (first, last):
        stage.carry = stage.block_output = carry
        stage.in_schedule = True
    hidden, total = first(tokens)
    received = hidden.detach().requires_grad_(), total.detach().requires_grad_()
    out = last(*received)
    # the last stage's output plus both blocks' hidden-state sums; the carried sum's gradient
    sums = []
    for block in model.layers:
        block.register_forward_hook(lambda module, args, output: sums.append(output.sum()))
    logits = model(tokens)
    torch.testing.assert_close(out, logits + sums[0] + sums[1])
    out.sum().backward()
    assert received[1].grad == out.numel()
