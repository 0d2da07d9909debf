"""Shared fixtures: a small byte-level BPE, trained once per session on part of the Python
standard library, and a webdataset shard writer."""

from __future__ import annotations

import io
import tarfile

import pytest

from forge_data.tokenizer import stdlib_corpus_files, train_bpe_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    texts = [
        p.read_text(encoding="utf-8", errors="replace")[:6000] for p in stdlib_corpus_files(20)
    ]
    return train_bpe_tokenizer(texts, vocab_size=600)


@pytest.fixture(scope="session")
def saved_tokenizer(tokenizer, tmp_path_factory):
    """The session tokenizer saved as a Hugging Face folder (for the CLI and AutoTokenizer)."""
    return tokenizer.save(tmp_path_factory.mktemp("tokenizer"))


def _write_tar(path, samples) -> None:
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="session")
def write_tar():
    """``write_tar(path, [(key, {ext: bytes, ...}), ...])``: a webdataset tar shard."""
    return _write_tar
