"""LoRA dropout with masks keyed by the data, the same under any data-, tensor-, pipeline- and
context-parallel layout of a language or vision-language model.

LoRA applies dropout to the adapter's input (``(alpha / r) B A dropout(x)``, Hu et al. 2021,
arXiv:2106.09685; PEFT's ``lora_dropout``). Drawn from a generator's stream, a mask depends on
the order the stream is consumed in: data-parallel ranks and micro-batching split a batch
differently from one process, and under tensor parallelism a column-parallel layer's
replicated input needs one mask on every tensor-parallel rank while a row-parallel layer's
input holds only the rank's features (Megatron-LM draws the first from a tensor-parallel-
synchronized RNG state and the second from a per-rank one, ``get_cuda_rng_tracker``, so its
masks are not one process's either).

Here the keep/drop decision of one element is a counter-based hash (murmur3's 32-bit
finalizer, Appleby 2008, as a Philox-style stateless generator: Salmon et al. 2011, "Parallel
random numbers: as easy as 1, 2, 3") of the run's seed, the LoRA layer's index, the token's
place in the data stream and the feature's index: ``(epoch, document, offset)`` of the token,
from the loader's ``pieces``. Any data-parallel split, micro-batching, row balancing,
activation recomputation, resumption, column-parallel layer (all features, on every rank) or
row-parallel layer (its features' slice, ``feature_offset``) draws the single process's mask.

:class:`KeyedDropoutLoader` computes each micro-batch's token keys as the loader yields a step
and queues them (this rank's shard of them under context parallelism, ``shard``: the same
:func:`forge_parallel.context_parallel.shard_sequence` cut, zigzag or contiguous, that the
step applies to the micro-batch's tokens, so a shard's layers get its own tokens' keys); a
forward pre-hook on the model (:func:`attach_keyed_dropout`) takes the next micro-batch's keys
for each training forward. LoRA layers are numbered once, in the whole model's module order,
when :func:`forge_train.lora.apply_lora` wraps them, so a pipeline stage's layers keep the
single process's indices.

Pipeline stages (``stages``) do not run a step's micro-batches in order, one forward and
backward after the other: the schedule runs micro-batch ``i + 1``'s forward before ``i``'s
backward (1F1B), interleaves virtual stages, and the zero-bubble schedules run a weight-
gradient pass later still. Each stage's forward is therefore wrapped to take the keys of the
micro-batch the pipeline runtime says it runs (``StageModule.microbatch``, the index into the
step's queue; the stages see hidden states, not tokens, so the keys come from the queue, not
from the inputs). The forward's own masks are saved with it for backward; a block the stage
recomputes in backward (activation checkpointing) replays its forward later, after other
micro-batches' forwards, so with ``replay`` the stage forward also runs inside a
:class:`MicrobatchKeys` function mode holding its keys: forge-parallel's checkpoint re-enters
the forward's function modes around the recomputation
(:func:`forge_parallel.replay_checkpoint.checkpoint_block`), and :class:`KeyedDropout` takes
the innermost such mode's keys before the shared ``current``. (A pass-through function mode
costs about a microsecond per torch call on this CPU, so it is entered only with recompute.)

A vision-language model's language-model layers are keyed as a language model's: its loaders
(:mod:`forge_train.vlm_data`, :mod:`forge_train.vlm_stream`) give every micro-batch ``pieces``
too, one per packed sample (a sample is never split), its identity ``(epoch, sample)`` (the
in-memory set: the sample's index in it; the shards: the shard's index in ``data.paths``'
shard list and the raw sample's in the shard), stable across resumption and data-parallel
splits. Their vision encoder's and projector's layers (``lora.targets`` matching ``vision.*``
/ ``projector.*``; :attr:`KeyedDropout.part`) take no token keys: a row there is a tile's
patch, a Qwen2.5-VL window-ordered patch or a merged patch group. The micro-batch's
``visual_pieces`` give, in the encoder's order (images, then videos, samples in row order),
each sample's block of ``pixel_values`` rows: ``(stream, epoch, sample, 0, rows)``. A forward
pre-hook on the encoder and on the projector (:func:`attach_visual_keys`) picks the blocks of
the visual inputs of the call (all of them for the micro-batch's one joined call, one stream's
for a projector that takes each kind apart; a stand-in image, ``dummy_visual`` or a missing
kind's, which joins with zero weight, one block of its own), and a layer with ``n`` input rows
keys row ``j`` of a block of ``b`` of the call's ``B`` pixel rows, ``b n / B`` rows there, by
``(block identity, j)`` (:class:`VisualCall`). An encoder's rows are item-major in every layout
(Qwen2.5-VL's window order permutes a frame's patches only within the item, by its grid), so
the key of a row is the single process's under any data-, tensor- or context-parallel layout
(the encoder runs whole on every tensor- and context-parallel rank). Under pipeline parallelism
the decoupled encoder (:mod:`forge_train.vlm_pipeline`) runs every micro-batch's encoding
inside :meth:`DropoutKeys.encoding`, the keys of the micro-batch it encodes (a
:class:`MicrobatchKeys` mode with ``replay``, as its blocks recomputed in backward run after
the other micro-batches' encodings).

The mask itself is forge-kernels' ``keyed_dropout`` op (one definition of the hash, shared with
its Triton kernel): on a GPU the kernel hashes the mask in registers in the forward and again in
the backward, so a LoRA layer keeps only its micro-batch's token keys for backward, not a
``[tokens, features]`` mask (the eager reference, on CPU, materializes and saves it).
"""

from __future__ import annotations

import collections
import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from forge_kernels.dropout import keyed_dropout, keyed_dropout_mask, mix32

__all__ = [
    "DropoutKeys",
    "KeyedDropout",
    "KeyedDropoutLoader",
    "MicrobatchKeys",
    "VisualCall",
    "VisualKeys",
    "attach_keyed_dropout",
    "attach_visual_keys",
    "dropout_mask",
    "layer_salt",
    "token_keys",
]

_MASK32 = 0xFFFFFFFF


@functools.cache  # called by every adapted layer's forward: a few tensor ops, once per layer
def layer_salt(*, seed: int, layer: int) -> int:
    """The uint32 salt of LoRA layer ``layer``'s masks in a run seeded ``seed``."""
    return int(mix32(torch.tensor((seed * 0x2545F491 + layer * 0x9E3779B9 + 1) & _MASK32)))


def token_keys(pieces: torch.Tensor, *, rows: int, seq_len: int) -> torch.Tensor:
    """One int64 key per slot of a collated micro-batch (``rows * seq_len``, rows back to back)
    from its ``pieces`` (``(row, epoch, doc, start, length)`` per document piece, in row order,
    the loader's audit field): a hash of the token's ``(epoch, doc, start + offset)``; padding
    slots get ``-1``."""
    p = pieces.to(torch.int64).cpu().numpy()
    keys = np.full(rows * seq_len, -1, dtype=np.int64)
    if p.size:
        row, epoch, doc, start, length = p.T
        first = np.cumsum(length) - length  # each piece's first token among all tokens
        row_first = np.zeros(rows, dtype=np.int64)
        starts_of_row = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
        row_first[row[starts_of_row]] = first[starts_of_row]
        in_row = first - row_first[row]  # the piece's first slot within its row
        n = int(length.sum())
        offset = np.arange(n) - np.repeat(first, length)  # token index within its piece
        slots = np.repeat(row * seq_len + in_row, length) + offset
        ids = torch.from_numpy(np.stack([np.repeat(epoch, length), np.repeat(doc, length),
                                         np.repeat(start, length) + offset]))  # fmt: skip
        h = mix32(ids[0] + 0x9E3779B9)
        h = mix32(h ^ ids[1] ^ ((ids[1] >> 32) * 0x27D4EB2F))
        h = mix32(h ^ ids[2] ^ ((ids[2] >> 32) * 0x165667B1))
        keys[slots] = h.numpy()
    return torch.from_numpy(keys)


def dropout_mask(
    keys: torch.Tensor, *, features: int, feature_offset: int, p: float, seed: int, layer: int
) -> torch.Tensor:
    """``[tokens, features]`` bool keep-mask of features ``feature_offset ..
    feature_offset + features`` for the tokens ``keys`` (:func:`token_keys`) in LoRA layer
    ``layer``: forge-kernels' ``keyed_dropout_mask`` salted with :func:`layer_salt` (an element
    is kept when its hash is at least ``p * 2**32``)."""
    return keyed_dropout_mask(
        keys,
        features=features,
        p=p,
        salt=layer_salt(seed=seed, layer=layer),
        feature_offset=feature_offset,
    )


class VisualCall:
    """The ``pixel_values`` blocks of one encoder or projector call (``identity``: ``[blocks,
    3]`` int64 ``(stream, epoch, sample)``; ``rows``: each block's pixel rows) and the row keys
    of its layers (:meth:`row_keys`, cached per row count)."""

    def __init__(self, identity: np.ndarray, rows: np.ndarray) -> None:
        self.identity, self.rows = identity, rows
        self.total = int(rows.sum())
        self._keys: dict[tuple[int, str], torch.Tensor] = {}

    def row_keys(self, n: int, device: torch.device) -> torch.Tensor:
        """One key per input row of a layer that gets ``n`` rows from this call: a block of
        ``b`` of the call's ``B`` pixel rows has ``b n / B`` consecutive rows there (an encoder
        keeps its items' rows together, a tile's patches or a merged group in proportion), row
        ``j`` of it keyed by ``(stream, epoch, sample, j)``. ``ValueError`` when ``n`` does not
        split so (a layer whose rows are not in proportion to the pixel rows)."""
        cached = self._keys.get((n, str(device)))
        if cached is not None:
            return cached
        per_block = self.rows * n
        if self.total == 0 or (per_block % self.total).any():
            raise ValueError(
                f"LoRA dropout: a vision or projector layer got {n} input rows from a call on "
                f"{self.total} pixel_values rows in blocks of {self.rows.tolist()}; keyed "
                "dropout needs each block's rows in proportion (a fixed number of layer rows "
                "per pixel row, or of pixel rows per layer row); leave this layer out of "
                "lora.targets or set lora.dropout=0"
            )
        counts = per_block // self.total
        first = np.cumsum(counts) - counts
        local = torch.from_numpy(np.arange(n, dtype=np.int64) - np.repeat(first, counts))
        ids = torch.from_numpy(np.repeat(self.identity, counts, axis=0))
        h = mix32(ids[:, 1] + 0x7F4A7C15)
        h = mix32(h ^ ids[:, 2] ^ ((ids[:, 2] >> 32) * 0x27D4EB2F) ^ (ids[:, 0] * 0x165667B1))
        h = mix32(h ^ local ^ 0x5BD1E995)
        keys = self._keys[(n, str(device))] = h.to(device)
        return keys


class VisualKeys:
    """A micro-batch's ``visual_pieces`` (``[blocks, 5]``: ``(stream, epoch, sample, 0,
    rows)`` per sample and stream, images then videos; stream 0: image, 1: video), the blocks
    of the encoder's ``pixel_values`` rows (see the module docstring)."""

    #: The identity of a stand-in image's block (``dummy_visual``, a missing kind's tile).
    STAND_IN = (-1, -1, -1)

    def __init__(self, pieces: torch.Tensor) -> None:
        p = pieces.to(torch.int64).cpu().numpy().reshape(-1, 5)
        self.identity, self.rows = p[:, :3].copy(), p[:, 4].copy()
        self._calls: dict[tuple[int, str | None], VisualCall] = {}

    def call(self, rows: int, kind: str | None) -> VisualCall:
        """The blocks of a call on ``rows`` pixel rows of ``kind`` (``"image"`` / ``"video"``):
        the micro-batch's (all streams, joined), one stream's (a projector taking each kind
        apart), or else a stand-in's, one block."""
        found = self._calls.get((rows, kind))
        if found is not None:
            return found
        streams = {"image": 0, "video": 1}
        if int(self.rows.sum()) == rows:
            which = np.ones(len(self.rows), dtype=bool)
        else:
            which = self.identity[:, 0] == streams.get(kind, -2)
            if int(self.rows[which].sum()) != rows or not which.any():
                which = None
        if which is None:
            found = VisualCall(np.array([self.STAND_IN], dtype=np.int64), np.array([rows]))
        else:
            found = VisualCall(self.identity[which], self.rows[which])
        self._calls[(rows, kind)] = found
        return found


class DropoutKeys:
    """The token keys of the micro-batches of the current step, in forward order (``queue``;
    pipeline stages index it by micro-batch), and those of the forward being run (``current``;
    ``None``: no keys, stateful dropout). A vision-language model's also: each micro-batch's
    :class:`VisualKeys` (``visual_queue``; ``None`` for one without), the forward's
    (``visual``) and the blocks of the last call of each visual part (``parts``: ``"vision"``
    / ``"projector"`` -> :class:`VisualCall`, set by :func:`attach_visual_keys`' hooks)."""

    def __init__(self, *, seed: int) -> None:
        self.seed = seed
        self.queue: collections.deque[torch.Tensor] = collections.deque()
        self.current: torch.Tensor | None = None
        self.visual_queue: collections.deque[VisualKeys | None] = collections.deque()
        self.visual: VisualKeys | None = None
        self.parts: dict[str, VisualCall] = {}

    @contextlib.contextmanager
    def encoding(self, microbatch: int, *, replay: bool) -> Iterator[None]:
        """Run a decoupled encoder's call (:mod:`forge_train.vlm_pipeline`) on the step's
        ``microbatch``-th micro-batch inside: its visual keys, in a :class:`MicrobatchKeys`
        mode with ``replay`` (blocks recomputed in backward, after the other micro-batches'
        encodings, see the module docstring)."""
        if not 0 <= microbatch < len(self.visual_queue):
            raise RuntimeError(
                f"LoRA dropout: the encoder ran micro-batch {microbatch}, which has no keys "
                f"({len(self.visual_queue)} queued this step)"
            )
        self.visual, self.parts = self.visual_queue[microbatch], {}
        if not replay:
            yield
            return
        with MicrobatchKeys(None, visual=self.visual):
            yield


class MicrobatchKeys(TorchFunctionMode):
    """A pass-through function mode holding the token keys of the micro-batch a pipeline
    stage's forward runs (``keys``; ``None`` in a decoupled encoder's call, which holds its
    ``visual`` keys and its parts' calls, ``parts``): a block recomputed in backward replays
    its forward under the same mode object (forge-parallel's ``checkpoint_block``), so its
    masks are its forward's even when other micro-batches' forwards ran in between (see the
    module docstring)."""

    def __init__(self, keys: torch.Tensor | None, *, visual: VisualKeys | None = None) -> None:
        super().__init__()
        self.keys, self.visual = keys, visual
        self.parts: dict[str, VisualCall] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _innermost(want: Callable[[MicrobatchKeys], bool]) -> MicrobatchKeys | None:
    """The innermost :class:`MicrobatchKeys` mode entered for which ``want`` holds, or None."""
    from torch.overrides import _get_current_function_mode_stack

    for mode in reversed(_get_current_function_mode_stack()):
        if isinstance(mode, MicrobatchKeys) and want(mode):
            return mode
    return None


def _mode_keys() -> torch.Tensor | None:
    """The token keys of the innermost :class:`MicrobatchKeys` mode holding some, or ``None``."""
    mode = _innermost(lambda m: m.keys is not None)
    return None if mode is None else mode.keys


class KeyedDropout(nn.Dropout):
    """``nn.Dropout`` whose mask is :func:`dropout_mask`'s (forge-kernels' ``keyed_dropout``, the
    mask regenerated in backward) while keys are set (a :class:`MicrobatchKeys` mode's, else
    ``keys.current``; ``keys`` and, for a row-parallel layer's feature shard,
    ``feature_offset`` are set by :func:`attach_keyed_dropout`, ``layer`` by
    :func:`forge_train.lora.apply_lora`), and from the generator otherwise. A layer of a
    vision-language model's encoder or projector (``part``: ``"vision"`` / ``"projector"``,
    set by :func:`attach_visual_keys`) keys its rows by their call's pixel blocks
    (:class:`VisualCall`) instead."""

    keys: DropoutKeys | None = None
    layer: int = 0
    feature_offset: int = 0
    part: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        tokens = x.shape[:-1].numel()
        current = None
        if self.keys is not None and self.part is not None:
            current = self._visual_keys(tokens, x.device)
        elif self.keys is not None:
            current = _mode_keys()
            if current is None:
                current = self.keys.current
        if current is None:
            return F.dropout(x, self.p, True)
        if current.numel() != tokens:
            raise ValueError(
                f"LoRA dropout: the micro-batch's keys cover {current.numel()} tokens but the "
                f"layer got {tokens}; keyed dropout needs each forward to see one whole "
                "micro-batch, or its context-parallel shard with the keys cut alike"
            )
        return keyed_dropout(
            x,
            current,
            p=self.p,
            salt=layer_salt(seed=self.keys.seed, layer=self.layer),
            feature_offset=self.feature_offset,
        )

    def _visual_keys(self, rows: int, device: torch.device) -> torch.Tensor:
        """The row keys of this vision / projector layer's input: its part's current call's
        (a decoupled encoder's mode's, else ``keys.parts``)."""
        mode = _innermost(lambda m: self.part in m.parts)
        call = mode.parts[self.part] if mode is not None else self.keys.parts.get(self.part)
        if call is None:
            raise RuntimeError(
                f"LoRA dropout: a {self.part} layer ran in training with no visual keys; its "
                "part's calls must take them (attach_visual_keys) from the micro-batch's "
                "visual_pieces (forge_train.vlm_data.collate_micro_batches)"
            )
        return call.row_keys(rows, device)


class KeyedDropoutLoader:
    """A training loader (forge_data's ``PackedLoader``, or a vision-language run's) that also
    queues each micro-batch's :func:`token_keys` in ``keys`` as it yields a step (``shard``:
    this rank's part of a micro-batch's ``[rows * seq_len]`` keys, its context-parallel shard)
    and, for a batch with ``visual_pieces``, its :class:`VisualKeys`; everything else is the
    loader's."""

    def __init__(
        self,
        loader: Any,
        keys: DropoutKeys,
        *,
        seq_len: int,
        shard: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self._loader, self._keys, self._seq_len = loader, keys, seq_len
        self._shard = shard

    def __iter__(self):
        return self

    def __next__(self) -> list[dict[str, torch.Tensor]]:
        batches = next(self._loader)
        self._keys.queue.clear()
        self._keys.visual_queue.clear()
        for batch in batches:
            rows = batch["input_ids"].numel() // self._seq_len
            keys = token_keys(batch["pieces"], rows=rows, seq_len=self._seq_len)
            self._keys.queue.append(keys if self._shard is None else self._shard(keys))
            visual = batch.get("visual_pieces")
            self._keys.visual_queue.append(None if visual is None else VisualKeys(visual))
        return batches

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


def attach_keyed_dropout(
    model: nn.Module,
    keys: DropoutKeys,
    *,
    row_parallel: dict[nn.Module, int],
    stages: Sequence[nn.Module] | None = None,
    replay: bool = False,
) -> int:
    """Key the dropout of every LoRA layer of ``model`` with ``keys`` (``row_parallel``: LoRA
    layer -> index of its first input feature on this rank, for row-parallel layers) and make
    each training forward take its micro-batch's keys: without ``stages`` a forward pre-hook
    on ``model`` takes the next queued ones; with them (this rank's pipeline ``StageModule`` s)
    each stage's forward takes those of the micro-batch it runs, inside a
    :class:`MicrobatchKeys` mode with ``replay`` (its blocks recomputed in backward; see the
    module docstring). Returns how many layers were keyed."""
    from forge_train.lora import LoRALinear

    count = 0
    for module in model.modules():
        if isinstance(module, LoRALinear) and isinstance(module.dropout, KeyedDropout):
            module.dropout.keys = keys
            module.dropout.feature_offset = row_parallel.get(module, 0)
            count += 1
    if stages is not None:
        for stage in stages:
            _key_stage(stage, keys, replay=replay)
        return count

    def take_keys(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        if not mod.training:
            return
        if not keys.queue:
            raise RuntimeError(
                "LoRA dropout: a training forward with no micro-batch keys left; each forward "
                "must run one micro-batch of a step the keyed loader yielded"
            )
        ids = kwargs.get("input_ids", args[0] if args else None)
        keys.current = keys.queue.popleft().to(ids.device if ids is not None else "cpu")
        keys.visual = keys.visual_queue.popleft() if keys.visual_queue else None
        keys.parts = {}

    model.register_forward_pre_hook(take_keys, with_kwargs=True)
    return count


#: A vision-language model's parts whose layers take visual keys, with the position of their
#: forward's ``VisualInputs`` argument (``vision(visual)``, ``projector(features, visual)``).
VISUAL_PARTS = {"vision": 0, "projector": 1}


def attach_visual_keys(roots: Sequence[nn.Module], keys: DropoutKeys) -> int:
    """Key the LoRA dropout of the vision encoder and projector of each of ``roots`` (modules
    with ``vision`` / ``projector`` children: a ``VisionLanguageModel``, a pipeline's
    ``VisualEncoder``; a part met twice is keyed once) by their calls' pixel blocks: a forward
    pre-hook on each part takes the :class:`VisualCall` of the call's visual inputs from the
    micro-batch's :class:`VisualKeys` (``keys.visual``, or a decoupled encoder's
    :class:`MicrobatchKeys` mode's, :meth:`DropoutKeys.encoding`). Call after
    :func:`attach_keyed_dropout`. Returns how many layers take visual keys."""
    from forge_train.lora import LoRALinear

    seen: set[int] = set()
    count = 0
    for root in roots:
        for part, where in VISUAL_PARTS.items():
            module = getattr(root, part, None)
            if module is None or id(module) in seen:
                continue
            seen.add(id(module))
            layers = [
                m.dropout
                for m in module.modules()
                if isinstance(m, LoRALinear) and isinstance(m.dropout, KeyedDropout)
            ]
            if not layers:
                continue
            for dropout in layers:
                dropout.keys, dropout.part = keys, part
            count += len(layers)
            module.register_forward_pre_hook(
                functools.partial(_take_visual_call, keys=keys, part=part, where=where),
                with_kwargs=True,
            )
    return count


def _take_visual_call(
    module: nn.Module, args: tuple, kwargs: dict, *, keys: DropoutKeys, part: str, where: int
) -> None:
    """Forward pre-hook of a visual part (:func:`attach_visual_keys`): the blocks of this call's
    ``VisualInputs`` become the part's current :class:`VisualCall`."""
    if not module.training:
        return
    visual = args[where] if len(args) > where else kwargs.get("visual")
    mode = _innermost(lambda m: m.visual is not None)
    micro = mode.visual if mode is not None else keys.visual
    if micro is None:
        raise RuntimeError(
            f"LoRA dropout: the {part} ran in training without the micro-batch's visual keys; "
            "a vision-language run's batches carry visual_pieces "
            "(forge_train.vlm_data.collate_micro_batches) and each training forward must run "
            "one micro-batch the keyed loader yielded"
        )
    call = micro.call(int(visual.pixel_values.shape[0]), getattr(visual, "kind", None))
    (mode.parts if mode is not None else keys.parts)[part] = call


def _key_stage(stage: nn.Module, keys: DropoutKeys, *, replay: bool) -> None:
    """Wrap pipeline stage ``stage``'s forward (a ``forge_parallel`` ``StageModule``: its
    ``microbatch`` and ``in_schedule`` are set by the pipeline runtime) to run with the keys of
    its micro-batch, the ``stage.microbatch``-th of the step's queue. The runtime's shape
    inference (not ``in_schedule``) and evaluation run without keys."""
    dropouts = [m for m in stage.modules() if isinstance(m, KeyedDropout) and m.keys is keys]
    if not dropouts:
        return
    forward = stage.forward

    @functools.wraps(forward)
    def keyed_forward(*args: Any, **kwargs: Any) -> Any:
        if not (stage.in_schedule and dropouts[0].training):
            keys.current = None
            return forward(*args, **kwargs)
        i = stage.microbatch
        if not 0 <= i < len(keys.queue):
            raise RuntimeError(
                f"LoRA dropout: pipeline micro-batch {i} has no keys ({len(keys.queue)} "
                "queued this step); each schedule step must run the micro-batches of one step "
                "the keyed loader yielded"
            )
        device = args[0].device if args and isinstance(args[0], torch.Tensor) else None
        if device is not None and keys.queue[i].device != device:
            keys.queue[i] = keys.queue[i].to(device)  # once per step: later stages reuse it
        keys.current = keys.queue[i]
        if not replay:
            return forward(*args, **kwargs)
        with MicrobatchKeys(keys.current):
            return forward(*args, **kwargs)

    stage.forward = keyed_forward
