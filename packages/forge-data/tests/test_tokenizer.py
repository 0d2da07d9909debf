"""Byte-level BPE training, Hugging Face folder round trip, and the cached default tokenizer."""

from __future__ import annotations

import pytest

from forge_data.tokenizer import (
    EOS_TOKEN,
    default_tokenizer,
    load_tokenizer,
    train_bpe_tokenizer,
)

TEXT = 'def f(x):\n    return {"naïve": x ** 2}  # ünïcödé ✓ 数据\n'


def test_trained_bpe_round_trips_any_text_and_learns_merges(tokenizer):
    ids = tokenizer.encode(TEXT)
    assert tokenizer.decode(ids) == TEXT
    # Merges were learned: common Python source takes far fewer tokens than bytes.
    source = "    def __init__(self, name):\n        self.name = name\n"
    assert len(tokenizer.encode(source)) < len(source.encode()) / 2
    assert tokenizer.vocab_size == 600
    assert tokenizer.decode([tokenizer.eos_id]) == EOS_TOKEN
    # Special tokens in text are single tokens.
    assert tokenizer.encode("<|im_start|>")[0] == tokenizer.token_to_id("<|im_start|>")


def test_saved_folder_loads_here_and_in_transformers(tokenizer, saved_tokenizer):
    assert {p.name for p in saved_tokenizer.iterdir()} >= {
        "tokenizer.json",
        "tokenizer_config.json",
    }
    again = load_tokenizer(saved_tokenizer)
    assert again.encode(TEXT) == tokenizer.encode(TEXT)
    assert again.eos_id == tokenizer.eos_id
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(saved_tokenizer))
    assert hf(TEXT, add_special_tokens=False)["input_ids"] == tokenizer.encode(TEXT)
    assert hf.eos_token_id == tokenizer.eos_id


def test_default_tokenizer_trains_once_then_loads_from_cache(tmp_path):
    first = default_tokenizer(tmp_path, vocab_size=400, max_files=4)
    assert first.path is not None
    assert first.path.is_relative_to(tmp_path)
    second = default_tokenizer(tmp_path, vocab_size=400, max_files=4)
    assert second.path == first.path
    assert second.encode(TEXT) == first.encode(TEXT)
    assert second.chat_template is not None  # ships the chatml template


def test_bad_vocab_size_and_missing_folder_are_explained(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100 leaves no room"):
        train_bpe_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
