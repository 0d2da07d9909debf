"""The tokenized-data cache key covers what changes the tokens and masks: a tokenizer folder's
``tokenizer_config.json`` (its chat template, its special tokens) as well as its vocabulary."""

from __future__ import annotations

import copy

from forge_data import default_tokenizer
from forge_train.compose import compose_run_config
from forge_train.data import _fingerprint


def test_a_changed_chat_template_is_a_new_cache_entry(tmp_path):
    source = tmp_path / "chat.jsonl"
    source.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    config = compose_run_config([]).data
    tokenizer = default_tokenizer()

    def key(tok):
        return _fingerprint([source], tok, config, "sft", "data.train")

    edited = copy.deepcopy(tokenizer)
    edited.config["chat_template"] = "{{ messages[0]['content'] }}"
    assert key(copy.deepcopy(tokenizer)) == key(tokenizer)  # stable
    assert key(edited) != key(tokenizer)
    before = key(tokenizer)
    source.write_text('{"messages": [{"role": "user", "content": "hello"}]}\n')  # new size
    assert key(tokenizer) != before
