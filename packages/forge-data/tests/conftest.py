"""Shared fixtures: a small byte-level BPE, trained once per session on part of the Python
standard library, a webdataset shard writer and the bytes of the files it holds."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

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


def _png(color, size=(6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@pytest.fixture(scope="session")
def png_bytes():
    """``png_bytes(color, size=(6, 4))``: an RGB image of one colour, PNG-encoded."""
    return _png


@pytest.fixture(scope="session")
def npy_bytes():
    """``npy_bytes(array)``: the array in NumPy's ``.npy`` format."""
    return _npy
