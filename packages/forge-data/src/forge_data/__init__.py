"""Tokenize, pack, shard and load-balance training data for Forge.

Submodules are imported lazily, so ``import forge_data`` stays cheap (preprocessing workers and
DataLoader workers import only what they use).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "train_bpe_tokenizer": "tokenizer",
    "default_tokenizer": "tokenizer",
    "BUILTIN_TEMPLATES": "chat",
    "ChatSample": "chat",
    "encode_chat": "chat",
    "IndexedDataset": "indexed",
    "IndexedDatasetWriter": "indexed",
    "PreprocessConfig": "preprocess",
    "preprocess": "preprocess",
    "PackingPlan": "packing",
    "pack_documents": "packing",
    "collate_rows": "packing",
    "block_diagonal_mask": "packing",
    "QuadraticCost": "balance",
    "balance_step": "balance",
    "balanced_assignment": "balance",
    "balance_step_documents": "document_balance",
    "LoaderConfig": "loader",
    "PackedLoader": "loader",
    "TokenDataset": "loader",
    "MixtureDataset": "mixture",
    "blend_schedule": "mixture",
    "MultimodalConfig": "multimodal",
    "MultimodalDataset": "multimodal",
    "BadDataReport": "multimodal",
    "FrameSampling": "video",
    "decode_video": "video",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

if TYPE_CHECKING:
    from forge_data.balance import (
        QuadraticCost as QuadraticCost,
    )
    from forge_data.balance import (
        balance_step as balance_step,
    )
    from forge_data.balance import (
        balanced_assignment as balanced_assignment,
    )
    from forge_data.chat import (
        BUILTIN_TEMPLATES as BUILTIN_TEMPLATES,
    )
    from forge_data.chat import (
        ChatSample as ChatSample,
    )
    from forge_data.chat import (
        encode_chat as encode_chat,
    )
    from forge_data.document_balance import (
        balance_step_documents as balance_step_documents,
    )
    from forge_data.indexed import (
        IndexedDataset as IndexedDataset,
    )
    from forge_data.indexed import (
        IndexedDatasetWriter as IndexedDatasetWriter,
    )
    from forge_data.loader import (
        LoaderConfig as LoaderConfig,
    )
    from forge_data.loader import (
        PackedLoader as PackedLoader,
    )
    from forge_data.loader import (
        TokenDataset as TokenDataset,
    )
    from forge_data.mixture import (
        MixtureDataset as MixtureDataset,
    )
    from forge_data.mixture import (
        blend_schedule as blend_schedule,
    )
    from forge_data.multimodal import (
        BadDataReport as BadDataReport,
    )
    from forge_data.multimodal import (
        MultimodalConfig as MultimodalConfig,
    )
    from forge_data.multimodal import (
        MultimodalDataset as MultimodalDataset,
    )
    from forge_data.packing import (
        PackingPlan as PackingPlan,
    )
    from forge_data.packing import (
        block_diagonal_mask as block_diagonal_mask,
    )
    from forge_data.packing import (
        collate_rows as collate_rows,
    )
    from forge_data.packing import (
        pack_documents as pack_documents,
    )
    from forge_data.preprocess import (
        PreprocessConfig as PreprocessConfig,
    )
    from forge_data.preprocess import (
        preprocess as preprocess,
    )
    from forge_data.tokenizer import (
        Tokenizer as Tokenizer,
    )
    from forge_data.tokenizer import (
        default_tokenizer as default_tokenizer,
    )
    from forge_data.tokenizer import (
        load_tokenizer as load_tokenizer,
    )
    from forge_data.tokenizer import (
        train_bpe_tokenizer as train_bpe_tokenizer,
    )
    from forge_data.video import (
        FrameSampling as FrameSampling,
    )
    from forge_data.video import (
        decode_video as decode_video,
    )


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"forge_data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'forge_data' has no attribute {name!r}")
