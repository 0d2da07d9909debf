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

__all__ = [
    "VLM_KINDS",
    "DataBundle",
    "build_data",
    "check_batch_split",
    "load_run_tokenizer",
    "model_inputs",
]

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


def _tokenizer_files() -> tuple[str, ...]:
    """The files of a Hugging Face tokenizer, fast (``tokenizer.json``) or slow (forge_data's
    ``SLOW_TOKENIZER_FILES``: SentencePiece models of Llama-2 / Mistral / Gemma / T5, GPT-2's
    ``vocab.json``, BERT's ``vocab.txt``, tiktoken, which ``load_tokenizer`` converts)."""
    from forge_data.tokenizer import SLOW_TOKENIZER_FILES

    return ("tokenizer.json", *SLOW_TOKENIZER_FILES)


def _load_folder_tokenizer(folder: str, key: str):
    """forge_data's ``load_tokenizer`` of ``folder``, its failures a ``ConfigError`` naming
    ``key``. transformers, which converts a slow tokenizer, fails in many ways (ValueError,
    OSError, ImportError for a missing ``sentencepiece`` / ``tiktoken``, a bare Exception from
    ``tokenizers`` for a corrupt ``tokenizer.json``): every one of them means this folder's
    tokenizer cannot be used, so all of them are reported as the setting's error."""
    from forge_data import load_tokenizer

    try:
        return load_tokenizer(folder)
    except Exception as exc:  # every failure: see the docstring
        files = _tokenizer_files()
        present = ", ".join(n for n in files if (Path(folder) / n).is_file()) or "none"
        why = f"{type(exc).__name__}: {str(exc).strip().rstrip('.')}"
        raise ConfigError(
            f"{key}: cannot load the tokenizer of {folder} (files: {present}): {why}; install "
            "what the error names (a slow tokenizer needs sentencepiece or tiktoken to convert) "
            "or set data.tokenizer to a folder with a tokenizer.json"
        ) from exc


def _model_folder_tokenizer(hf_path: str):
    """The tokenizer of the model folder ``hf_path``, whatever files it has
    (:func:`_tokenizer_files`). A folder without one (weights-only downloads) is an error, not
    forge's own BPE: its ids would index another vocabulary's embedding rows, and the export
    would pair the model's weights with a tokenizer they were never trained with."""
    folder = Path(hf_path)
    if not folder.is_dir():
        raise ConfigError(
            f"model.hf_path: {hf_path} is not a folder; give a Hugging Face model folder "
            "(config.json, weights, tokenizer)"
        )
    if not any((folder / name).is_file() for name in _tokenizer_files()):
        raise ConfigError(
            f"model.hf_path: {hf_path} has no tokenizer ({' / '.join(_tokenizer_files())}): set "
            "data.tokenizer to the model's tokenizer folder"
        )
    return _load_folder_tokenizer(hf_path, "model.hf_path")


def load_run_tokenizer(config: DataConfig, model: ModelSettings | None = None):
    """``data.tokenizer`` (a Hugging Face folder), else the model folder's own tokenizer
    (``model.hf_path``: :func:`_model_folder_tokenizer`, an error when it has none), else
    forge_data's BPE trained on the standard library (cached after the first use). Image data
    adds the placeholder tokens of ``model``'s family (the style of its projector,
    :func:`forge_train.vlm_processing.placeholder_style`) that the tokenizer lacks, and only
    those: a model's own tokenizer keeps its vocabulary."""
    from forge_data import default_tokenizer

    hf_path = None if model is None else model.hf_path
    if config.tokenizer is not None:
        tokenizer = _load_folder_tokenizer(config.tokenizer, "data.tokenizer")
    elif hf_path is not None:
        tokenizer = _model_folder_tokenizer(hf_path)
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


def _token_ids(tokenizer) -> tuple[Any, list[tuple[int, str]]]:
    """What a token id means under ``tokenizer``: its model's vocabulary and its added tokens
    (not its normalizer, padding or truncation settings, which copies of one tokenizer saved by
    different tools may write differently)."""
    state = json.loads(tokenizer.__getstate__()["json"])
    added = sorted((t["id"], t["content"]) for t in state.get("added_tokens") or ())
    return state.get("model", {}).get("vocab"), added


def _same_tokenizer(recorded: str, tokenizer) -> bool | None:
    """Whether the tokenizer folder a manifest records gives the ids of ``tokenizer`` the same
    meaning (``None``: that folder is gone or unreadable, so it cannot be told)."""
    from forge_data import load_tokenizer

    if tokenizer.path is not None and Path(recorded).resolve() == Path(tokenizer.path).resolve():
        return True
    if not Path(recorded).is_dir():
        return None
    try:
        theirs = load_tokenizer(recorded)
    except Exception:  # unreadable or unconvertible: nothing to compare
        return None
    return _token_ids(theirs) == _token_ids(tokenizer)


def _preprocessed(paths: list[str], key: str, tokenizer, model_vocab: int | None):
    """One ``TokenDataset`` of the shards of every ``forge-preprocess`` folder in ``paths``
    (their shards back to back, folder by folder), after checking each folder's
    ``manifest.json`` against the run: its shards must have been tokenized with the run's
    tokenizer (same ``vocab_size``, and the same vocabulary where the recorded tokenizer folder
    can still be read), so that their ids mean the tokens the model is trained on and stay
    below its vocabulary; otherwise the embedding lookup fails mid-step (an index error on the
    CPU, a device-side assert on a GPU) or, worse, trains on the wrong tokens."""
    from forge_data import TokenDataset
    from forge_data.preprocess import MANIFEST_NAME

    prefixes: list[Path] = []
    for path in paths:
        folder = Path(path)
        manifest_path = folder / MANIFEST_NAME
        if not manifest_path.is_file():
            why = "does not exist" if not folder.exists() else f"has no {MANIFEST_NAME}"
            raise ConfigError(
                f"{key}: {path} {why}; data.kind=preprocessed reads forge-preprocess output "
                "folders (data.paths=[folder_a,folder_b])"
            )
        try:
            manifest = json.loads(manifest_path.read_text())
            shards = [folder / shard["prefix"] for shard in manifest["shards"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{key}: {manifest_path} is not a forge-preprocess manifest ({exc!r}); "
                "preprocess the data again with forge-preprocess"
            ) from exc
        recorded = manifest.get("tokenizer")
        shard_vocab = manifest.get("vocab_size")
        where = tokenizer.path or "built in memory"
        ours = f"the run's tokenizer ({where}, {tokenizer.vocab_size} ids)"
        theirs = f"{path} was tokenized with {recorded or 'a tokenizer'} ({shard_vocab} ids)"
        fix = (
            "set data.tokenizer to the tokenizer the shards were made with, or preprocess them "
            "again with this one"
        )
        if isinstance(shard_vocab, int) and shard_vocab != tokenizer.vocab_size:
            raise ConfigError(f"{key}: {theirs}, not {ours}; {fix}")
        if recorded and _same_tokenizer(recorded, tokenizer) is False:
            raise ConfigError(f"{key}: {theirs}, whose vocabulary differs from {ours}; {fix}")
        if isinstance(shard_vocab, int) and model_vocab is not None and shard_vocab > model_vocab:
            raise ConfigError(
                f"{key}: {theirs}, more than the model's vocabulary of {model_vocab}; its ids "
                "would index past the embedding: use the model's own tokenizer"
            )
        prefixes += shards
    return TokenDataset(prefixes)


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
        vocab = None if model_config is None else getattr(model_config, "text", model_config)
        vocab = None if vocab is None else vocab.vocab_size
        train = _preprocessed(config.paths, "data.paths", tokenizer, vocab)
        val = None
        if config.val_paths:
            val = _preprocessed(config.val_paths, "data.val_paths", tokenizer, vocab)
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


def check_batch_split(config: DataConfig, dp_size: int) -> None:
    """``ConfigError`` unless each of the ``dp_size`` data-parallel ranks gets whole
    micro-batches of every step's ``data.global_batch_rows`` rows, with the values that would
    fit (checked at setup, from the layout's degrees, before any model is built)."""
    global_rows, micro = config.global_batch_rows, config.micro_batch_rows
    per_step = dp_size * micro
    if global_rows % per_step == 0:
        return
    micro_ok = [m for m in range(1, global_rows + 1) if global_rows % (dp_size * m) == 0]
    other = (
        f" or data.micro_batch_rows among {micro_ok}"
        if micro_ok
        else f" (at least {dp_size}: one row per data-parallel rank)"
    )
    raise ConfigError(
        f"data.global_batch_rows={global_rows} is not a multiple of the data-parallel size "
        f"{dp_size} x data.micro_batch_rows={micro} = {per_step} (each data-parallel rank takes "
        f"whole micro-batches); set data.global_batch_rows to a multiple of {per_step} "
        f"({per_step}, {2 * per_step}, ...){other}"
    )


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
    check_batch_split(config, dp_size)
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
