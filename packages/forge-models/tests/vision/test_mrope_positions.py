"""``mrope_position_ids`` against transformers' ``Qwen2_5_VLModel.get_rope_index``.

The reference runs on a tiny ``Qwen2_5_VLModel`` (random weights, nothing downloaded; only its
``get_rope_index`` is used). Token streams are laid out as the Qwen2.5-VL processor writes them:
``<vision_start> <pad> * tokens <vision_end>`` per image or video.
"""

from __future__ import annotations

import pytest
import torch

from forge_models.vlm.mrope import mrope_position_ids

IMAGE, VIDEO, START, END = 90, 91, 92, 93
MERGE = 2
TOKENS_PER_SECOND = 2


@pytest.fixture(scope="module")
def reference():
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": 100,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1]},
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 16,
            "spatial_merge_size": MERGE,
            "tokens_per_second": TOKENS_PER_SECOND,
        },
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=START,
    )
    model = Qwen2_5_VLModel(config).eval()

    def rope_index(input_ids, attention_mask=None, **grids):
        token_type = (input_ids == IMAGE).int() + 2 * (input_ids == VIDEO).int()
        return model.get_rope_index(
            input_ids, mm_token_type_ids=token_type, attention_mask=attention_mask, **grids
        )

    return rope_index


def ours(input_ids, **kwargs):
    return mrope_position_ids(
        input_ids,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=START,
        spatial_merge_size=MERGE,
        tokens_per_second=TOKENS_PER_SECOND,
        **kwargs,
    )


def stream(*parts, seed: int = 0) -> list[int]:
    """Token ids: an int part is that many text tokens, ``(kind, grid)`` one image/video."""
    gen = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    for part in parts:
        if isinstance(part, int):
            ids += torch.randint(1, 80, (part,), generator=gen).tolist()
        else:
            kind, (t, h, w) = part
            ids += [START] + [IMAGE if kind == "image" else VIDEO] * (t * h * w // MERGE**2) + [END]
    return ids


def assert_same(got, expected):
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype
        assert a.shape == b.shape
        assert torch.equal(a, b), (a, b)


def test_text_only(reference):
    ids = torch.tensor([stream(12, seed=1), stream(12, seed=2)])
    assert_same(ours(ids), reference(ids))


def test_images_and_videos_in_one_batch(reference):
    # Row 0's video has temporal positions (0, 3, 6) beyond its spatial extent; row 1's step
    # 0.5 rounds down; images of three sizes.
    row0 = stream(
        5, ("image", (1, 4, 6)), 3, ("video", (3, 4, 4)), 4, ("image", (1, 2, 2)), 2, seed=3
    )
    row1 = stream(3, ("video", (2, 6, 2)), 6, ("image", (1, 8, 4)), seed=4)
    row1 += stream(len(row0) - len(row1), seed=5)
    ids = torch.tensor([row0, row1])
    grids = {
        "image_grid_thw": torch.tensor([[1, 4, 6], [1, 2, 2], [1, 8, 4]]),
        "video_grid_thw": torch.tensor([[3, 4, 4], [2, 6, 2]]),
        "second_per_grid_ts": torch.tensor([1.5, 0.25]),
    }
    got = ours(ids, **grids)
    assert_same(got, reference(ids, **grids))
    # By hand: the row-0 video starts at 14 and steps 1.5 s * 2 tokens/s = 3 per temporal patch.
    assert set(got[0][0, 0][ids[0] == VIDEO].tolist()) == {14, 17, 20}


def test_left_padding_with_attention_mask(reference):
    rows = [
        stream(2, ("image", (1, 4, 4)), 3, ("video", (2, 4, 2)), 1, seed=6),
        stream(4, ("image", (1, 6, 2)), 2, seed=7),
    ]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    grids = {
        "image_grid_thw": torch.tensor([[1, 4, 4], [1, 6, 2]]),
        "video_grid_thw": torch.tensor([[2, 4, 2]]),  # default 1 s per temporal patch
    }
    assert_same(ours(ids, attention_mask=mask, **grids), reference(ids, mask, **grids))


def test_packed_documents_restart_as_separate_rows(reference):
    docs = [
        (stream(7, seed=8), {}),
        (
            stream(3, ("image", (1, 4, 2)), 4, seed=9),
            {"image_grid_thw": torch.tensor([[1, 4, 2]])},
        ),
        (
            stream(1, ("video", (2, 2, 4)), 2, ("image", (1, 2, 6)), 3, seed=10),
            {
                "image_grid_thw": torch.tensor([[1, 2, 6]]),
                "video_grid_thw": torch.tensor([[2, 2, 4]]),
                "second_per_grid_ts": torch.tensor([2.0]),
            },
        ),
    ]
    expected = [reference(torch.tensor([d]), **g) for d, g in docs]
    lengths = [len(d) for d, _ in docs]
    packed = torch.tensor([[t for d, _ in docs for t in d] + [0, 0, 0]])  # 3 padding tokens
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    positions, deltas = ours(
        packed,
        image_grid_thw=torch.tensor([[1, 4, 2], [1, 2, 6]]),
        video_grid_thw=torch.tensor([[2, 2, 4]]),
        second_per_grid_ts=torch.tensor([2.0]),
        cu_seqlens=cu,
    )
    total = sum(lengths)
    assert torch.equal(positions[:, :, :total], torch.cat([p for p, _ in expected], dim=2))
    assert not positions[:, :, total:].any()
    assert torch.equal(deltas, torch.cat([d for _, d in expected]))


def test_mismatched_placeholders_say_how_to_fix():
    ids = torch.tensor([stream(2, ("image", (1, 4, 4)), 2)])
    grid = torch.tensor([[1, 4, 4]])
    with pytest.raises(ValueError, match="divisible by spatial_merge_size"):
        ours(ids, image_grid_thw=torch.tensor([[1, 3, 4]]))
    with pytest.raises(ValueError, match="describes 6 image tokens"):
        ours(ids, image_grid_thw=torch.tensor([[1, 4, 6]]))
    with pytest.raises(ValueError, match="image_grid_thw is None"):
        ours(ids)
    no_start = ids.clone()
    no_start[0, 2] = 5
    with pytest.raises(ValueError, match="without a vision-start token"):
        ours(no_start, image_grid_thw=grid)
    split = torch.tensor([stream(2, ("image", (1, 2, 4)), 1)])
    split = torch.cat([split[:, :4], torch.tensor([[5]]), split[:, 4:5], split[:, 5:]], dim=1)
    with pytest.raises(ValueError, match="interrupted"):
        ours(split, image_grid_thw=torch.tensor([[1, 2, 4]]))
    with pytest.raises(ValueError, match="one packed row"):
        ours(
            torch.cat([ids, ids]), image_grid_thw=grid.repeat(2, 1), cu_seqlens=torch.tensor([0, 4])
        )
