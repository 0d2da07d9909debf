"""Chat templates: the loss mask covers exactly the assistant replies, for several templates."""

from __future__ import annotations

import pytest

from forge_data.chat import encode_chat, render_chat, resolve_template

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye?"},
    {"role": "assistant", "content": "Bye."},
]


def _runs(ids, mask, value):
    """Token runs where mask == value, as lists of ids."""
    runs, current = [], []
    for i, m in zip(ids, mask, strict=True):
        if m == value:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def _check(tokenizer, sample, full_text, trained, context):
    assert tokenizer.decode(sample.input_ids) == full_text
    assert [tokenizer.decode(r) for r in _runs(sample.input_ids, sample.loss_mask, 1)] == trained
    assert [tokenizer.decode(r) for r in _runs(sample.input_ids, sample.loss_mask, 0)] == context


def test_chatml_multi_turn_with_system_prompt(tokenizer):
    sample = encode_chat(tokenizer, CONVERSATION, template="chatml")
    context = [
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n",
        "<|im_start|>user\nBye?<|im_end|>\n<|im_start|>assistant\n",
    ]
    trained = ["Hello!<|im_end|>\n", "Bye.<|im_end|>\n"]
    full = context[0] + trained[0] + context[1] + trained[1]
    _check(tokenizer, sample, full, trained, context)


def test_llama3_with_default_system_prompt(tokenizer):
    sample = encode_chat(
        tokenizer, CONVERSATION[1:], template="llama3", system_prompt="  You are terse. "
    )
    context = [
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|start_header_id|>user<|end_header_id|>\n\nBye?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ]
    trained = ["Hello!<|eot_id|>", "Bye.<|eot_id|>"]
    _check(tokenizer, sample, context[0] + trained[0] + context[1] + trained[1], trained, context)


def test_tokenizers_own_template_and_trailing_user_turn(tokenizer):
    own = tokenizer.with_config(
        chat_template=(
            "{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant]: {% endif %}"
        )
    )
    messages = [*CONVERSATION[1:4]]  # user, assistant, user: the last user turn is context
    sample = encode_chat(own, messages)
    trained = ["Hello!\n"]
    context = ["[user]: Hi\n[assistant]: ", "[user]: Bye?\n"]
    _check(own, sample, "".join([context[0], trained[0], context[1]]), trained, context)
    assert render_chat(messages, resolve_template(None, own)).startswith("[user]: Hi\n")


def test_bad_conversations_and_templates_are_explained(tokenizer):
    with pytest.raises(ValueError, match="no assistant turn"):
        encode_chat(tokenizer, [{"role": "user", "content": "hi"}], template="chatml")
    with pytest.raises(ValueError, match="message 0 must have a role"):
        encode_chat(tokenizer, [{"role": "bot", "content": "hi"}], template="chatml")
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'"):
        encode_chat(tokenizer, CONVERSATION, template="vicuna")
    with pytest.raises(ValueError, match="has no chat_template"):
        encode_chat(tokenizer.with_config(chat_template=None), CONVERSATION)
    counting = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="not prefix-stable at assistant turn 2"):
        encode_chat(tokenizer, CONVERSATION, template=counting)
