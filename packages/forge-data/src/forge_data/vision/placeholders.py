"""Image and video placeholders in chat and caption text, expanded to each family's token pattern.

A conversation names its visual items either as content parts (``{"type": "image"}``,
``{"type": "video"}``, ``{"type": "text", "text": ...}``, in order) or as ``<image>`` /
``<video>`` markers inside string contents. Parts become the family's *part text* (what its
reference chat template writes for a part: Qwen2-VL ``<|vision_start|><|image_pad|>
<|vision_end|>``, LLaVA-OneVision ``<image>\\n``, InternVL ``<IMG_CONTEXT>\\n``), markers the same
without the trailing newline. The conversation is then rendered and tokenized by
:func:`forge_data.chat.encode_chat` (any template; assistant-only loss mask), and each *anchor*
token (one per item, in order) is replaced by the item's pattern:

============== ========================================== ==========================================
family         image                                      video
============== ========================================== ==========================================
Qwen2-VL       ``<|image_pad|>`` x n                       ``<|video_pad|>`` x n
LLaVA-OV       ``<image>`` x n                             ``<video>`` x n
InternVL       ``<img>`` ``<IMG_CONTEXT>`` x n ``</img>``   per frame ``Frame{i}: <img>`` ``<IMG_CONTEXT>``
                                                          x n/frames ``</img>``, joined by ``\\n``
============== ========================================== ==========================================

as the reference processors expand them (``Qwen2VLProcessor``, ``LlavaOnevisionProcessor``,
``InternVLProcessor`` of transformers). Expanded tokens never carry loss, and each item's feature
tokens get its index in ``block_ids`` (``-1`` elsewhere), which the packing collate turns into
bidirectional attention blocks. Text pieces of a pattern are tokenized on their own: they sit
between special tokens, where the reference's whole-text tokenization also splits.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from forge_data.tokenizer import Tokenizer

if TYPE_CHECKING:
    from forge_data.vision.processing import VisualItem

__all__ = [
    "INTERN_VL",
    "LLAVA_ONEVISION",
    "QWEN2_VL",
    "STYLES",
    "PlaceholderStyle",
    "VLMSample",
    "anchor_ids",
    "encode_vlm_chat",
    "encode_vlm_text",
    "with_vision_tokens",
]

MARKERS = {"image": "<image>", "video": "<video>"}
_MARKER_RE = re.compile("(<image>|<video>)")


@dataclass(frozen=True, kw_only=True)
class PlaceholderStyle:
    """How one model family writes images and videos into its token stream (see module doc).

    ``*_part``: text of a content part; ``*_anchor``: the special token in it that the item's
    pattern replaces; ``*_token``: the feature token repeated ``n`` times; ``image_open`` /
    ``image_close``: text around an image's (or a video frame's) feature tokens;
    ``frame_label``: if set, a video expands frame by frame as ``frame_label.format(i)`` +
    open + tokens + close, joined by newlines (InternVL).
    """

    name: str
    image_part: str
    video_part: str
    image_anchor: str
    video_anchor: str
    image_token: str
    video_token: str
    image_open: str = ""
    image_close: str = ""
    frame_label: str | None = None

    def __post_init__(self):
        for kind in ("image", "video"):
            if getattr(self, f"{kind}_anchor") not in getattr(self, f"{kind}_part"):
                raise ValueError(f"{self.name}: the {kind} part must hold the {kind} anchor")

    def part(self, kind: str) -> str:
        return getattr(self, f"{kind}_part")

    def inline(self, kind: str) -> str:
        """What an ``<image>`` / ``<video>`` marker in text becomes."""
        return self.part(kind).rstrip("\n")

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """Tokens a tokenizer must hold as single ids for this style."""
        tokens = [self.image_anchor, self.video_anchor, self.image_token, self.video_token]
        tokens += re.findall(r"<[^<>\s]+>", self.image_part + self.video_part)
        tokens += [t for t in (self.image_open, self.image_close) if t]
        return tuple(dict.fromkeys(tokens))

    def pattern(self, kind: str, num_tokens: int, frames: int = 1) -> list[tuple[str, int]]:
        """An item's expansion as pieces ``(text, 0)`` (text, tokenized) and ``(token, n)``
        (``n`` feature tokens)."""
        if kind == "video" and self.frame_label is not None:
            if num_tokens % frames:
                raise ValueError(f"{num_tokens} video tokens do not split over {frames} frames")
            out: list[tuple[str, int]] = []
            for i in range(frames):
                if i:
                    out.append(("\n", 0))
                out += [
                    (self.frame_label.format(i + 1) + self.image_open, 0),
                    (self.image_token, num_tokens // frames),
                    (self.image_close, 0),
                ]
            return [p for p in out if p[1] or p[0]]
        token = self.image_token if kind == "image" else self.video_token
        out = [(self.image_open, 0), (token, num_tokens), (self.image_close, 0)]
        return [p for p in out if p[1] or p[0]]


QWEN2_VL = PlaceholderStyle(
    name="qwen2_vl",
    image_part="<|vision_start|><|image_pad|><|vision_end|>",
    video_part="<|vision_start|><|video_pad|><|vision_end|>",
    image_anchor="<|image_pad|>",
    video_anchor="<|video_pad|>",
    image_token="<|image_pad|>",
    video_token="<|video_pad|>",
)
LLAVA_ONEVISION = PlaceholderStyle(
    name="llava_onevision",
    image_part="<image>\n",
    video_part="<video>\n",
    image_anchor="<image>",
    video_anchor="<video>",
    image_token="<image>",
    video_token="<video>",
)
INTERN_VL = PlaceholderStyle(
    name="intern_vl",
    image_part="<IMG_CONTEXT>\n",
    video_part="<video>\n",
    image_anchor="<IMG_CONTEXT>",
    video_anchor="<video>",
    image_token="<IMG_CONTEXT>",
    video_token="<IMG_CONTEXT>",
    image_open="<img>",
    image_close="</img>",
    frame_label="Frame{}: ",
)
STYLES = {s.name: s for s in (QWEN2_VL, LLAVA_ONEVISION, INTERN_VL)}


def with_vision_tokens(tokenizer: Tokenizer, style: PlaceholderStyle) -> Tokenizer:
    """``tokenizer``, or a copy with the style's special tokens added where it lacks them (a
    model's own tokenizer has them; a freshly trained one does not)."""
    from tokenizers import Tokenizer as _Fast

    missing = [t for t in style.special_tokens if tokenizer.token_to_id(t) is None]
    if not missing:
        return tokenizer
    backend = _Fast.from_str(tokenizer.__getstate__()["json"])
    backend.add_special_tokens(missing)
    return Tokenizer(backend, tokenizer.config, path=None)


@dataclass(frozen=True, kw_only=True)
class VLMSample:
    """Token ids, loss mask (1: trained), ``block_ids`` (item index on its feature tokens, -1
    elsewhere) and the visual items in placeholder order."""

    input_ids: list[int]
    loss_mask: list[int]
    block_ids: list[int]
    items: list[VisualItem]

    def __post_init__(self):
        if not len(self.input_ids) == len(self.loss_mask) == len(self.block_ids):
            raise ValueError("input_ids, loss_mask and block_ids must have one entry per token")


def _text_messages(
    messages: Sequence[Mapping[str, Any]], style: PlaceholderStyle
) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, str):
            text = _MARKER_RE.sub(lambda g: style.inline(g.group(1)[1:-1]), content)
        elif isinstance(content, Sequence):
            pieces = []
            for part in content:
                kind = part.get("type") if isinstance(part, Mapping) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    pieces.append(
                        _MARKER_RE.sub(lambda g: style.inline(g.group(1)[1:-1]), part["text"])
                    )
                elif kind in ("image", "video"):
                    pieces.append(style.part(kind))
                else:
                    raise ValueError(
                        f"message {i} has a content part {part!r}: parts are "
                        "{'type': 'text', 'text': str}, {'type': 'image'} or {'type': 'video'}"
                    )
            text = "".join(pieces)
        else:
            raise ValueError(f"message {i} content must be a string or a list of parts")
        out.append({**m, "content": text})
    return out


def anchor_ids(tokenizer: Tokenizer, style: PlaceholderStyle) -> dict[int, str]:
    """``{token id: kind}`` of the style's anchors; ``ValueError`` if the tokenizer does not
    hold them as single tokens."""
    ids = {}
    for kind in ("image", "video"):
        anchor = getattr(style, f"{kind}_anchor")
        token_id = tokenizer.token_to_id(anchor)
        if token_id is None or tokenizer.encode(anchor) != [token_id]:
            raise ValueError(
                f"the tokenizer has no single token for {anchor!r}: use a {style.name} "
                "tokenizer or forge_data.vision.with_vision_tokens(tokenizer, style)"
            )
        ids[token_id] = kind
    return ids


def _expand(
    tokenizer: Tokenizer,
    style: PlaceholderStyle,
    ids: Sequence[int],
    mask: Sequence[int],
    images: Sequence[VisualItem],
    videos: Sequence[VisualItem],
) -> VLMSample:
    anchors = anchor_ids(tokenizer, style)
    queues = {"image": list(images), "video": list(videos)}
    found = {"image": 0, "video": 0}
    for t in ids:
        if t in anchors:
            found[anchors[t]] += 1
    for kind, items in queues.items():
        if found[kind] != len(items):
            raise ValueError(
                f"the text has {found[kind]} {kind} placeholders but {len(items)} {kind}s were "
                f"given: add {{'type': '{kind}'}} parts or {MARKERS[kind]} markers, one per {kind}"
            )
    text_cache: dict[str, list[int]] = {}
    out_ids: list[int] = []
    out_mask: list[int] = []
    blocks: list[int] = []
    order: list[VisualItem] = []
    for t, m in zip(ids, mask, strict=True):
        kind = anchors.get(t)
        if kind is None:
            out_ids.append(t)
            out_mask.append(m)
            blocks.append(-1)
            continue
        item = queues[kind].pop(0)
        if item.kind != kind:
            raise ValueError(f"a {item.kind} item was given for a {kind} placeholder")
        for text, n in style.pattern(kind, item.num_tokens, item.frames):
            if n:
                piece = [tokenizer.token_to_id(text)] * n
                block = len(order)
            else:
                if text not in text_cache:
                    text_cache[text] = tokenizer.encode(text)
                piece, block = text_cache[text], -1
            out_ids += piece
            out_mask += [0] * len(piece)
            blocks += [block] * len(piece)
        order.append(item)
    return VLMSample(input_ids=out_ids, loss_mask=out_mask, block_ids=blocks, items=order)


def encode_vlm_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    style: PlaceholderStyle,
    *,
    images: Sequence[VisualItem] = (),
    videos: Sequence[VisualItem] = (),
    template: str | None = None,
    system_prompt: str | None = None,
) -> VLMSample:
    """Tokens of a conversation with its images and videos expanded (see the module doc).

    ``images[i]`` / ``videos[i]`` are the processed items of the i-th image / video placeholder;
    the loss mask trains assistant turns only (``template`` / ``system_prompt`` as in
    :func:`forge_data.chat.encode_chat`).
    """
    from forge_data.chat import encode_chat

    chat = encode_chat(
        tokenizer,
        _text_messages(messages, style),
        template=template,
        system_prompt=system_prompt,
    )
    return _expand(tokenizer, style, chat.input_ids, chat.loss_mask, images, videos)


def encode_vlm_text(
    tokenizer: Tokenizer,
    text: str,
    style: PlaceholderStyle,
    *,
    images: Sequence[VisualItem] = (),
    videos: Sequence[VisualItem] = (),
) -> VLMSample:
    """Tokens of a caption / interleaved document: ``<image>`` / ``<video>`` markers in ``text``
    mark the items; without any marker the items' parts precede the text. Text is trained,
    placeholders (part text included) are not."""
    if _MARKER_RE.search(text):
        pieces = [
            (style.inline(p[1:-1]), False) if i % 2 else (p, True)
            for i, p in enumerate(_MARKER_RE.split(text))
        ]
    else:
        pieces = [(style.part(it.kind), False) for it in [*images, *videos]] + [(text, True)]
    ids: list[int] = []
    mask: list[int] = []
    for piece, trained in pieces:
        if piece:
            encoded = tokenizer.encode(piece)
            ids += encoded
            mask += [int(trained)] * len(encoded)
    return _expand(tokenizer, style, ids, mask, images, videos)
