"""Training and held-out data: tokenize once (cached), then forge_data's ``PackedLoader``.

Raw inputs (the standard library's source, jsonl text, chat jsonl) go through
``forge_data.preprocess`` into a cache folder keyed by the inputs and the tokenizer, written by
rank 0 and published atomically; every rank then reads the same shards. ``preprocessed`` inputs
(``forge-preprocess`` output folders) are read as they are. Each optimizer step is this rank's
list of micro-batches; :func:`model_inputs` turns one into the keyword arguments of
:class:`forge_models.CausalLM` (one packed row with ``cu_seqlens``, so attention never crosses
a document boundary). Image data for a vision-language model comes from
:mod:`forge_train.vlm_data` (the ``skimage_captions`` demo, in memory) or
:mod:`forge_train.vlm_stream` (``vlm_shards``: the user's webdataset shards, streamed); its
micro-batches add the images and videos to those arguments.
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

from forge_train.config import ConfigError, DataConfig, ModelSettings

__all__ = ["VLM_KINDS", "DataBundle", "build_data", "load_run_tokenizer", "model_inputs"]

IGNORE_INDEX = -100
#: The data kinds of a vision-language model (``model.kind=vlm``).
VLM_KINDS = ("skimage_captions", "vlm_shards")


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


def load_run_tokenizer(config: DataConfig, model: ModelSettings | None = None):
    """``data.tokenizer`` (a Hugging Face folder), else the model folder's own tokenizer
    (``model.hf_path``), else forge_data's BPE trained on the standard library (cached after the
    first use). Image data adds the placeholder tokens of ``model``'s family (the style of its
    projector, :func:`forge_train.vlm_processing.placeholder_style`) that the tokenizer lacks,
    and only those: a model's own tokenizer keeps its vocabulary."""
    from forge_data import default_tokenizer, load_tokenizer

    hf_path = None if model is None else model.hf_path
    if config.tokenizer is not None:
        tokenizer = load_tokenizer(config.tokenizer)
    elif hf_path is not None and (Path(hf_path) / "tokenizer.json").exists():
        tokenizer = load_tokenizer(hf_path)
    else:
        tokenizer = default_tokenizer()
    if config.kind in VLM_KINDS:
        from forge_data.vision import with_vision_tokens
        from forge_train.vlm_data import placeholder_style

        if model is None or model.kind != "vlm":
            raise ConfigError(
                f"data.kind={config.kind}: image data needs a vision-language model "
                "(model.kind=vlm), whose projector decides the placeholder tokens"
            )
        tokenizer = with_vision_tokens(tokenizer, placeholder_style(model.config))
    return tokenizer


def _input_files(inputs: list[Path], key: str) -> list[Path]:
    """Every file under ``inputs`` (folders recursively, sorted), for the cache fingerprint;
    which of them ``forge_data.preprocess`` reads (and its errors about the others) is its
    business. ``ConfigError`` for a path that does not exist."""
    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"{key}: {path} does not exist")
    return files


def _fingerprint(inputs: list[Path], tokenizer, config: DataConfig, mode: str, key: str) -> str:
    """The cache key of the tokenized ``inputs``: the tokenizer (its vocabulary and its folder's
    ``tokenizer_config.json``: chat template, special tokens), the data settings and every input
    file's path, size and modification time."""
    h = hashlib.sha1()
    state = tokenizer.__getstate__()
    h.update(state["json"].encode())
    h.update(json.dumps(state["config"], sort_keys=True, default=str).encode())
    h.update(
        json.dumps([mode, config.text_key, config.messages_key, config.chat_template]).encode()
    )
    for f in _input_files(inputs, key):
        stat = f.stat()
        h.update(f"{f.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _tokenized(
    inputs: list[Path], tokenizer, config: DataConfig, mode: str, name: str, key: str
) -> Path:
    """The preprocessed folder of ``inputs`` (files or folders; rank 0 writes it on first use,
    the others wait); ``key`` names the config key of the inputs in errors."""
    from forge_data.preprocess import MANIFEST_NAME, PreprocessConfig, preprocess

    fingerprint = _fingerprint(inputs, tokenizer, config, mode, key)
    folder = _cache_root(config) / f"{name}-{fingerprint}"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and not (folder / MANIFEST_NAME).exists():
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        preprocess(
            PreprocessConfig(
                inputs=[str(f) for f in inputs],
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


def build_data(config: DataConfig, tokenizer, *, model_config=None) -> DataBundle:
    """The training and (when there is one) held-out datasets of ``config`` (image data is
    processed for ``model_config``, a ``VLMConfig``)."""
    from forge_data import TokenDataset
    from forge_data.tokenizer import stdlib_corpus_files

    if config.kind == "skimage_captions":
        from forge_train.vlm_data import build_caption_data

        train, what = build_caption_data(config, tokenizer, model_config, _cache_root(config))
        return DataBundle(tokenizer, train, None, what)
    if config.kind == "vlm_shards":
        from forge_train.vlm_stream import build_shard_data

        train = build_shard_data(
            config, tokenizer, model_config, paths=config.paths, key="data.paths"
        )
        val = None
        if config.val_paths:
            val = build_shard_data(
                config, tokenizer, model_config, paths=config.val_paths, key="data.val_paths"
            )
        what = f"{len(train.urls)} webdataset shards {config.paths}, streamed" + (
            f" ({len(val.urls)} held out)" if val is not None else ""
        )
        return DataBundle(tokenizer, train, val, what)
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
        train_inputs = files[: config.stdlib_files]
        val_inputs = files[config.stdlib_files : config.stdlib_files + config.stdlib_val_files]
        what = (
            f"the Python standard library ({len(train_inputs)} files, {len(val_inputs)} held out)"
        )
    else:
        train_inputs = [Path(p) for p in config.paths]
        val_inputs = [Path(p) for p in config.val_paths]
        what = f"{config.kind} {config.paths}"
    kind = config.kind
    train = TokenDataset(
        _tokenized(train_inputs, tokenizer, config, mode, f"{kind}-train", "data.paths")
    )
    val = None
    if val_inputs:
        val = TokenDataset(
            _tokenized(val_inputs, tokenizer, config, mode, f"{kind}-val", "data.val_paths")
        )
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
    log_bad_data: bool = True,
):
    """forge_data's ``PackedLoader`` over ``dataset`` for this data-parallel rank (a
    :class:`forge_train.vlm_data.VLMLoader` for image-caption samples, a
    :class:`forge_train.vlm_stream.VLMStreamLoader` for streamed shards, which logs each bad
    sample it meets with ``log_bad_data``: :func:`forge_train.vlm_stream.log_bad_data_here`)."""
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
    if config.kind in VLM_KINDS:  # the demo set in memory, or the user's shards streamed
        extra = {}
        if config.kind == "skimage_captions":
            from forge_train.vlm_data import VLMLoader as Loader
        else:
            from forge_train.vlm_stream import VLMStreamLoader as Loader

            extra["log_bad_data"] = log_bad_data
        return Loader(
            dataset,
            global_batch_rows=config.global_batch_rows,
            micro_batch_rows=config.micro_batch_rows,
            seed=seed,
            dp_rank=dp_rank,
            dp_size=dp_size,
            pad_id=pad_id,
            shuffle=shuffle,
            **extra,
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
    if "visual" in batch:  # image data for a VisionLanguageModel
        from forge_train.vlm_data import vlm_model_inputs

        kwargs.update(vlm_model_inputs(batch, device))
    return kwargs, (targets != IGNORE_INDEX).sum()
