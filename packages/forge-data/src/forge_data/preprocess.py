"""Raw corpora -> tokenized, shuffled, memory-mappable shards plus a manifest.

Inputs are jsonl files (a text field, or a chat ``messages`` field for SFT), parquet files (the
``parquet`` extra) and plain-text files (one document per file), given as files or folders.
Two passes, neither of which holds the corpus in memory: a pool of tokenizer workers encodes
documents in order into one staging shard, then documents are written in a seeded random order
into ``num_shards`` :mod:`forge_data.indexed` shards. ``manifest.json`` records the counts, token
totals, a length histogram and every skipped document with its location.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from forge_data.indexed import IndexedDataset, IndexedDatasetWriter, dtype_for_vocab
from forge_data.tokenizer import Tokenizer

__all__ = ["MANIFEST_NAME", "PreprocessConfig", "iter_documents", "length_histogram", "preprocess"]

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT = "forge-indexed-v1"
TEXT_SUFFIXES = frozenset({".txt", ".md", ".rst", ".py", ".text"})
JSONL_SUFFIXES = frozenset({".jsonl", ".json"})
PARQUET_SUFFIXES = frozenset({".parquet"})
MAX_LOGGED_SKIPS = 1000
EMPTY = "empty document"  # always skipped and counted, also with on_error="raise"


@dataclass(frozen=True, kw_only=True)
class PreprocessConfig:
    """What to read, how to tokenize it, and how to write it.

    ``mode="text"`` reads ``text_key`` (jsonl/parquet) or whole files (plain text) and appends the
    EOS token; ``mode="chat"`` reads ``messages_key`` conversations and stores the assistant-only
    loss mask with the template ``chat_template`` (a built-in name, Jinja, or ``None`` for the
    tokenizer's own). ``on_error="skip"`` counts and logs undecodable records; ``"raise"`` stops
    at the first one. Empty documents are always skipped and counted.
    """

    inputs: Sequence[str | os.PathLike]
    output_dir: str | os.PathLike
    mode: Literal["text", "chat"] = "text"
    text_key: str = "text"
    messages_key: str = "messages"
    chat_template: str | None = None
    system_prompt: str | None = None
    append_eos: bool = True
    num_shards: int = 1
    num_workers: int = 0
    chunk_size: int = 256
    seed: int = 0
    on_error: Literal["skip", "raise"] = "skip"
    progress: bool = True
    overwrite: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.inputs:
            raise ValueError("no inputs given: pass at least one file or folder")
        if self.mode not in ("text", "chat"):
            raise ValueError(f"mode must be 'text' or 'chat', got {self.mode!r}")
        if self.on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {self.on_error!r}")
        if self.num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {self.num_shards}")
        if self.num_workers < 0:
            raise ValueError(
                f"num_workers must be >= 0 (0: tokenize in this process), got {self.num_workers}"
            )
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")


# -- reading --------------------------------------------------------------------------------------
def _files(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    supported = TEXT_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in supported)
        elif path.is_file():
            if path.suffix not in supported:
                raise ValueError(
                    f"{path}: unsupported file type {path.suffix!r}; supported: {sorted(supported)}"
                )
            files.append(path)
        else:
            raise ValueError(f"input {path} does not exist")
    if not files:
        raise ValueError(
            f"no supported files under {[str(i) for i in inputs]}: a folder is searched "
            f"recursively for {', '.join(sorted(supported))} files; add some, or name the "
            "files to read"
        )
    return files


def iter_documents(config: PreprocessConfig) -> Iterator[tuple[str, Any, str | None]]:
    """``(location, payload, error)`` for every record: payload is a text or a message list;
    ``error`` says why a record could not be read (payload ``None``)."""
    key = config.text_key if config.mode == "text" else config.messages_key
    for path in _files(config.inputs):
        if path.suffix in TEXT_SUFFIXES:
            if config.mode == "chat":
                raise ValueError(f"{path}: chat mode needs jsonl or parquet records, not text")
            try:
                yield str(path), path.read_text(encoding="utf-8"), None
            except UnicodeDecodeError as err:
                yield str(path), None, f"not UTF-8: {err}"
        elif path.suffix in JSONL_SUFFIXES:
            with open(path, "rb") as f:  # decoded line by line: a bad line is that line's error
                for lineno, raw in enumerate(f, 1):
                    where = f"{path}:{lineno}"
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as err:
                        yield where, None, f"not UTF-8: {err}"
                        continue
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        yield where, None, f"invalid JSON: {err}"
                        continue
                    if not isinstance(record, dict) or key not in record:
                        yield where, None, f"record has no {key!r} field"
                        continue
                    yield where, record[key], None
        else:
            try:
                import pyarrow.parquet as pq
            except ImportError as err:
                raise ImportError(
                    f"reading {path} needs pyarrow: pip install 'forge-data[parquet]'"
                ) from err
            table = pq.ParquetFile(path)
            if key not in table.schema_arrow.names:
                raise ValueError(
                    f"{path} has columns {table.schema_arrow.names}, not {key!r}: "
                    "pass --text-key/--messages-key"
                )
            row = 0
            for batch in table.iter_batches(columns=[key]):
                for value in batch.column(0).to_pylist():
                    yield f"{path}#row={row}", value, None
                    row += 1


# -- tokenizing (in worker processes) -------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: Tokenizer, config: PreprocessConfig) -> None:
    _WORKER["tokenizer"] = tokenizer
    _WORKER["config"] = config


def _encode_chunk(chunk: list[tuple[str, Any, str | None]]) -> list[tuple]:
    from forge_data.chat import encode_chat

    tokenizer: Tokenizer = _WORKER["tokenizer"]
    config: PreprocessConfig = _WORKER["config"]
    out = []
    if config.mode == "text":
        good = [(i, p) for i, (_, p, e) in enumerate(chunk) if e is None and isinstance(p, str)]
        encoded = dict(
            zip([i for i, _ in good], tokenizer.encode_batch([p for _, p in good]), strict=True)
        )
        eos = tokenizer.eos_id
        for i, (where, payload, error) in enumerate(chunk):
            if error is None and not isinstance(payload, str):
                error = f"text field is {type(payload).__name__}, not a string"
            if error is not None:
                out.append((where, None, None, error))
                continue
            ids = encoded[i]
            if not ids:
                out.append((where, None, None, EMPTY))
                continue
            if config.append_eos and eos is not None:
                ids = [*ids, eos]
            out.append((where, np.asarray(ids, dtype=np.int64), None, None))
        return out
    for where, payload, error in chunk:
        if error is None:
            try:
                sample = encode_chat(
                    tokenizer,
                    payload,
                    template=config.chat_template,
                    system_prompt=config.system_prompt,
                )
                ids = np.asarray(sample.input_ids, dtype=np.int64)
                out.append((where, ids, np.asarray(sample.loss_mask, np.uint8), None))
                continue
            except (ValueError, TypeError, AttributeError) as err:
                error = f"bad conversation: {err}"
        out.append((where, None, None, error))
    return out


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def length_histogram(lengths: np.ndarray) -> dict[str, int]:
    """Counts of document lengths in power-of-two buckets ``"[lo, hi)"``."""
    if lengths.size == 0:
        return {}
    buckets = np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64)
    counts = np.bincount(buckets)
    return {f"[{1 << b}, {1 << (b + 1)})": int(c) for b, c in enumerate(counts) if c}


# -- the whole run --------------------------------------------------------------------------------
def preprocess(config: PreprocessConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """Tokenize ``config.inputs`` into shuffled shards under ``config.output_dir``; returns the
    manifest (also written to ``manifest.json`` there)."""
    from tqdm import tqdm

    out = Path(config.output_dir)
    if out.exists() and any(out.iterdir()):
        if not config.overwrite:
            raise ValueError(f"{out} is not empty: pass overwrite=True (--overwrite) to replace it")
        if not (out / MANIFEST_NAME).exists():
            raise ValueError(
                f"{out} is not empty and holds no {MANIFEST_NAME}: refusing to delete a folder "
                "that is not a forge-preprocess output; choose another output folder"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    with_mask = config.mode == "chat"
    staging = out / ".staging"
    skipped: dict[str, int] = {}
    skipped_at: list[dict[str, str]] = []

    def handle(results) -> None:
        for where, ids, mask, error in results:
            if error is not None:
                if config.on_error == "raise" and error != EMPTY:
                    raise ValueError(f"{where}: {error} (on_error='skip' counts and skips it)")
                reason = error.split(":")[0]
                skipped[reason] = skipped.get(reason, 0) + 1
                if len(skipped_at) < MAX_LOGGED_SKIPS:
                    skipped_at.append({"location": where, "reason": error})
                log.warning("skipping %s: %s", where, error)
                continue
            writer.add(ids, mask)
            bar.update(1)

    chunks = _chunks(iter_documents(config), config.chunk_size)
    with (
        IndexedDatasetWriter(staging, dtype=dtype, with_mask=with_mask) as writer,
        tqdm(desc="tokenizing", unit="doc", disable=not config.progress) as bar,
    ):
        if config.num_workers == 0:
            _init_worker(tokenizer, config)
            for chunk in chunks:
                handle(_encode_chunk(chunk))
        else:
            ctx = mp.get_context("spawn")
            with ctx.Pool(config.num_workers, _init_worker, (tokenizer, config)) as pool:
                for results in pool.imap(_encode_chunk, chunks):
                    handle(results)

    source = IndexedDataset(staging)
    n = len(source)
    if n == 0:
        raise ValueError(
            f"no usable documents in {list(map(str, config.inputs))}; skipped: {skipped}"
        )
    order = np.random.default_rng(config.seed).permutation(n)
    shards = []
    trained = 0
    for s, part in enumerate(np.array_split(order, config.num_shards)):
        name = f"shard_{s:05d}"
        with IndexedDatasetWriter(out / name, dtype=dtype, with_mask=with_mask) as writer:
            for i in part:
                mask = source.loss_mask(i)
                writer.add(source[i], mask)
                trained += int(mask.sum()) if mask is not None else 0
        lengths = source.lengths[part]
        shards.append({"prefix": name, "documents": int(part.size), "tokens": int(lengths.sum())})
    lengths = source.lengths
    del source
    for ext in (".bin", ".idx", ".mask.bin"):
        staging.with_name(staging.name + ext).unlink(missing_ok=True)

    manifest = {
        "format": FORMAT,
        "mode": config.mode,
        "tokenizer": str(tokenizer.path) if tokenizer.path else None,
        "vocab_size": tokenizer.vocab_size,
        "dtype": str(dtype),
        "eos_id": tokenizer.eos_id,
        "seed": config.seed,
        "documents": int(n),
        "tokens": int(lengths.sum()),
        "trained_tokens": trained if with_mask else None,
        "length": {
            "min": int(lengths.min()),
            "mean": float(lengths.mean()),
            "max": int(lengths.max()),
            "histogram": length_histogram(lengths),
        },
        "skipped": {"total": sum(skipped.values()), "by_reason": skipped, "records": skipped_at},
        "shards": shards,
        "config": {k: v for k, v in asdict(config).items() if k not in ("inputs", "output_dir")}
        | {"inputs": [str(i) for i in config.inputs]},
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return manifest
