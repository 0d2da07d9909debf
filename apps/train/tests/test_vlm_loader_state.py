"""The image-caption loader's state pins what its sample order depends on (seed, seq_len,
global batch, shuffle, the samples): a state taken under other values is refused, a state
taken at another data-parallel size or micro-batch size resumes the same stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forge_train.vlm_data import VLMLoader, VLMSamples


def _samples() -> list[dict]:
    lengths = np.random.default_rng(0).integers(3, 12, 40)
    return [
        {
            "input_ids": list(range(1, int(n) + 1)),
            "loss_mask": [1] * int(n),
            "block_ids": [-1] * int(n),
            "key": f"s{i}",
        }
        for i, n in enumerate(lengths)
    ]


def _loader(*, seed=0, seq_len=32, rows=4, micro=2, dp_rank=0, dp_size=1, samples=None):
    data = VLMSamples(samples or _samples(), seq_len, False)
    return VLMLoader(
        data, global_batch_rows=rows, micro_batch_rows=micro, seed=seed,
        dp_rank=dp_rank, dp_size=dp_size, pad_id=0,
    )  # fmt: skip


def test_state_resumes_the_stream_at_another_dp_and_micro_batch_size():
    straight = _loader()
    for _ in range(3):
        next(straight)
    state = straight.state_dict()
    expected = torch.cat([b["input_ids"].reshape(-1) for b in next(straight)])
    ranks = [_loader(micro=1, dp_rank=r, dp_size=2) for r in range(2)]
    for rank in ranks:
        rank.load_state_dict(state)
    resumed = torch.cat([b["input_ids"].reshape(-1) for r in ranks for b in next(r)])
    assert torch.equal(resumed, expected)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"seed": 1}, "seed=0"),
        ({"seq_len": 16}, "seq_len=32"),
        ({"rows": 8}, "global_batch_rows=4"),
        ({"samples": _samples()[:-1]}, "samples="),
    ],
)
def test_state_of_other_settings_is_refused(change, named):
    state = _loader().state_dict()
    with pytest.raises(ValueError, match=f"cannot resume.*{named}"):
        _loader(**change).load_state_dict(state)
