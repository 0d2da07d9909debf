"""Deterministic, resumable, load-balanced loader of packed rows.

The global sample order does not depend on the data-parallel size: epoch ``e`` shuffles the
documents with ``seed`` and ``e``, packs them (:func:`~forge_data.packing.pack_documents`), and
the epochs' rows form one stream; global step ``k`` takes the next ``global_batch_rows`` rows of
that stream. Only then are the step's rows spread over ``dp_size`` ranks x micro-batches by the
load-aware balancer (:mod:`forge_data.balance`). Every rank computes the same plan with no
communication and keeps its own part.

The loader's state is the position in the stream (step, epoch, row); the seed, sequence length,
global batch and dataset fingerprint are stored to refuse a mismatched resume. Resuming with the
same ``dp_size`` reproduces the uninterrupted run batch for batch; with another ``dp_size`` each
global step still holds exactly the same rows, so no sample is lost or repeated.

A step is assembled from flat arrays of its pieces (no per-token Python): the dataset joins the
pieces' tokens with one slice of its memory map per piece (:meth:`TokenDataset.gather`,
:meth:`~forge_data.mixture.MixtureDataset.gather`; any dataset with ``document(i)`` also works,
one call per piece), and
:func:`~forge_data.collate.collate_flat` builds the tensors with whole-array operations.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from forge_data.balance import BalanceReport, CostModel, QuadraticCost, balance_step, group_by
from forge_data.collate import collate_flat
from forge_data.document_balance import balance_step_documents
from forge_data.indexed import IndexedDataset
from forge_data.packing import PackingPlan, pack_documents

__all__ = ["LoaderConfig", "PackedLoader", "TokenDataset", "gather_pieces", "gather_spans"]

STATE_VERSION = 1


def _manifest_prefixes(folder: Path) -> list[Path]:
    """The shard prefixes a ``forge-preprocess`` folder's ``manifest.json`` lists; every way
    it can be wrong (no folder, no manifest, a damaged one) is named with the path at fault."""
    if not folder.exists():
        raise ValueError(
            f"preprocessed data folder {folder} does not exist: pass the --out folder of a "
            "forge-preprocess run"
        )
    if not folder.is_dir():
        raise ValueError(
            f"{folder} is a file: pass the folder a forge-preprocess run wrote (its --out), "
            "which holds manifest.json and the shards"
        )
    manifest = folder / "manifest.json"
    if not manifest.exists():
        raise ValueError(f"{folder} has no manifest.json: is it a forge-preprocess output?")
    try:
        shards = json.loads(manifest.read_text())["shards"]
        return [folder / shard["prefix"] for shard in shards]
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{manifest} is not valid JSON ({err}): the file is damaged; run forge-preprocess "
            "again into a new folder"
        ) from err
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"{manifest} does not list shards as a forge-preprocess manifest does "
            f'({{"shards": [{{"prefix": ...}}, ...]}}; {type(err).__name__}: {err}): '
            "run forge-preprocess again into a new folder"
        ) from err


class TokenDataset:
    """The documents of several indexed shards, numbered globally in shard order.

    ``source`` is a ``forge-preprocess`` output folder (its ``manifest.json`` lists the shards)
    or a list of shard prefixes.
    """

    def __init__(self, source: str | os.PathLike | list[str | os.PathLike]):
        if isinstance(source, str | os.PathLike):
            prefixes = _manifest_prefixes(Path(source))
        else:
            prefixes = [Path(p) for p in source]
        if not prefixes:
            raise ValueError("a TokenDataset needs at least one shard")
        self.shards = [IndexedDataset(p) for p in prefixes]
        counts = np.array([len(s) for s in self.shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self.lengths = np.concatenate([s.lengths for s in self.shards]).astype(np.int64)
        # Each document's shard, and where it starts in that shard's token array.
        self._shard_of = np.repeat(np.arange(counts.size), counts)
        self._offsets = np.concatenate([np.asarray(s.offsets[:-1]) for s in self.shards])
        self._tokens = [s.tokens for s in self.shards]
        self._masks = [s.masks for s in self.shards]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def document(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Token ids and loss mask (``None`` without one) of global document ``i``."""
        s = int(np.searchsorted(self._starts, i, side="right")) - 1
        shard = self.shards[s]
        local = i - int(self._starts[s])
        return shard[local], shard.loss_mask(local)

    def gather(
        self, docs: np.ndarray, starts: np.ndarray, lengths: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens ``[starts[j], starts[j] + lengths[j])`` of documents ``docs[j]``, back to back
        (``int64``), and their loss mask as booleans (``None`` when no shard has one; True for
        documents of shards without one). One slice of a shard's map per piece, no per-token
        work."""
        return gather_spans(
            self._tokens, self._masks, self._shard_of[docs], self._offsets[docs] + starts, lengths
        )

    def spans(self) -> tuple[list[np.ndarray], list[np.ndarray | None], np.ndarray, np.ndarray]:
        """Where the documents' tokens lie: the shards' token arrays and loss-mask arrays
        (``None`` without one), and for every document the index of its array and its offset
        there (what :class:`~forge_data.mixture.MixtureDataset` composes to gather directly)."""
        return self._tokens, self._masks, self._shard_of, self._offsets

    @property
    def fingerprint(self) -> dict[str, int]:
        return {
            "documents": len(self),
            "tokens": int(self.lengths.sum()),
            "lengths_crc32": zlib.crc32(self.lengths.tobytes()),
        }


def gather_spans(
    arrays: list[np.ndarray],
    masks: list[np.ndarray | None],
    which: np.ndarray,
    offsets: np.ndarray,
    lengths: np.ndarray,
) -> tuple[np.ndarray, np.ndarray | None]:
    """``arrays[which[j]][offsets[j] : offsets[j] + lengths[j]]`` back to back (``int64``), and
    the same spans of ``masks`` as booleans (True for arrays without a mask; ``None`` when none
    has one): one slice per span."""
    spans = list(zip(which.tolist(), offsets.tolist(), lengths.tolist(), strict=True))
    ids = _join([arrays[w][o : o + n] for w, o, n in spans], np.int64)
    if all(m is None for m in masks):
        return ids, None
    keep = _join(
        [np.ones(n, np.uint8) if masks[w] is None else masks[w][o : o + n] for w, o, n in spans],
        np.uint8,
    )
    return ids, keep != 0


def _join(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts, dtype=dtype) if parts else np.zeros(0, dtype=dtype)


def gather_pieces(dataset, docs: np.ndarray, starts: np.ndarray, lengths: np.ndarray):
    """The pieces' tokens back to back and their loss mask (see :meth:`TokenDataset.gather`),
    through ``document(i)`` for datasets without a ``gather`` of their own."""
    if hasattr(dataset, "gather"):
        return dataset.gather(docs, starts, lengths)
    ids, keep, masked = [], [], False
    for d, s, n in zip(docs.tolist(), starts.tolist(), lengths.tolist(), strict=True):
        tokens, mask = dataset.document(d)
        ids.append(tokens[s : s + n])
        masked |= mask is not None
        keep.append(np.ones(n, bool) if mask is None else np.asarray(mask[s : s + n]) != 0)
    return _join(ids, np.int64), _join(keep, bool) if masked else None


@dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    """``global_batch_rows`` rows of ``seq_len`` tokens per optimizer step, fed to each rank as
    micro-batches of ``micro_batch_rows`` rows; must be a multiple of
    ``dp_size * micro_batch_rows``.

    ``move_documents`` (with ``balance``, at ``dp_size > 1``) lets the balancer also exchange
    documents between rows of different ranks (:mod:`forge_data.document_balance`), for data
    where some rows are much costlier than others (images, long documents); a step then holds
    the same pieces as without it, in other rows. The cost model must be additive over
    documents, as the built-in ones are.
    """

    seq_len: int
    global_batch_rows: int
    micro_batch_rows: int = 1
    seed: int = 0
    shuffle: bool = True
    pack_window: int = 64
    overlong: Literal["split", "truncate", "skip"] = "split"
    balance: bool = True
    move_documents: bool = False

    def __post_init__(self):
        for name in ("seq_len", "global_batch_rows", "micro_batch_rows", "pack_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.global_batch_rows % self.micro_batch_rows:
            raise ValueError(
                f"global_batch_rows={self.global_batch_rows} is not a multiple of "
                f"micro_batch_rows={self.micro_batch_rows}"
            )


# State fields that must match on resume (dp_size and micro_batch_rows may change).
_PINNED = ("seed", "seq_len", "global_batch_rows", "shuffle", "pack_window", "overlong")


class PackedLoader:
    """Yields, for each optimizer step, this rank's list of micro-batches (dicts of tensors, see
    :func:`~forge_data.packing.collate_rows`, plus ``pieces``: ``(row, epoch, doc, start,
    length)`` of every document piece, for auditing)."""

    def __init__(
        self,
        dataset: TokenDataset,
        config: LoaderConfig,
        *,
        dp_rank: int,
        dp_size: int,
        pad_id: int = 0,
        cost_model: CostModel | None = None,
    ):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(
                f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}"
            )
        per_step = dp_size * config.micro_batch_rows
        if config.global_batch_rows % per_step:
            raise ValueError(
                f"global_batch_rows={config.global_batch_rows} is not a multiple of dp_size "
                f"({dp_size}) x micro_batch_rows ({config.micro_batch_rows}) = {per_step}"
            )
        if len(dataset) == 0 or dataset.lengths.sum() == 0:
            raise ValueError("the dataset holds no tokens")
        self.dataset = dataset
        self.config = config
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.micro_batches = config.global_batch_rows // per_step
        self.pad_id = pad_id
        self.cost_model = cost_model if cost_model is not None else QuadraticCost()
        self.step = 0
        self._epoch = 0
        self._row = 0
        self._plans: dict[int, PackingPlan] = {}
        self.last_report: BalanceReport | None = None

    # -- plan ----------------------------------------------------------------------------------
    def plan(self, epoch: int) -> PackingPlan:
        """The packing plan of ``epoch`` (the same on every rank and for every ``dp_size``)."""
        if epoch not in self._plans:
            n = len(self.dataset)
            if self.config.shuffle:
                order = np.random.default_rng([self.config.seed, epoch]).permutation(n)
            else:
                order = np.arange(n)
            plan = pack_documents(
                order,
                self.dataset.lengths,
                seq_len=self.config.seq_len,
                window=self.config.pack_window,
                overlong=self.config.overlong,
            )
            if plan.num_rows == 0:
                raise ValueError(
                    f"epoch {epoch} packs into no rows (stats: {plan.stats}): every document "
                    f"was skipped"
                )
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = plan
        return self._plans[epoch]

    def _take_rows(self) -> list[tuple[int, int, int]]:
        """The next ``global_batch_rows`` rows of the stream, as ``(epoch, first, end)`` runs."""
        runs, taken = [], 0
        while taken < self.config.global_batch_rows:
            plan = self.plan(self._epoch)
            take = min(plan.num_rows - self._row, self.config.global_batch_rows - taken)
            runs.append((self._epoch, self._row, self._row + take))
            self._row += take
            taken += take
            if self._row == plan.num_rows:
                self._epoch, self._row = self._epoch + 1, 0
        return runs

    # -- iteration -----------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> list[dict[str, torch.Tensor]]:
        # The step's pieces as flat arrays: rows in stream order, pieces in row order.
        epochs, docs, starts, lengths, counts = [], [], [], [], []
        for epoch, first, end in self._take_rows():
            plan = self.plan(epoch)
            a, b = int(plan.row_offsets[first]), int(plan.row_offsets[end])
            epochs.append(np.full(b - a, epoch, dtype=np.int64))
            docs.append(plan.doc[a:b])
            starts.append(plan.start[a:b])
            lengths.append(plan.length[a:b])
            counts.append(np.diff(plan.row_offsets[first : end + 1]))
        self.step += 1
        epoch, doc, start, length, counts = map(
            np.concatenate, (epochs, docs, starts, lengths, counts)
        )
        n_rows = counts.size
        row_of = np.repeat(np.arange(n_rows), counts)
        if self.config.balance and self.config.move_documents and self.dp_size > 1:
            piece_costs = self.cost_model.row_costs(length, np.arange(length.size), length.size)
            row_of, layout, self.last_report = balance_step_documents(
                row_of,
                length,
                piece_costs,
                n_rows=n_rows,
                seq_len=self.config.seq_len,
                dp_size=self.dp_size,
                micro_batches=self.micro_batches,
                rank=self.dp_rank,
            )
            # Pieces regrouped by their new row (in step order within a row).
            regroup = group_by(row_of, n_rows)
            epoch, doc, start, length = (x[regroup] for x in (epoch, doc, start, length))
            counts = np.bincount(row_of, minlength=n_rows)
            mine = layout[self.dp_rank]
        elif self.config.balance:
            costs = self.cost_model.row_costs(length, row_of, n_rows)
            layout, self.last_report = balance_step(
                costs, dp_size=self.dp_size, micro_batches=self.micro_batches, rank=self.dp_rank
            )
            mine = layout[self.dp_rank]
        else:
            costs = self.cost_model.row_costs(length, row_of, n_rows)
            per_rank = self.micro_batches * self.config.micro_batch_rows
            mine = np.arange(per_rank * self.dp_rank, per_rank * (self.dp_rank + 1)).reshape(
                self.micro_batches, -1
            )
            loads = costs.reshape(self.dp_size, per_rank).sum(axis=1)
            ratio = float(loads.max() / loads.mean())
            self.last_report = BalanceReport(naive=ratio, balanced=ratio)
        first_piece = np.cumsum(counts) - counts
        batches = []
        for rows in mine:
            # Pieces of the micro-batch's rows, row after row.
            n = counts[rows]
            sel = np.repeat(first_piece[rows] - (np.cumsum(n) - n), n) + np.arange(n.sum())
            ids, keep = gather_pieces(self.dataset, doc[sel], start[sel], length[sel])
            batch = collate_flat(
                ids, length[sel], n, seq_len=self.config.seq_len, pad_id=self.pad_id, keep=keep
            )
            row = np.repeat(np.arange(rows.size), n)
            batch["pieces"] = torch.from_numpy(
                np.stack([row, epoch[sel], doc[sel], start[sel], length[sel]], axis=1)
            )
            batches.append(batch)
        return batches

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume; the same on every rank (store it once)."""
        pinned = {k: v for k, v in asdict(self.config).items() if k in _PINNED}
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "epoch": self._epoch,
            "row": self._row,
            "config": pinned,
            "dataset": self.dataset.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} != {STATE_VERSION}")
        mine = {k: v for k, v in asdict(self.config).items() if k in _PINNED}
        for key, value in state["config"].items():
            if mine.get(key) != value:
                raise ValueError(
                    f"cannot resume: the checkpoint's loader has {key}={value!r} but this one "
                    f"{mine.get(key)!r}; the sample order depends on it (dp_size and "
                    "micro_batch_rows may change, it may not)"
                )
        if state["dataset"] != self.dataset.fingerprint:
            raise ValueError(
                f"cannot resume: the checkpoint was taken on a dataset {state['dataset']} "
                f"but this one is {self.dataset.fingerprint}"
            )
        self.step, self._epoch, self._row = (
            int(state["step"]),
            int(state["epoch"]),
            int(state["row"]),
        )
