"""Training and held-out data: tokenize once (cached), then forge_data's ``PackedLoader``.

Raw inputs (the standard library's source, jsonl text, chat jsonl) go through
``forge_data.preprocess`` into a cache folder keyed by the inputs and the tokenizer, written by
rank 0 and published atomically; every rank then reads the same shards. ``preprocessed`` inputs
(``forge-preprocess`` output folders) are read as they are. Each optimizer step is this rank's
list of micro-batches; :func:`model_inputs` turns one into the keyword arguments of
:class:`forge_models.CausalLM` (one packed row with ``cu_seqlens``, so attention never crosses
a document boundary).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from forge_train.config import DataConfig

__all__ = ["DataBundle", "build_data", "load_run_tokenizer", "model_inputs"]

IGNORE_INDEX = -100


@dataclass
class DataBundle:
    tokenizer: Any
    train: Any  # forge_data.TokenDataset
    val: Any | None
    description: str


def _cache_root(config: DataConfig) -> Path:
    if config.cache_dir is not None:
        return Path(config.cache_dir)
    base = os.environ.get("FORGE_DATA_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "forge-data") / "forge-train"


def load_run_tokenizer(config: DataConfig, hf_path: str | None = None):
    """``data.tokenizer`` (a Hugging Face folder), else the model folder's own tokenizer, else
    forge_data's BPE trained on the standard library (cached after the first use)."""
    from forge_data import default_tokenizer, load_tokenizer

    if config.tokenizer is not None:
        return load_tokenizer(config.tokenizer)
    if hf_path is not None and (Path(hf_path) / "tokenizer.json").exists():
        return load_tokenizer(hf_path)
    return default_tokenizer()


def _fingerprint(files: list[Path], tokenizer, config: DataConfig, mode: str) -> str:
    h = hashlib.sha1()
    h.update(tokenizer.__getstate__()["json"].encode())
    h.update(
        json.dumps([mode, config.text_key, config.messages_key, config.chat_template]).encode()
    )
    for f in files:
        stat = f.stat()
        h.update(f"{f.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _expand(paths: list[str]) -> list[Path]:
    from forge_data.preprocess import _files

    return _files(paths)


def _tokenized(files: list[Path], tokenizer, config: DataConfig, mode: str, name: str) -> Path:
    """The preprocessed folder of ``files`` (rank 0 writes it on first use; others wait)."""
    from forge_data.preprocess import MANIFEST_NAME, PreprocessConfig, preprocess

    folder = _cache_root(config) / f"{name}-{_fingerprint(files, tokenizer, config, mode)}"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and not (folder / MANIFEST_NAME).exists():
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        preprocess(
            PreprocessConfig(
                inputs=[str(f) for f in files],
                output_dir=tmp,
                mode=mode,
                text_key=config.text_key,
                messages_key=config.messages_key,
                chat_template=config.chat_template,
                progress=False,
            ),
            tokenizer,
        )
        try:
            tmp.replace(folder)
        except OSError:  # another run cached it first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return folder


def build_data(config: DataConfig, tokenizer) -> DataBundle:
    """The training and (when there is one) held-out datasets of ``config``."""
    from forge_data import TokenDataset
    from forge_data.tokenizer import stdlib_corpus_files

    if config.kind == "preprocessed":
        train = TokenDataset(config.paths if len(config.paths) > 1 else config.paths[0])
        val = None
        if config.val_paths:
            val = TokenDataset(
                config.val_paths if len(config.val_paths) > 1 else config.val_paths[0]
            )
        return DataBundle(tokenizer, train, val, f"preprocessed shards {config.paths}")
    mode = "chat" if config.kind == "chat" else "text"
    if config.kind == "stdlib":
        files = stdlib_corpus_files()
        train_files = files[: config.stdlib_files]
        val_files = files[config.stdlib_files : config.stdlib_files + config.stdlib_val_files]
        what = f"the Python standard library ({len(train_files)} files, {len(val_files)} held out)"
    else:
        train_files = _expand(config.paths)
        val_files = _expand(config.val_paths) if config.val_paths else []
        what = f"{config.kind} {config.paths}"
    train = TokenDataset(_tokenized(train_files, tokenizer, config, mode, f"{config.kind}-train"))
    val = None
    if val_files:
        val = TokenDataset(_tokenized(val_files, tokenizer, config, mode, f"{config.kind}-val"))
    return DataBundle(tokenizer, train, val, what)


def build_loader(
    dataset,
    config: DataConfig,
    *,
    seed: int,
    dp_rank: int,
    dp_size: int,
    pad_id: int,
    shuffle: bool = True,
):
    """forge_data's ``PackedLoader`` over ``dataset`` for this data-parallel rank."""
    from forge_data import LoaderConfig, PackedLoader

    loader_config = LoaderConfig(
        seq_len=config.seq_len,
        global_batch_rows=config.global_batch_rows,
        micro_batch_rows=config.micro_batch_rows,
        seed=seed,
        shuffle=shuffle,
    )
    per_step = dp_size * config.micro_batch_rows
    if config.global_batch_rows % per_step:
        raise ValueError(
            f"data.global_batch_rows={config.global_batch_rows} is not a multiple of data-parallel "
            f"size {dp_size} x data.micro_batch_rows={config.micro_batch_rows} = {per_step}; "
            "change one of them"
        )
    return PackedLoader(dataset, loader_config, dp_rank=dp_rank, dp_size=dp_size, pad_id=pad_id)


def model_inputs(
    batch: dict[str, torch.Tensor], device: torch.device
) -> tuple[dict[str, Any], torch.Tensor]:
    """``(forward kwargs, number of predicted tokens)`` of one collated micro-batch.

    forge_data's ``labels`` are already the next tokens (``IGNORE_INDEX`` where nothing is
    trained); ``CausalLM`` shifts its ``labels`` itself, so they are shifted back by one here.
    """
    targets = batch["labels"].reshape(-1)
    labels = torch.full_like(targets, IGNORE_INDEX)
    labels[1:] = targets[:-1]
    kwargs = {
        "input_ids": batch["input_ids"].reshape(1, -1).to(device, non_blocking=True),
        "labels": labels.reshape(1, -1).to(device, non_blocking=True),
        "position_ids": batch["position_ids"].reshape(1, -1).to(device, non_blocking=True),
        "cu_seqlens": batch["cu_seqlens"].to(device, non_blocking=True),
        "max_seqlen": int(batch["max_seqlen"]),
    }
    return kwargs, (targets != IGNORE_INDEX).sum()
