"""Megatron-LM's legacy checkpoint format: one ``model_optim_rng.pt`` per model-parallel rank.

Layout (see :mod:`forge_ckpt.megatron.layout`)::

    root/latest_checkpointed_iteration.txt          "100"
    root/iter_0000100/mp_rank_00_000/model_optim_rng.pt
        {"model": {<stage-local state dict of tensor-parallel rank 0, pipeline stage 0>},
         "args": argparse.Namespace(...), "checkpoint_version": 3.0, "iteration": 100}
    root/iter_0000100/mp_rank_00_000_001/...        (expert rank 1, with expert parallelism)

:func:`save_legacy` writes full (unsharded) Megatron tensors split by
:mod:`~forge_ckpt.megatron.tensor_parallel`, pipeline stage (even or with given first/last
stage layer counts) and expert rank (:mod:`~forge_ckpt.megatron.expert_parallel`), one stage in
memory at a time, into a temporary folder renamed into place. :class:`LegacyCheckpoint` reads
any split back, stage by stage, merging the tensor-parallel shards and the expert ranks' experts
(loaded with ``weights_only=True``); the layers of each stage are found from its files.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from forge_ckpt.atomic_folder import publish_folder
from forge_ckpt.bits import identical
from forge_ckpt.megatron.expert_parallel import expert_index, with_expert_index
from forge_ckpt.megatron.layout import (
    LATEST_FILE,
    RANK_DIR,
    iteration_dir,
    layer_of,
    on_first_stage,
    parallel_args,
    parse_rank_dir,
    rank_dir_name,
    read_latest_iteration,
    renumber,
)
from forge_ckpt.megatron.safe_load import load_pt
from forge_ckpt.megatron.tensor_parallel import merge_tp, split_tp
from forge_ckpt.megatron.virtual_pipeline import (
    chunk_model_key,
    pipeline_chunks,
    virtual_size_from_args,
    write_split,
)

__all__ = ["CHECKPOINT_VERSION", "LegacyCheckpoint", "save_legacy"]

CHECKPOINT_VERSION = 3.0
MODEL_FILE = "model_optim_rng.pt"
_MTP_MODEL_LAYER = re.compile(r"^(mtp\.layers\.\d+\.)mtp_model_layer\.")
_MODEL_KEY = re.compile(r"^model(\d*)$")
# The (language model's) word embedding, and the output layer a tied model's last stage holds
# beside it (under the same module prefix: ``language_model.`` in a LLaVAModel).
_WORD_EMBEDDING, _OUTPUT_LAYER = "embedding.word_embeddings.weight", "output_layer.weight"


def _chunk_count(state: Mapping[str, Any], file: Path) -> int:
    """How many model chunks a rank file holds: 1 for ``model``, ``vp`` for ``model0`` ..
    ``model{vp-1}`` (Megatron-LM's virtual pipeline stages)."""
    numbers = sorted(int(m.group(1)) for k in state if (m := _MODEL_KEY.match(k)) and m.group(1))
    if "model" in state:
        if numbers:
            raise ValueError(f"{file} holds both 'model' and numbered model chunks")
        return 1
    if numbers != list(range(len(numbers))):
        raise ValueError(
            f"{file} holds model chunks {numbers}; expected model0 .. model{len(numbers) - 1}"
        )
    return len(numbers)


def _own(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a storage of its own (``torch.save`` writes a view's whole storage)."""
    t = t.detach().contiguous()
    return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t


def _stage_of(name: str, stages: Sequence[range]) -> int:
    layer = layer_of(name)
    if layer is None:
        return 0 if on_first_stage(name) else len(stages) - 1
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
    expert_parallel: int = 1,
    num_experts: int = 0,
    first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
    virtual_pipeline: int = 1,
    pipeline_layout: str | None = None,
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
    the last stage. With virtual stages (``virtual_pipeline`` chunks per rank, or the chunks of
    ``pipeline_layout``; see :mod:`~forge_ckpt.megatron.virtual_pipeline`) ``stage`` is the
    chunk's index ``v * pipeline_parallel + r`` and a rank's file holds ``model0``, ``model1``,
    ...; the embedding comes with chunk 0, the last tensors with the last chunk. ``args``
    becomes the ``argparse.Namespace`` Megatron-LM stores (the parallel sizes are filled in).
    With tied embeddings and several stages, the last stage holds ``output_layer.weight`` as
    Megatron does (a copy of the embedding it keeps in sync).
    ``expert_parallel``: expert ranks the ``num_experts`` routed experts are split over (each
    rank's file holds its experts, renumbered from 0, and a copy of everything else).
    ``first_stage_layers`` / ``last_stage_layers``: uneven pipeline stages (see
    :func:`~forge_ckpt.megatron.layout.stage_layers`).
    """
    root = Path(root)
    tp, pp, ep, per_rank, chunks, vp = write_split(
        root, num_layers=num_layers, num_experts=num_experts, tensor_parallel=tensor_parallel,
        pipeline_parallel=pipeline_parallel, expert_parallel=expert_parallel,
        first_stage_layers=first_stage_layers, last_stage_layers=last_stage_layers,
        virtual_pipeline=virtual_pipeline, pipeline_layout=pipeline_layout, overwrite=overwrite,
    )  # fmt: skip
    namespace = argparse.Namespace(
        **{
            **dict(args or {}),
            **parallel_args(tp, pp, ep, first_stage_layers, last_stage_layers, vp, pipeline_layout),
            "num_layers": num_layers,
            "iteration": iteration,
        }
    )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        it_dir = iteration_dir(tmp, iteration)
        embedding: list[torch.Tensor] | None = None
        head = _OUTPUT_LAYER
        for s in range(pp):
            # shards[r][e][v]: the state dict of tensor-parallel rank r, expert rank e, chunk v.
            shards: list[list[list[dict[str, torch.Tensor]]]] = [
                [[{} for _ in range(vp)] for _ in range(ep)] for _ in range(tp)
            ]
            for v in range(vp):
                chunk = v * pp + s
                layers = chunks[chunk]
                for name, full in stage_tensors(chunk, layers):
                    if _stage_of(name, chunks) != chunk:
                        where = f"pipeline stage {s}" + (f", virtual stage {v}" if vp > 1 else "")
                        raise ValueError(f"{name} was given for {where}, where it is not")
                    local = renumber(name, -layers.start)
                    parts = split_tp(name, full, tp, te_spec=te_spec)
                    expert = expert_index(name)
                    for r in range(tp):
                        part = _own(parts[r])
                        if expert is None:
                            for e in range(ep):
                                shards[r][e][v][local] = part
                        else:
                            if expert >= per_rank * ep:
                                raise ValueError(f"{name}: expert {expert} of only {num_experts}")
                            e, j = divmod(expert, per_rank)
                            shards[r][e][v][with_expert_index(local, j)] = part
                    if name.endswith(_WORD_EMBEDDING) and layer_of(name) is None:
                        embedding, head = parts, name[: -len(_WORD_EMBEDDING)] + _OUTPUT_LAYER
                    if progress is not None:
                        progress(1)
                if tied_embeddings and pp > 1 and chunk == len(chunks) - 1:
                    if embedding is None:
                        raise AssertionError("the embedding comes before the last stage")
                    for r in range(tp):
                        copy = embedding[r].clone()
                        for e in range(ep):
                            shards[r][e][v][head] = copy
            for r in range(tp):
                for e in range(ep):
                    folder = it_dir / rank_dir_name(r, s, pp, e, ep)
                    folder.mkdir(parents=True)
                    state = {
                        **{chunk_model_key(v, vp): shards[r][e][v] for v in range(vp)},
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
        names = sorted(
            p.name
            for p in self.dir.iterdir()
            if RANK_DIR.match(p.name) and (p / MODEL_FILE).is_file()
        )
        if not names:
            raise FileNotFoundError(
                f"{self.dir} holds no mp_rank_XX[_YYY[_ZZZ]]/{MODEL_FILE} files: not a legacy "
                "Megatron checkpoint (a distributed one has metadata.json; see DistCheckpoint)"
            )
        self._trusted = tuple(trusted_globals)
        # The args (in every file) decide whether mp_rank_XX_YYY names a stage or an expert rank.
        first = self._load_file(self.dir / names[0] / MODEL_FILE)
        self.args: dict[str, Any] = (
            vars(first["args"]) if isinstance(first.get("args"), argparse.Namespace) else {}
        )
        self.checkpoint_version = first.get("checkpoint_version")
        self.iteration = first.get("iteration")
        expert_parallel = int(self.args.get("expert_model_parallel_size") or 1) > 1
        ranks: dict[tuple[int, int, int], Path] = {}
        for name in names:
            rank = parse_rank_dir(name, expert_parallel=expert_parallel)
            assert rank is not None
            ranks[rank] = self.dir / name / MODEL_FILE
        self.tensor_parallel = 1 + max(t for t, _, _ in ranks)
        self.pipeline_parallel = 1 + max(p for _, p, _ in ranks)
        self.expert_parallel = 1 + max(e for _, _, e in ranks)
        want = {
            (t, p, e)
            for t in range(self.tensor_parallel)
            for p in range(self.pipeline_parallel)
            for e in range(self.expert_parallel)
        }
        if set(ranks) != want:
            raise FileNotFoundError(
                f"{self.dir}: rank files missing for (tp, pp, ep) = {sorted(want - set(ranks))}"
            )
        self._files = ranks
        for key, have in (
            ("tensor_model_parallel_size", self.tensor_parallel),
            ("pipeline_model_parallel_size", self.pipeline_parallel),
            ("expert_model_parallel_size", self.expert_parallel),
        ):
            if self.args.get(key) is not None and int(self.args[key]) != have:
                raise ValueError(
                    f"{self.dir}: args say {key}={self.args[key]} but the folder has {have}"
                )
        self.virtual_pipeline = _chunk_count(first, self.dir / names[0] / MODEL_FILE)
        said = virtual_size_from_args(self.args)
        if said is not None and said != self.virtual_pipeline:
            raise ValueError(
                f"{self.dir}: args say {said} virtual pipeline stage(s) per rank but the files "
                f"hold {self.virtual_pipeline} model chunk(s)"
            )
        etp = self.args.get("expert_tensor_parallel_size")
        if etp is not None and int(etp) != self.tensor_parallel:
            raise ValueError(
                f"{self.dir}: expert tensor parallelism {etp} differs from tensor parallelism "
                f"{self.tensor_parallel}; only checkpoints whose experts are split like the dense "
                "layers (Megatron's default, expert_tensor_parallel_size = tensor parallel) are read"
            )
        #: The global layers of each pipeline stage (of each model chunk, in the order
        #: ``v * pipeline_parallel + r``, with virtual stages), found from the files as they are
        #: read.
        self.stage_layers: list[range] = []

    def _load_file(self, file: Path) -> dict:
        state = load_pt(file, trusted_globals=self._trusted, inert_untrusted=True)
        if not isinstance(state, dict) or not (
            isinstance(state.get("model"), dict) or isinstance(state.get("model0"), dict)
        ):
            raise ValueError(f"{file} holds no 'model' (or 'model0', 'model1', ...) state dict")
        return state

    def _load(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> dict:
        return self._load_file(self._files[(tp_rank, pp_rank, ep_rank)])

    def _chunk(self, tp_rank: int, pp_rank: int, ep_rank: int, key: str) -> dict:
        """One model chunk's state dict (``key``: ``model`` or ``model{v}``) of a rank file."""
        state = self._load(tp_rank, pp_rank, ep_rank)
        if not isinstance(state.get(key), dict):
            file = self._files[(tp_rank, pp_rank, ep_rank)]
            found = sorted(k for k in state if _MODEL_KEY.match(k))
            raise ValueError(
                f"{file} holds {found}, not {key!r}: every rank file must hold the same "
                f"{self.virtual_pipeline} model chunk(s)"
            )
        return state[key]

    def _expected_stages(self) -> list[range] | None:
        """The chunks the args describe (``None`` when they do not say)."""
        layers = self.args.get("num_layers")
        if layers is None:
            return None
        layout = self.args.get("pipeline_model_parallel_layout")
        return pipeline_chunks(
            int(layers),
            self.pipeline_parallel,
            virtual=self.virtual_pipeline,
            first=self.args.get("decoder_first_pipeline_num_layers"),
            last=self.args.get("decoder_last_pipeline_num_layers"),
            layout=layout if isinstance(layout, str) else None,
        )

    def iter_tensors(
        self, *, te_spec: bool = True, skip: Callable[[str], bool] | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Full tensors with global layer and expert numbers, one model chunk (a pipeline stage,
        or one of its virtual stages) in memory at a time, in layer order.

        A chunk's layers are counted in its files (uneven stages need no argument) and checked
        against the args' split when they record one. Tensors other than routed experts must be
        equal on every expert rank. ``_extra_state`` entries (Transformer Engine metadata) are
        dropped; ``skip(name)`` drops more (e.g. the last stage's copy of tied embeddings).
        """
        expected = self._expected_stages()
        offset = 0
        self.stage_layers = []
        tp, ep = self.tensor_parallel, self.expert_parallel
        pp, vp = self.pipeline_parallel, self.virtual_pipeline
        for chunk in range(pp * vp):
            v, s = divmod(chunk, pp)
            key = chunk_model_key(v, vp)
            where = f"stage {s}" + (f" (virtual stage {v})" if vp > 1 else "")
            # states[e][r]: expert rank e, tensor-parallel rank r.
            states = [[self._chunk(r, s, e, key) for r in range(tp)] for e in range(ep)]
            tensors = [
                [{n: t for n, t in st.items() if isinstance(t, torch.Tensor)} for st in row]
                for row in states
            ]
            for e, row in enumerate(tensors):
                for r, st in enumerate(row):
                    if sorted(st) != sorted(tensors[0][0]):
                        raise ValueError(
                            f"{self.dir}: rank (tp={r}, ep={e}) of {where} holds other tensors "
                            "than rank (tp=0, ep=0)"
                        )
            names = list(tensors[0][0])
            local_experts = 1 + max(
                (
                    expert_index(_MTP_MODEL_LAYER.sub(r"\1transformer_layer.", n)) or 0
                    for n in names
                ),
                default=0,
            )
            layers = {layer_of(n) for n in names} - {None}
            count = (max(layers) + 1) if layers else 0
            self.stage_layers.append(range(offset, offset + count))
            if expected is not None and self.stage_layers[-1] != expected[chunk]:
                raise ValueError(
                    f"{self.dir}: pipeline {where} holds layers {self.stage_layers[-1].start}.."
                    f"{self.stage_layers[-1].stop - 1} but the args' split puts "
                    f"{expected[chunk].start}..{expected[chunk].stop - 1} there"
                )
            for name in names:
                if name.endswith("_extra_state"):
                    continue
                # Newer Megatron-Core module trees call the MTP transformer layer mtp_model_layer.
                canonical = _MTP_MODEL_LAYER.sub(r"\1transformer_layer.", name)
                expert = expert_index(canonical)
                for e in range(ep if expert is not None else 1):
                    full = renumber(canonical, offset)
                    if expert is not None:
                        full = with_expert_index(full, e * local_experts + expert)
                    elif ep > 1:
                        self._check_replicated(name, tensors, where)
                    if skip is not None and skip(full):
                        continue
                    shards = [st[name] for st in tensors[e]]
                    yield full, merge_tp(name, shards, te_spec=te_spec)
            offset += count
            del states, tensors

    def _check_replicated(self, name: str, tensors: list[list[dict]], where: str) -> None:
        for e, row in enumerate(tensors[1:], start=1):
            for r, st in enumerate(row):
                if not identical(st[name], tensors[0][r][name]):
                    raise ValueError(
                        f"{self.dir}: {name} ({where}, tp rank {r}) should be the same on "
                        f"every expert rank but expert rank {e} holds different values"
                    )
