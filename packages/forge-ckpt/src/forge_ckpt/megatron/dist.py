"""Megatron-Core's distributed checkpoint format (``torch_dist``), through
``torch.distributed.checkpoint`` (DCP), without a process group.

An iteration folder holds ``metadata.json`` (``{"sharded_backend": "torch_dist", ...}``),
``common.pt`` (``args``, ``checkpoint_version``, ``iteration``: what is not sharded), DCP's
``.metadata`` and the data files ``__{rank}_0.distcp``. The DCP keys are Megatron-Core's
``sharded_state_dict`` keys: layers share one key with a leading layer axis
(``decoder.layers.self_attention.linear_qkv.weight`` of global shape ``[num_layers, ...]``),
experts one more axis (``decoder.layers.mlp.experts.experts.linear_fc1.weight``
``[num_layers, num_experts, ...]``), and the local layer spec renames its norms to the Transformer
Engine names. Tensor-parallel shards are chunks of the global tensors (a SwiGLU ``linear_fc1``
shard is two chunks, its gate and its up rows), so any split reads back into any other.
A model whose layers differ (dense and MoE layers mixed: Megatron-Core's
``non_homogeneous_layers``, which a ``moe_layer_freq`` list or an int above 1 sets) keys every
layer on its own instead, ``decoder.layers.{i}.*`` without the layer axis; the reader takes
either.

:func:`save_dist` writes one data file per pipeline stage and expert rank, converting one stage
at a time: with expert parallelism each rank's file holds its experts' chunks (at their global
expert offsets; the key's layout is the same at any split) and expert rank 0's file everything
else. Uneven pipeline stages and virtual (interleaved) stages only move layers between files.
:class:`DistCheckpoint` reads key by key, whatever the split. DCP's ``.metadata`` is a pickle:
it is read with :func:`forge_ckpt.dcp_metadata.load_dcp_metadata`, whose unpickler admits only
DCP's metadata classes by exact name, ``torch.Size``, dtypes and paths (``ValueError`` naming
anything else).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from forge_ckpt.atomic_folder import publish_folder
from forge_ckpt.dcp_metadata import load_dcp_metadata
from forge_ckpt.megatron.expert_parallel import expert_index
from forge_ckpt.megatron.layout import (
    LATEST_FILE,
    iteration_dir,
    parallel_args,
    read_latest_iteration,
)
from forge_ckpt.megatron.legacy import CHECKPOINT_VERSION
from forge_ckpt.megatron.safe_load import load_pt
from forge_ckpt.megatron.tensor_parallel import tp_chunks
from forge_ckpt.megatron.virtual_pipeline import write_split

__all__ = ["DistCheckpoint", "dist_key", "is_dist_checkpoint", "save_dist"]

METADATA_JSON = "metadata.json"
COMMON_FILE = "common.pt"
_BACKEND = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
# Layer stacks: a GPTModel's decoder, under ``language_model.`` in a LLaVAModel, whose vision
# encoder stacks its own layers under ``vision_model.`` (always one key per tensor: its layers
# are alike, and its local spec renames no norms).
_LAYER = re.compile(r"^((?:language_model\.|vision_model\.)?decoder\.layers\.)(\d+)\.(.*)$")
_STACKS = ("decoder.layers.", "language_model.decoder.layers.", "vision_model.decoder.layers.")
_VISION = "vision_model."
# Keys of one layer (no layer axis): an MTP layer's transformer layer, and every decoder layer of
# a model with non-homogeneous layers (Megatron-Core's per-layer keys).
_ONE_LAYER = re.compile(
    r"^((?:mtp\.layers\.\d+\.transformer_layer|(?:language_model\.)?decoder\.layers\.\d+)\.)(.*)$"
)
_SEQ_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.*)$")
_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12]\.(?:weight|bias))(\d+)$")
_EXPERTS = "mlp.experts.experts."


def _split_expert(rest: str, renames: tuple[tuple[str, str], ...]) -> tuple[str, int | None]:
    """A layer-relative name as its DCP suffix and its expert number (``None``: no expert)."""
    for old, new in renames:
        if rest.startswith(old):
            rest = new + rest[len(old) :]
    expert = _SEQ_EXPERT.match(rest)
    if expert is not None:
        return f"{_EXPERTS}{expert.group(2)}", int(expert.group(1))
    grouped = _GROUPED_EXPERT.match(rest)
    if grouped is not None:
        return f"{_EXPERTS}{grouped.group(1)}", int(grouped.group(2))
    return rest, None


def dist_key(
    name: str,
    *,
    num_layers: int,
    num_experts: int = 0,
    renames: tuple[tuple[str, str], ...] = (),
    per_layer: bool = False,
    vision_layers: int = 0,
) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """``(DCP key, leading offsets, leading extents)`` of a full Megatron tensor name.

    Decoder layers share a key with a leading layer axis, or, with ``per_layer`` (Megatron-Core's
    ``non_homogeneous_layers``: dense and MoE layers mixed), keep their own keys
    (``decoder.layers.{i}.*``, no layer axis) as the transformer layer of an MTP layer always
    does (``mtp.layers.{k}.transformer_layer.*``). Routed experts add an expert axis to either.
    A LLaVAModel's language model keys its layers so under ``language_model.``; its vision
    encoder's ``vision_layers`` layers share keys ``vision_model.decoder.layers.*`` (no renames).
    """
    match = _LAYER.match(name)
    vision = match is not None and match.group(1).startswith(_VISION)
    if match is not None and (vision or not per_layer):
        prefix, rest = match.group(1), match.group(3)
        lead, size = (int(match.group(2)),), (vision_layers if vision else num_layers,)
        if vision:
            return prefix + rest, lead, size
    else:
        one = _ONE_LAYER.match(name)
        if one is None:
            return name, (), ()
        (prefix, rest), lead, size = one.groups(), (), ()
    rest, expert = _split_expert(rest, renames)
    if expert is None:
        return prefix + rest, lead, size
    return prefix + rest, (*lead, expert), (*size, num_experts)


def _leading_dims(key: str) -> int:
    """How many leading axes (layer, expert) DCP key ``key`` has."""
    one = _ONE_LAYER.match(key)
    if one is not None:
        return 1 if one.group(2).startswith(_EXPERTS) else 0
    stack = next((s for s in _STACKS if key.startswith(s)), None)
    if stack is not None:
        return 2 if key.startswith(stack + _EXPERTS) else 1
    return 0


def _name_of(
    key: str,
    leading: tuple[int, ...],
    *,
    renames: tuple[tuple[str, str], ...],
    grouped_gemm: bool,
) -> str:
    """The inverse of :func:`dist_key`."""
    one = _ONE_LAYER.match(key)
    stack = next((s for s in _STACKS if key.startswith(s)), None)
    if one is not None:
        (prefix, rest), expert = one.groups(), (leading[0] if leading else None)
    elif stack is not None and leading:
        prefix, rest = f"{stack}{leading[0]}.", key[len(stack) :]
        expert = leading[1] if len(leading) == 2 else None
        if stack.startswith(_VISION):
            return prefix + rest
    else:
        return key
    if expert is not None:
        rest = rest[len(_EXPERTS) :]
        rest = (
            f"mlp.experts.{rest}{expert}"
            if grouped_gemm
            else f"mlp.experts.local_experts.{expert}.{rest}"
        )
    for old, new in renames:
        if rest.startswith(new):
            rest = old + rest[len(new) :]
    return prefix + rest


def is_dist_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` (an iteration folder) holds a Megatron distributed checkpoint."""
    return (Path(folder) / METADATA_JSON).is_file()


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class _Resolver:
    """The one method DCP's writer asks of a planner: the data of a write item."""

    def __init__(self, data: Mapping[Any, torch.Tensor]) -> None:
        self.data = data

    def resolve_data(self, item):
        return self.data[(item.index.fqn, tuple(item.index.offset))]


def save_dist(
    root: str | os.PathLike,
    stage_tensors: Callable[[int, range], Iterable[tuple[str, torch.Tensor]]],
    *,
    num_layers: int,
    num_experts: int = 0,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    expert_parallel: int = 1,
    first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
    virtual_pipeline: int = 1,
    pipeline_layout: str | None = None,
    args: Mapping[str, Any] | None = None,
    iteration: int = 0,
    te_spec: bool = True,
    renames: tuple[tuple[str, str], ...] = (),
    per_layer_keys: bool = False,
    vision_layers: int = 0,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write a ``torch_dist`` Megatron checkpoint into ``root`` (atomically, as
    :func:`~forge_ckpt.megatron.legacy.save_legacy`, with the same ``stage_tensors``).

    ``renames``: the local layer spec's key renames (used when ``te_spec`` is False).
    ``per_layer_keys``: one key per decoder layer (see :func:`dist_key`), as Megatron-Core
    stores models whose layers differ (dense and MoE layers mixed).
    ``vision_layers``: a LLaVAModel's vision encoder layers (their keys' layer axis).
    ``expert_parallel``, ``first_stage_layers``, ``last_stage_layers``, ``virtual_pipeline``,
    ``pipeline_layout``: as for :func:`~forge_ckpt.megatron.legacy.save_legacy`. Keys are
    global, so virtual stages change only which pipeline rank's data file holds a layer.
    """
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import _StoragePrefix
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )
    from torch.distributed.checkpoint.planner import (
        SavePlan,
        TensorWriteData,
        WriteItem,
        WriteItemType,
    )

    root = Path(root)
    tp, pp, ep, per_rank, chunks, vp = write_split(
        root, num_layers=num_layers, num_experts=num_experts, tensor_parallel=tensor_parallel,
        pipeline_parallel=pipeline_parallel, expert_parallel=expert_parallel,
        first_stage_layers=first_stage_layers, last_stage_layers=last_stage_layers,
        virtual_pipeline=virtual_pipeline, pipeline_layout=pipeline_layout, overwrite=overwrite,
    )  # fmt: skip
    renames = () if te_spec else tuple(renames)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        it_dir = iteration_dir(tmp, iteration)
        it_dir.mkdir(parents=True)
        writer = FileSystemWriter(it_dir, single_file_per_rank=True, thread_count=1)
        writer.set_up_storage_writer(True)
        tensors_md: dict[str, TensorStorageMetadata] = {}
        results = []
        for s in range(pp):
            items: list[list] = [[] for _ in range(ep)]  # per expert rank's data file
            data: dict = {}
            rank_tensors = (
                item for v in range(vp) for item in stage_tensors(v * pp + s, chunks[v * pp + s])
            )
            for name, full in rank_tensors:
                key, lead, lead_size = dist_key(
                    name, num_layers=num_layers, num_experts=num_experts, renames=renames,
                    per_layer=per_layer_keys, vision_layers=vision_layers,
                )  # fmt: skip
                global_size = torch.Size((*lead_size, *full.shape))
                md = tensors_md.setdefault(
                    key,
                    TensorStorageMetadata(TensorProperties(dtype=full.dtype), global_size, []),
                )
                if md.size != global_size or md.properties.dtype != full.dtype:
                    raise ValueError(
                        f"{name}: shape {tuple(global_size)} / {full.dtype} differs from other "
                        f"layers' {tuple(md.size)} / {md.properties.dtype} under key {key}"
                    )
                expert = expert_index(name)
                owner = expert // per_rank if ep > 1 and expert is not None else 0
                for off, size in tp_chunks(name, full.shape, tp, te_spec=te_spec):
                    region = full[tuple(slice(o, o + n) for o, n in zip(off, size, strict=True))]
                    offsets = torch.Size((*lead, *off))
                    sizes = torch.Size((1,) * len(lead) + tuple(size))
                    chunk = ChunkStorageMetadata(offsets=offsets, sizes=sizes)
                    md.chunks.append(chunk)
                    items[owner].append(
                        WriteItem(
                            index=MetadataIndex(key, offsets),
                            type=WriteItemType.SHARD,
                            tensor_data=TensorWriteData(
                                chunk=chunk, properties=md.properties, size=global_size
                            ),
                        )
                    )
                    data[(key, tuple(offsets))] = region.reshape(sizes).clone()
                if progress is not None:
                    progress(1)
            for e in range(ep):
                plan = SavePlan(items[e], storage_data=_StoragePrefix(f"__{s * ep + e}_"))
                results.append(writer.write_data(plan, _Resolver(data)).wait())
            del data
        writer.finish(Metadata(state_dict_metadata=dict(tensors_md)), results)
        namespace = argparse.Namespace(
            **{
                **dict(args or {}),
                **parallel_args(
                    tp, pp, ep, first_stage_layers, last_stage_layers, vp, pipeline_layout
                ),
                "num_layers": num_layers,
                "iteration": iteration,
                "ckpt_format": "torch_dist",
            }
        )
        common = {
            "args": namespace,
            "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": iteration,
        }
        torch.save(common, it_dir / COMMON_FILE)
        (it_dir / METADATA_JSON).write_text(json.dumps(_BACKEND))
        (tmp / LATEST_FILE).write_text(f"{iteration}\n")
        publish_folder(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            metadata = load_dcp_metadata(self.path)
            if getattr(metadata, "storage_meta", None) is None:
                from torch.distributed.checkpoint.metadata import StorageMeta

                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            if metadata.planner_data is None:
                metadata.planner_data = {}
            return metadata

    return SafeReader(path)


class DistCheckpoint:
    """A Megatron ``torch_dist`` checkpoint (a save folder or an ``iter_XXXXXXX`` folder)."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        iteration: int | str | None = None,
        trusted_globals: tuple[str, ...] = (),
    ) -> None:
        root = Path(root)
        if is_dist_checkpoint(root):
            self.dir = root
        else:
            it = iteration if iteration is not None else read_latest_iteration(root)
            self.dir = iteration_dir(root, it)
        if not is_dist_checkpoint(self.dir):
            raise FileNotFoundError(
                f"{self.dir} has no {METADATA_JSON}: not a Megatron distributed checkpoint"
            )
        config = json.loads((self.dir / METADATA_JSON).read_text())
        if config.get("sharded_backend") != "torch_dist":
            raise ValueError(
                f"{self.dir}: sharded_backend {config.get('sharded_backend')!r} is not supported "
                "(only 'torch_dist'; convert zarr checkpoints with Megatron-LM first)"
            )
        common = (
            load_pt(self.dir / COMMON_FILE, trusted_globals=trusted_globals, inert_untrusted=True)
            if (self.dir / COMMON_FILE).is_file()
            else {}
        )
        args = common.get("args")
        self.args: dict[str, Any] = vars(args) if isinstance(args, argparse.Namespace) else {}
        self.checkpoint_version = common.get("checkpoint_version")
        self.iteration = common.get("iteration")
        self.metadata = _reader(self.dir).read_metadata()

    def keys(self) -> dict[str, tuple[int, ...]]:
        """DCP tensor key -> global shape (object entries such as ``_extra_state`` left out)."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        return {
            k: tuple(v.size)
            for k, v in self.metadata.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)
        }

    def iter_tensors(
        self,
        *,
        renames: tuple[tuple[str, str], ...] = (),
        grouped_gemm: bool = False,
        max_bytes: int = 2**30,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Full Megatron tensors with global layer numbers.

        DCP keys are read in batches of at most ``max_bytes`` (a key larger than that alone), so
        peak memory is about one batch. ``renames``: the local layer spec's renames, undone
        (pass them for local-spec names).
        """
        import torch.distributed.checkpoint as dcp

        batch: list[str] = []
        size = 0
        keys = self.keys()
        for n, key in enumerate(keys):
            md = self.metadata.state_dict_metadata[key]
            batch.append(key)
            size += md.properties.dtype.itemsize * math.prod(md.size)
            if size < max_bytes and n + 1 < len(keys):
                continue
            targets = {
                k: torch.zeros(
                    tuple(keys[k]), dtype=self.metadata.state_dict_metadata[k].properties.dtype
                )
                for k in batch
            }
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(targets, storage_reader=_reader(self.dir), no_dist=True)
            for k in batch:
                chunks = self.metadata.state_dict_metadata[k].chunks
                n_lead = _leading_dims(k)
                target = targets.pop(k)
                for lead in sorted({tuple(c.offsets[:n_lead]) for c in chunks}):
                    name = _name_of(k, lead, renames=renames, grouped_gemm=grouped_gemm)
                    yield name, target[lead].clone() if lead else target
                del target
            batch, size = [], 0
