"""A bad tokenizer, preprocessed folder or input folder is reported with the path at fault and
what to do, not with the error of the library underneath."""

from __future__ import annotations

import json

import pytest

from forge_data.loader import TokenDataset
from forge_data.preprocess import PreprocessConfig, iter_documents
from forge_data.tokenizer import load_tokenizer


def test_a_tokenizer_json_file_stands_for_its_folder(saved_tokenizer, tokenizer):
    loaded = load_tokenizer(saved_tokenizer / "tokenizer.json")
    assert loaded.encode("def f(x): return x") == tokenizer.encode("def f(x): return x")
    assert loaded.path == saved_tokenizer
    with pytest.raises(ValueError, match=r"tokenizer_config\.json is a file: pass the tokenizer"):
        load_tokenizer(saved_tokenizer / "tokenizer_config.json")


def test_a_folder_without_a_tokenizer_says_so(tmp_path, saved_tokenizer):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match=r"no tokenizer\.json .*tokenizer\.model.* holds: metrics"):
        load_tokenizer(tmp_path)
    # A forge-train run folder: its hf/ export holds the tokenizer.
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.json").write_text(
        (saved_tokenizer / "tokenizer.json").read_text()
    )
    with pytest.raises(ValueError, match=r"hf holds one \(a run folder's export\)"):
        load_tokenizer(tmp_path)


def test_damaged_tokenizer_files_are_named(tmp_path, saved_tokenizer):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"tok/tokenizer\.json cannot be read by the tokenizers"):
        load_tokenizer(folder)
    (folder / "tokenizer.json").write_text((saved_tokenizer / "tokenizer.json").read_text())
    (folder / "tokenizer_config.json").write_text('{"bos_token": ')
    with pytest.raises(ValueError, match=r"tok/tokenizer_config\.json is not valid JSON"):
        load_tokenizer(folder)


def test_preprocessed_folder_errors(tmp_path):
    with pytest.raises(ValueError, match=r"preprocessed data folder .*/nope does not exist"):
        TokenDataset(tmp_path / "nope")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest\.json is not valid JSON"):
        TokenDataset(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"documents": 3}))
    with pytest.raises(ValueError, match=r"does not list shards"):
        TokenDataset(tmp_path)


def test_an_input_folder_without_supported_files_lists_the_extensions(tmp_path):
    (tmp_path / "notes.csv").write_text("a,b\n")
    config = PreprocessConfig(inputs=[str(tmp_path)], output_dir=tmp_path / "out")
    with pytest.raises(ValueError, match=r"no supported files under .*\.jsonl, \.md, \.parquet"):
        list(iter_documents(config))
