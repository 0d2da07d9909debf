"""Chat templates for SFT: token ids plus a loss mask that trains only on assistant turns.

A template is a Jinja string in the format of Hugging Face ``chat_template`` (it sees
``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``): the tokenizer's own one,
or a named built-in (:data:`BUILTIN_TEMPLATES`: ``chatml``, ``llama3``). The loss mask comes from
rendering the conversation incrementally: for assistant turn ``i``, the text that
``messages[:i]`` renders with the generation prompt is context, and what ``messages[:i+1]`` adds
after it (the reply and its end-of-turn marker) is trained. This works for any template whose
rendering of a prefix of the conversation is a prefix of the full rendering; a template that is
not raises a ``ValueError`` naming the turn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from forge_data.tokenizer import Tokenizer

__all__ = ["BUILTIN_TEMPLATES", "ChatSample", "encode_chat", "render_chat", "resolve_template"]

BUILTIN_TEMPLATES: dict[str, str] = {
    # ChatML (OpenAI; used by Qwen): <|im_start|>role\ncontent<|im_end|>\n
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Llama 3 (Meta): <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}"
    ),
}

ROLES = frozenset({"system", "user", "assistant", "tool"})


@dataclass(frozen=True, kw_only=True)
class ChatSample:
    """``input_ids`` of a rendered conversation and ``loss_mask`` (1 on assistant tokens)."""

    input_ids: list[int]
    loss_mask: list[int]

    def __post_init__(self):
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError(
                f"input_ids has {len(self.input_ids)} tokens but loss_mask {len(self.loss_mask)}"
            )


@lru_cache(maxsize=32)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ValueError(f"chat template error: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def resolve_template(template: str | None, tokenizer: Tokenizer | None = None) -> str:
    """The Jinja source for ``template``: a built-in name, a Jinja string, or ``None`` for the
    tokenizer's own template."""
    if template is None:
        if tokenizer is None or tokenizer.chat_template is None:
            raise ValueError(
                "the tokenizer has no chat_template: pass template= one of "
                f"{sorted(BUILTIN_TEMPLATES)} or a Jinja string"
            )
        return tokenizer.chat_template
    if template in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[template]
    if "{{" not in template and "{%" not in template:
        raise ValueError(
            f"unknown chat template {template!r}: use one of {sorted(BUILTIN_TEMPLATES)} "
            "or pass a Jinja template string"
        )
    return template


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    template: str,
    *,
    add_generation_prompt: bool = False,
    tokenizer: Tokenizer | None = None,
) -> str:
    """Render ``messages`` with the Jinja ``template`` source."""
    config = tokenizer.config if tokenizer is not None else {}

    def _tok(key: str) -> str:
        value = config.get(key) or ""
        return value.get("content", "") if isinstance(value, dict) else value

    return _compile(template).render(
        messages=[dict(m) for m in messages],
        add_generation_prompt=add_generation_prompt,
        bos_token=_tok("bos_token"),
        eos_token=_tok("eos_token"),
    )


def _check(messages: Sequence[Mapping[str, Any]]) -> None:
    if not messages:
        raise ValueError("a conversation needs at least one message")
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(
                f"message {i} must have a role in {sorted(ROLES)} and a string content, "
                f"got role={m.get('role')!r} content type {type(m.get('content')).__name__}"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant turn: nothing would be trained")


def encode_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    *,
    template: str | None = None,
    system_prompt: str | None = None,
) -> ChatSample:
    """Token ids and assistant-only loss mask of a (multi-turn) conversation.

    ``template``: a name in :data:`BUILTIN_TEMPLATES`, a Jinja string, or ``None`` for the
    tokenizer's own. ``system_prompt`` is prepended as a system message when the conversation has
    none.
    """
    _check(messages)
    source = resolve_template(template, tokenizer)
    messages = list(messages)
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_chat(messages[:i], source, add_generation_prompt=True, tokenizer=tokenizer)
        full = render_chat(messages[: i + 1], source, tokenizer=tokenizer)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError(
                f"chat template is not prefix-stable at assistant turn {i}: rendering the "
                "conversation up to a turn must be a prefix of rendering it further; use a "
                "built-in template or fix the template"
            )
        segments += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    final = render_chat(messages, source, tokenizer=tokenizer)
    if not final.startswith(done):
        raise ValueError("chat template is not prefix-stable at the last turn")
    segments.append((final[len(done) :], False))
    ids: list[int] = []
    mask: list[int] = []
    for text, trained in segments:
        if text:
            piece = tokenizer.encode(text)
            ids += piece
            mask += [int(trained)] * len(piece)
    return ChatSample(input_ids=ids, loss_mask=mask)
