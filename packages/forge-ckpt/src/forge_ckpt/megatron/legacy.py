"""Megatron-LM's legacy checkpoint format: one ``model_optim_rng.pt`` per model-parallel rank.

Layout (see :mod:`forge_ckpt.megatron.layout`)::

    root/latest_checkpointed_iteration.txt          "100"
    root/iter_0000100/mp_rank_00_000/model_optim_rng.pt
        {"model": {<stage-local state dict of tensor-parallel rank 0, pipeline stage 0>},
         "args": argparse.Namespace(...), "checkpoint_version": 3.0, "iteration": 100}

:func:`save_legacy` writes full (unsharded) Megatron tensors split by
:mod:`~forge_ckpt.megatron.tensor_parallel` and pipeline stage, one stage in memory at a time,
into a temporary folder renamed into place. :class:`LegacyCheckpoint` reads any split back,
stage by stage, merging the tensor-parallel shards (loaded with ``weights_only=True``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from forge_ckpt.atomic_folder import publish_folder
from forge_ckpt.megatron.layout import (
    LATEST_FILE,
    RANK_DIR,
    iteration_dir,
    layer_of,
    rank_dir_name,
    read_latest_iteration,
    renumber,
    stage_layers,
)
from forge_ckpt.megatron.safe_load import load_pt
from forge_ckpt.megatron.tensor_parallel import merge_tp, split_tp

__all__ = ["CHECKPOINT_VERSION", "LegacyCheckpoint", "save_legacy"]

CHECKPOINT_VERSION = 3.0
MODEL_FILE = "model_optim_rng.pt"


def _own(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a storage of its own (``torch.save`` writes a view's whole storage)."""
    t = t.detach().contiguous()
    return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t


def _stage_of(name: str, stages: Sequence[range]) -> int:
    layer = layer_of(name)
    if layer is None:
        return 0 if name.startswith("embedding.") else len(stages) - 1
    for s, layers in enumerate(stages):
        if layer in layers:
            return s
    raise ValueError(f"{name}: layer {layer} is beyond the {stages[-1].stop} layers")


def save_legacy(
    root: str | os.PathLike,
    stage_tensors: Callable[[int, range], Iterable[tuple[str, torch.Tensor]]],
    *,
    num_layers: int,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    args: Mapping[str, Any] | None = None,
    iteration: int = 0,
    te_spec: bool = True,
    tied_embeddings: bool = False,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write a legacy Megatron checkpoint into ``root`` (atomically: a temporary sibling folder
    is renamed into place).

    ``stage_tensors(stage, layers)`` yields the full Megatron tensors (global layer numbers) of
    one pipeline stage: the embedding on stage 0, ``layers``, the final norm and output layer on
    the last stage. ``args`` becomes the ``argparse.Namespace`` Megatron-LM stores (the parallel
    sizes are filled in). With tied embeddings and several stages, the last stage holds
    ``output_layer.weight`` as Megatron does (a copy of the embedding it keeps in sync).
    """
    root = Path(root)
    tp, pp = int(tensor_parallel), int(pipeline_parallel)
    if tp < 1:
        raise ValueError(f"tensor_parallel must be >= 1, got {tp}")
    stages = stage_layers(num_layers, pp)
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise ValueError(f"{root} is not empty; pass overwrite=True or pick a new folder")
    namespace = argparse.Namespace(
        **{
            **dict(args or {}),
            "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": pp,
            "num_layers": num_layers,
            "iteration": iteration,
        }
    )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        it_dir = iteration_dir(tmp, iteration)
        embedding: list[torch.Tensor] | None = None
        for s, layers in enumerate(stages):
            shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
            for name, full in stage_tensors(s, layers):
                if _stage_of(name, stages) != s:
                    raise ValueError(f"{name} was given for pipeline stage {s}, where it is not")
                local = renumber(name, -layers.start)
                parts = split_tp(name, full, tp, te_spec=te_spec)
                for r in range(tp):
                    shards[r][local] = _own(parts[r])
                if name == "embedding.word_embeddings.weight":
                    embedding = parts
                if progress is not None:
                    progress(1)
            if tied_embeddings and pp > 1 and s == pp - 1:
                if embedding is None:
                    raise AssertionError("the embedding comes before the last stage")
                for r in range(tp):
                    shards[r]["output_layer.weight"] = embedding[r].clone()
            for r in range(tp):
                folder = it_dir / rank_dir_name(r, s, pp)
                folder.mkdir(parents=True)
                state = {
                    "model": shards[r],
                    "args": namespace,
                    "checkpoint_version": CHECKPOINT_VERSION,
                    "iteration": iteration,
                }
                torch.save(state, folder / MODEL_FILE)
            del shards
        (tmp / LATEST_FILE).write_text(f"{iteration}\n")
        publish_folder(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


class LegacyCheckpoint:
    """A legacy Megatron checkpoint folder, read one pipeline stage at a time.

    Args:
        root: the save folder (with ``latest_checkpointed_iteration.txt``) or an
            ``iter_XXXXXXX`` folder itself.
        iteration: which iteration (default: the latest).
        trusted_globals: classes besides ``argparse.Namespace`` to allow in the pickles (see
            :func:`~forge_ckpt.megatron.safe_load.load_pt`).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        iteration: int | str | None = None,
        trusted_globals: Sequence[str] = (),
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"Megatron checkpoint folder {root} does not exist")
        if any(RANK_DIR.match(p.name) for p in root.iterdir()):
            self.dir = root
        else:
            self.dir = iteration_dir(
                root, iteration if iteration is not None else read_latest_iteration(root)
            )
        if not self.dir.is_dir():
            raise FileNotFoundError(f"{self.dir} does not exist")
        ranks: dict[tuple[int, int], Path] = {}
        for p in self.dir.iterdir():
            match = RANK_DIR.match(p.name)
            if match and (p / MODEL_FILE).is_file():
                ranks[(int(match.group(1)), int(match.group(2) or 0))] = p / MODEL_FILE
        if not ranks:
            raise FileNotFoundError(
                f"{self.dir} holds no mp_rank_XX[_YYY]/{MODEL_FILE} files: not a legacy Megatron "
                "checkpoint (a distributed one has metadata.json; see MegatronDistCheckpoint)"
            )
        self.tensor_parallel = 1 + max(t for t, _ in ranks)
        self.pipeline_parallel = 1 + max(p for _, p in ranks)
        want = {(t, p) for t in range(self.tensor_parallel) for p in range(self.pipeline_parallel)}
        if set(ranks) != want:
            raise FileNotFoundError(
                f"{self.dir}: rank files missing for (tp, pp) = {sorted(want - set(ranks))}"
            )
        self._files = ranks
        self._trusted = tuple(trusted_globals)
        first = self._load(0, 0)
        self.args: dict[str, Any] = (
            vars(first["args"]) if isinstance(first.get("args"), argparse.Namespace) else {}
        )
        self.checkpoint_version = first.get("checkpoint_version")
        self.iteration = first.get("iteration")
        for key, have in (
            ("tensor_model_parallel_size", self.tensor_parallel),
            ("pipeline_model_parallel_size", self.pipeline_parallel),
        ):
            if key in self.args and int(self.args[key]) != have:
                raise ValueError(
                    f"{self.dir}: args say {key}={self.args[key]} but the folder has {have}"
                )

    def _load(self, tp_rank: int, pp_rank: int) -> dict:
        state = load_pt(self._files[(tp_rank, pp_rank)], trusted_globals=self._trusted)
        if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
            raise ValueError(f"{self._files[(tp_rank, pp_rank)]} holds no 'model' state dict")
        return state

    def iter_tensors(
        self, *, te_spec: bool = True, skip: Callable[[str], bool] | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Full tensors with global layer numbers, one pipeline stage in memory at a time.

        ``_extra_state`` entries (Transformer Engine metadata) are dropped; ``skip(name)``
        drops more (e.g. the last stage's copy of tied embeddings).
        """
        offset = 0
        for s in range(self.pipeline_parallel):
            states = [self._load(r, s)["model"] for r in range(self.tensor_parallel)]
            names = [n for n, t in states[0].items() if isinstance(t, torch.Tensor)]
            for r, st in enumerate(states[1:], start=1):
                other = sorted(n for n, t in st.items() if isinstance(t, torch.Tensor))
                if other != sorted(names):
                    raise ValueError(
                        f"{self.dir}: tensor-parallel rank {r} of stage {s} holds other tensors than rank 0"
                    )
            layers = {layer_of(n) for n in names} - {None}
            for name in names:
                if name.endswith("_extra_state"):
                    continue
                full = renumber(name, offset)
                if skip is not None and skip(full):
                    continue
                yield full, merge_tp(name, [st[name] for st in states], te_spec=te_spec)
            offset += (max(layers) + 1) if layers else 0
            del states
