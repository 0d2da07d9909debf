"""Placeholder expansion gives the token ids of the transformers processors, no loss on them."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from forge_data.chat import BUILTIN_TEMPLATES, render_chat
from forge_data.vision.intern_vl import InternVLProcessor, InternVLProcessorConfig
from forge_data.vision.llava_onevision import (
    LlavaOnevisionProcessor,
    LlavaOnevisionProcessorConfig,
)
from forge_data.vision.placeholders import (
    INTERN_VL,
    LLAVA_ONEVISION,
    QWEN2_VL,
    encode_vlm_chat,
    encode_vlm_text,
    with_vision_tokens,
)
from forge_data.vision.qwen2_vl import Qwen2VLProcessor, Qwen2VLProcessorConfig

PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]


@pytest.fixture(scope="module")
def pictures():
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in [(50, 90), (60, 30)]
    ]


@pytest.fixture
def hf_processor(monkeypatch):
    """Builds a transformers processor from our tokenizer and a PIL image processor; the class
    check is skipped because the torchvision-only video processors cannot be imported."""
    pytest.importorskip("transformers")
    from transformers import PreTrainedTokenizerFast
    from transformers.processing_utils import ProcessorMixin

    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda *a: None)

    def build(cls, tokenizer, image_processor, **kwargs):
        extra = kwargs.pop("extra_special_tokens", None)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tokenizer._backend, extra_special_tokens=extra or {}
        )
        return cls(image_processor=image_processor, tokenizer=fast, video_processor=None, **kwargs)

    return build


def _conversation(parts):
    return [
        {"role": "user", "content": [*parts, {"type": "text", "text": "What is here?"}]},
        {"role": "assistant", "content": "A cat."},
    ]


def _prompt(tokenizer, messages, style):
    """The chatml rendering of ``messages`` with the family's part text, as a template does."""
    text_messages = [
        {
            "role": m["role"],
            "content": m["content"]
            if isinstance(m["content"], str)
            else "".join(
                p["text"] if p["type"] == "text" else style.part(p["type"]) for p in m["content"]
            ),
        }
        for m in messages
    ]
    return render_chat(text_messages, BUILTIN_TEMPLATES["chatml"], tokenizer=tokenizer)


def _check_masks(tokenizer, sample, style):
    ids = np.array(sample.input_ids)
    blocks = np.array(sample.block_ids)
    mask = np.array(sample.loss_mask)
    assert mask[blocks >= 0].sum() == 0
    trained = tokenizer.decode(ids[mask == 1].tolist())
    assert trained == "A cat.<|im_end|>\n"
    for k, item in enumerate(sample.items):
        assert (blocks == k).sum() == item.num_tokens
        feature = style.image_token if item.kind == "image" else style.video_token
        assert (ids[blocks == k] == tokenizer.token_to_id(feature)).all()


def test_qwen2_vl_expansion_matches_the_reference(tokenizer, pictures, hf_processor):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor as Ref

    tok = with_vision_tokens(tokenizer, QWEN2_VL)
    config = Qwen2VLProcessorConfig(min_pixels=28 * 28, max_pixels=28 * 28 * 12)
    proc = Qwen2VLProcessor(config)
    ref = hf_processor(
        Ref, tok, Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=28 * 28 * 12)
    )
    messages = _conversation([{"type": "image"}, {"type": "image"}])
    images = [proc.image(p) for p in pictures]
    sample = encode_vlm_chat(tok, messages, QWEN2_VL, images=images, template="chatml")
    expected = ref(text=[_prompt(tok, messages, QWEN2_VL)], images=pictures)["input_ids"][0]
    assert sample.input_ids == list(expected)
    _check_masks(tok, sample, QWEN2_VL)

    # A video: its grid's tokens, as the reference's replacement for the same grid.
    ref.video_processor = SimpleNamespace(merge_size=config.merge_size)
    video = proc.video(np.zeros((4, 56, 56, 3), dtype=np.uint8))
    messages = [
        {"role": "user", "content": "<video>Describe.<image>"},
        {"role": "assistant", "content": "A cat."},
    ]
    sample = encode_vlm_chat(
        tok, messages, QWEN2_VL, images=images[:1], videos=[video], template="chatml"
    )
    prompt = _prompt(tok, messages, QWEN2_VL).replace("<video>", QWEN2_VL.inline("video"))
    prompt = prompt.replace("<image>", QWEN2_VL.inline("image"))
    prompt = prompt.replace(
        "<|video_pad|>",
        ref.replace_video_token({"video_grid_thw": video.fields["grid_thw"]}, 0),
    ).replace(
        "<|image_pad|>",
        ref.replace_image_token({"image_grid_thw": images[0].fields["grid_thw"]}, 0),
    )
    assert sample.input_ids == tok.encode(prompt)
    assert [it.kind for it in sample.items] == ["video", "image"]
    _check_masks(tok, sample, QWEN2_VL)


@pytest.mark.parametrize("aspect", ["anyres_max_9", "anyres_max_1"])
def test_llava_onevision_token_counts_match_the_reference(
    tokenizer, pictures, hf_processor, aspect
):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.llava_onevision.processing_llava_onevision import (
        LlavaOnevisionProcessor as Ref,
    )

    tok = with_vision_tokens(tokenizer, LLAVA_ONEVISION)
    proc = LlavaOnevisionProcessor(
        LlavaOnevisionProcessorConfig(
            size=(28, 28),
            image_grid_pinpoints=PINPOINTS,
            num_image_tokens=16,
            vision_aspect_ratio=aspect,
            vision_feature_select_strategy="default",
        )
    )
    ip = LlavaOnevisionImageProcessorPil(
        size={"height": 28, "width": 28}, image_grid_pinpoints=PINPOINTS
    )
    ref = hf_processor(
        Ref,
        tok,
        ip,
        num_image_tokens=16,
        vision_feature_select_strategy="default",
        vision_aspect_ratio=aspect,
    )
    for picture in pictures:
        messages = _conversation([{"type": "image"}])
        sample = encode_vlm_chat(
            tok, messages, LLAVA_ONEVISION, images=proc.process([picture]), template="chatml"
        )
        prompt = _prompt(tok, messages, LLAVA_ONEVISION)
        expected = ref(text=[prompt], images=[picture])["input_ids"][0]
        assert sample.input_ids == list(expected)
        _check_masks(tok, sample, LLAVA_ONEVISION)
    video = proc.video(np.zeros((3, 28, 28, 3), dtype=np.uint8))
    replacement = ref.replace_video_token(
        {"pixel_values_videos": [video.fields["pixel_values"]]}, 0
    )
    assert video.num_tokens == len(replacement) // len("<video>")


def test_intern_vl_images_and_videos_expand_as_the_reference(tokenizer, pictures, hf_processor):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        GotOcr2ImageProcessorPil,
    )
    from transformers.models.internvl.processing_internvl import InternVLProcessor as Ref

    tok = with_vision_tokens(tokenizer, INTERN_VL)
    proc = InternVLProcessor(InternVLProcessorConfig(tile_size=(28, 28), max_patches=4))
    ref = hf_processor(
        Ref,
        tok,
        GotOcr2ImageProcessorPil(size={"height": 28, "width": 28}, max_patches=4),
        image_seq_length=1,
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    messages = _conversation([{"type": "image"}, {"type": "image"}])
    items = proc.process(pictures)
    sample = encode_vlm_chat(tok, messages, INTERN_VL, images=items, template="chatml")
    expected = ref(text=[_prompt(tok, messages, INTERN_VL)], images=pictures)["input_ids"][0]
    assert sample.input_ids == list(expected)
    _check_masks(tok, sample, INTERN_VL)

    # A video before an image: "Frame{i}: <img>...</img>" lines, frames first in pixel order.
    messages = _conversation([{"type": "video"}, {"type": "image"}])
    frames = np.zeros((3, 28, 28, 3), dtype=np.uint8)
    items = proc.process(pictures[:1], [frames], order=["video", "image"])
    sample = encode_vlm_chat(
        tok, messages, INTERN_VL, images=items[1:], videos=items[:1], template="chatml"
    )
    video_text = ref.replace_video_token({"pixel_values_videos": [torch.zeros(3, 3, 28, 28)]}, 0)
    image_text = ref.replace_image_token(
        {"num_patches": [items[1].fields["tiles_per_item"].item()]}, 0
    )
    prompt = _prompt(tok, messages, INTERN_VL)
    prompt = prompt.replace("<IMG_CONTEXT>", image_text).replace("<video>", video_text)
    assert tok.decode(sample.input_ids) == prompt
    assert sample.input_ids == tok.encode(prompt)
    assert [it.kind for it in sample.items] == ["video", "image"]
    _check_masks(tok, sample, INTERN_VL)


def test_captions_train_text_only_and_markers_must_match(tokenizer, pictures):
    tok = with_vision_tokens(tokenizer, QWEN2_VL)
    proc = Qwen2VLProcessor(Qwen2VLProcessorConfig(min_pixels=28 * 28, max_pixels=28 * 28 * 4))
    item = proc.image(pictures[0])
    sample = encode_vlm_text(tok, "A red square.", QWEN2_VL, images=[item])
    ids, mask = np.array(sample.input_ids), np.array(sample.loss_mask)
    assert tok.decode(ids[mask == 1].tolist()) == "A red square."
    assert tok.decode(ids[:1].tolist()) == "<|vision_start|>"
    assert (np.array(sample.block_ids) == 0).sum() == item.num_tokens
    inline = encode_vlm_text(tok, "Left <image> right.", QWEN2_VL, images=[item])
    assert tok.decode(np.array(inline.input_ids)[np.array(inline.loss_mask) == 1].tolist()) == (
        "Left  right."
    )
    with pytest.raises(ValueError, match="2 image placeholders but 1 images"):
        encode_vlm_chat(
            tok, _conversation([{"type": "image"}] * 2), QWEN2_VL, images=[item], template="chatml"
        )
    with pytest.raises(ValueError, match="no single token"):
        encode_vlm_text(tokenizer, "x", QWEN2_VL, images=[item])
    with pytest.raises(ValueError, match="content part"):
        encode_vlm_chat(tok, _conversation([{"type": "audio"}]), QWEN2_VL, template="chatml")
