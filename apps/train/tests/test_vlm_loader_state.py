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


def _with_images(samples: list[dict]) -> list[dict]:
    """``samples`` with an image on every third one (a placeholder token, 2 to 4 pixel rows)."""
    out = []
    for i, s in enumerate(samples):
        s = dict(s)
        if i % 3 == 0:
            rows = 2 + i % 3 + (i // 3) % 3
            s["block_ids"] = [0, *s["block_ids"][1:]]
            s["visual"] = {
                "image": {"pixel_values": torch.full((rows, 3), float(i))},
                "num_tokens": torch.tensor([1]),
                "encoder_seqlens": torch.tensor([rows]),
            }
        out.append(s)
    return out


def _keys_by_sample(batches: list[dict]) -> dict:
    """``(epoch, sample) -> its tokens' dropout keys`` and ``(stream, epoch, sample) -> the
    keys of its pixel block's rows in a layer with 4 rows per pixel row``, over ``batches``."""
    from forge_train.lora_dropout import VisualKeys, token_keys

    out = {}
    for batch in batches:
        rows, seq_len = batch["input_ids"].shape
        keys = token_keys(batch["pieces"], rows=rows, seq_len=seq_len)
        placed: dict[int, int] = {}  # a sample's slots follow those of its row's samples before it
        for row, epoch, doc, _, length in batch["pieces"].tolist():
            t = row * seq_len + placed.get(row, 0)
            out[(epoch, doc)] = keys[t : t + length]
            placed[row] = placed.get(row, 0) + length
        visual = VisualKeys(batch["visual_pieces"])
        pixel_rows = int(batch["visual_pieces"][:, 4].sum())
        if pixel_rows:
            layer = visual.call(pixel_rows, "image").row_keys(4 * pixel_rows, torch.device("cpu"))
            for block, part in zip(
                batch["visual_pieces"].tolist(),
                layer.split((4 * batch["visual_pieces"][:, 4]).tolist()),
                strict=True,
            ):
                out[tuple(block[:3])] = part
    return out


def test_dropout_keys_of_a_sample_are_the_same_however_the_batch_is_split():
    """A sample's LoRA dropout keys (its tokens', its image rows') follow the sample, not where
    a step puts it: one process with 2-row micro-batches, and 2 data-parallel ranks with 1-row
    micro-batches resumed from its state, key every sample alike (forge_train.lora_dropout)."""
    samples = _with_images(_samples())
    straight = _loader(samples=samples)
    whole = {}
    for _ in range(12):  # past epochs: the epoch is part of a sample's identity
        whole.update(_keys_by_sample(next(straight)))
    state = straight.state_dict()
    later = _keys_by_sample(next(straight))
    ranks = [_loader(samples=samples, micro=1, dp_rank=r, dp_size=2) for r in range(2)]
    split = {}
    for _ in range(12):
        for rank in ranks:
            split.update(_keys_by_sample(next(rank)))
    assert split.keys() == whole.keys()
    assert len({k[0] for k in whole if len(k) == 2}) > 1  # several epochs
    assert any(len(k) == 3 for k in whole)  # image blocks
    for key, value in whole.items():
        assert torch.equal(split[key], value), key
    for rank in ranks:
        rank.load_state_dict(state)
    resumed = {k: v for rank in ranks for k, v in _keys_by_sample(next(rank)).items()}
    assert resumed.keys() == later.keys()
    for key, value in later.items():
        assert torch.equal(resumed[key], value), key
    # the same sample in another epoch gets other keys
    epoch0, epoch1 = whole[(0, 0)], whole[(1, 0)]
    assert not torch.equal(epoch0, epoch1)
