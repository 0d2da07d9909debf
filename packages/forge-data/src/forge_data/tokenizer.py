"""Tokenizers: any Hugging Face tokenizer folder, and a small byte-level BPE trained offline.

A tokenizer folder holds ``tokenizer.json`` (the fast tokenizer of the ``tokenizers`` library) and
``tokenizer_config.json`` (special tokens, chat template); this is what
``transformers.AutoTokenizer.from_pretrained`` reads. :func:`load_tokenizer` reads the same folder
with ``tokenizers`` alone, so preprocessing does not need ``transformers``; folders with only a slow
(sentencepiece/vocab) tokenizer go through ``transformers`` (the ``transformers`` extra).

:func:`train_bpe_tokenizer` trains a byte-level BPE (Sennrich et al. 2016, "Neural Machine
Translation of Rare Words with Subword Units"; byte-level as in GPT-2, Radford et al. 2019) and
:func:`default_tokenizer` trains one on the Python standard library's source once and caches it, so
the built-in default run needs no download.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "Tokenizer",
    "default_tokenizer",
    "load_tokenizer",
    "stdlib_corpus_files",
    "train_bpe_tokenizer",
]

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
# Chat markers of the built-in templates (forge_data.chat), reserved as single tokens.
CHAT_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)


class Tokenizer:
    """A fast tokenizer plus the special tokens and chat template of its folder.

    Picklable (it is sent to preprocessing workers): it pickles as its folder path, or as its
    serialized ``tokenizer.json`` when it was built in memory.
    """

    def __init__(self, backend: Any, config: dict[str, Any], *, path: Path | None = None):
        self._backend = backend
        self.config = dict(config)
        self.path = path

    # -- construction ------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {"json": self._backend.to_str(), "config": self.config, "path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        from tokenizers import Tokenizer as _Fast

        self._backend = _Fast.from_str(state["json"])
        self.config = state["config"]
        self.path = state["path"]

    def with_config(self, **updates: Any) -> Tokenizer:
        """The same tokenizer with ``tokenizer_config`` entries replaced (e.g. ``chat_template``)."""
        return Tokenizer(self._backend, {**self.config, **updates}, path=self.path)

    # -- properties --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def _special_id(self, key: str) -> int | None:
        token = self.config.get(key)
        if isinstance(token, dict):  # {"content": ...} as transformers sometimes writes
            token = token.get("content")
        return None if token is None else self._backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def chat_template(self) -> str | None:
        return self.config.get("chat_template")

    # -- encoding ----------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without any special token added."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=False)

    def files(self) -> dict[str, str]:
        """The texts of ``tokenizer.json`` and ``tokenizer_config.json`` by file name, for a
        writer that puts them into its own (atomic) folder write."""
        return {
            "tokenizer.json": self._backend.to_str(pretty=True),
            "tokenizer_config.json": json.dumps(self.config, indent=2),
        }

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (a Hugging Face folder)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in self.files().items():
            (folder / name).write_text(text)
        return folder


#: Files a slow (non-``tokenizer.json``) tokenizer folder holds, one of which transformers
#: converts: sentencepiece models, byte-level BPE vocabularies, WordPiece, tiktoken.
SLOW_TOKENIZER_FILES = (
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "tokenizer.tiktoken",
)


def _read_json_config(path: Path) -> dict[str, Any]:
    """A JSON object file (``tokenizer_config.json``), with its name in any error."""
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): fix or remove it") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object")
    return config


def _tokenizer_folder(path: Path) -> Path:
    """The folder ``path`` names: a ``tokenizer.json`` file stands for its folder (whose
    ``tokenizer_config.json`` gives the special tokens and chat template)."""
    if path.is_file():
        if path.name == "tokenizer.json":
            return path.parent
        raise ValueError(
            f"{path} is a file: pass the tokenizer's folder (the one holding tokenizer.json "
            f"and tokenizer_config.json), e.g. {path.parent}"
        )
    if not path.is_dir():
        raise ValueError(f"tokenizer folder {path} does not exist")
    return path


def load_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a Hugging Face tokenizer folder (``tokenizer.json`` + config), or of
    the folder of a ``tokenizer.json`` file given directly."""
    folder = _tokenizer_folder(Path(folder))
    config_path = folder / "tokenizer_config.json"
    config = _read_json_config(config_path) if config_path.exists() else {}
    if "chat_template" not in config and (folder / "chat_template.jinja").exists():
        config["chat_template"] = (folder / "chat_template.jinja").read_text()
    fast = folder / "tokenizer.json"
    if fast.exists():
        from tokenizers import Tokenizer as _Fast

        try:
            backend = _Fast.from_file(str(fast))
        except Exception as err:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(
                f"{fast} cannot be read by the tokenizers library ({err}): the file is damaged "
                "or not a tokenizers serialization; copy it again from the model's folder"
            ) from err
        return Tokenizer(backend, config, path=folder)
    slow = [name for name in SLOW_TOKENIZER_FILES if (folder / name).exists()]
    if not slow:
        holds = sorted(p.name for p in folder.iterdir())
        shown = ", ".join(holds[:10]) + (f" ... ({len(holds)} in all)" if len(holds) > 10 else "")
        hint = ""
        if (folder / "hf" / "tokenizer.json").is_file():  # a forge-train run folder
            hint = f"; {folder / 'hf'} holds one (a run folder's export): pass that folder"
        raise ValueError(
            f"no tokenizer.json (nor a slow tokenizer's {' / '.join(SLOW_TOKENIZER_FILES)}) in "
            f"{folder}, which holds: {shown or 'nothing'}{hint}"
        )
    # A folder with only a slow tokenizer: let transformers convert it to a fast one.
    try:
        from transformers import AutoTokenizer
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"{folder} has no tokenizer.json; converting a slow tokenizer needs transformers: "
            "pip install 'forge-data[transformers]'"
        ) from err
    try:
        hf = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    except (ValueError, OSError) as err:
        raise ValueError(
            f"transformers could not build a fast tokenizer from {folder} (slow tokenizer "
            f"files: {', '.join(slow)}): {err}"
        ) from err
    if not hasattr(hf, "backend_tokenizer"):
        raise ValueError(f"transformers could not build a fast tokenizer from {folder}")
    for key in ("bos_token", "eos_token", "pad_token", "chat_template"):
        if getattr(hf, key, None) is not None:
            config.setdefault(key, getattr(hf, key))
    return Tokenizer(hf.backend_tokenizer, config, path=folder)


def train_bpe_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, *CHAT_TOKENS),
    chat_template: str | None = None,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts``.

    The 256 byte symbols are always in the vocabulary, so any text encodes; ``vocab_size`` counts
    them and the special tokens.
    """
    from tokenizers import Tokenizer as _Fast
    from tokenizers import decoders, models, pre_tokenizers, trainers

    floor = 256 + len(special_tokens)
    if vocab_size <= floor:
        raise ValueError(
            f"vocab_size={vocab_size} leaves no room for merges: the 256 byte symbols and "
            f"{len(special_tokens)} special tokens take {floor}; use vocab_size > {floor}"
        )
    backend = _Fast(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "model_max_length": 1 << 20,
        "clean_up_tokenization_spaces": False,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    return Tokenizer(backend, config)


def stdlib_corpus_files(limit: int | None = None) -> list[Path]:
    """The ``.py`` files of this interpreter's standard library (tests excluded), sorted.

    The listing is made once per process (walking the library takes ~0.3 s warm, ~1 s cold,
    and every run on the default corpus asks for it)."""
    files = list(_stdlib_sources(sysconfig.get_paths()["stdlib"]))
    return files[:limit] if limit is not None else files


@functools.cache
def _stdlib_sources(root: str) -> tuple[Path, ...]:
    files = tuple(
        sorted(
            p
            for p in Path(root).rglob("*.py")
            if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts
        )
    )
    if not files:
        raise ValueError(f"no Python sources found under the standard library folder {root}")
    return files


def _read_texts(files: Sequence[Path]) -> Iterator[str]:
    for path in files:
        yield path.read_text(encoding="utf-8", errors="replace")


def default_tokenizer(
    cache_dir: str | os.PathLike | None = None,
    *,
    vocab_size: int = 8192,
    max_files: int | None = 400,
) -> Tokenizer:
    """A byte-level BPE trained on the Python standard library's source, cached on disk.

    The cache key holds the Python version, ``vocab_size`` and ``max_files``: the first call
    trains (a few seconds for the default 400 files), later calls load the saved folder.
    ``cache_dir`` defaults to ``$FORGE_DATA_CACHE`` or ``~/.cache/forge-data``.
    """
    from forge_data.chat import BUILTIN_TEMPLATES

    base = Path(
        cache_dir or os.environ.get("FORGE_DATA_CACHE") or Path.home() / ".cache" / "forge-data"
    )
    key = f"py{sys.version_info.major}.{sys.version_info.minor}-v{vocab_size}-f{max_files}"
    folder = base / "tokenizers" / f"stdlib-bpe-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    if (folder / "tokenizer.json").exists():
        return load_tokenizer(folder)
    tok = train_bpe_tokenizer(
        _read_texts(stdlib_corpus_files(max_files)),
        vocab_size=vocab_size,
        chat_template=BUILTIN_TEMPLATES["chatml"],
    )
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tok.save(tmp)
    try:
        tmp.replace(folder)
    except OSError:  # another process cached it first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(folder)
