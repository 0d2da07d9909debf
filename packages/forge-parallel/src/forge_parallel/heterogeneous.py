"""Heterogeneous parallelism: each sub-module of one model gets its own layout, in one job.

A vision-language model's vision encoder is small (tensor parallelism would only add
communication) while its language model is large: :func:`parallelize_submodules` gives each
named part its own tensor-parallel degree and plan, data-parallel mode, recompute and offload,
all over the same ranks. Each part's mesh is derived from the world: a part with ``tp=t`` runs
on ``ParallelDims(world_size=W, tp=t, dp_replicate=r, dp_shard=-1)``, so a ``tp=1`` part is
data parallel over all ``W`` ranks and a ``tp=2`` part over ``W / 2`` (each pair of adjacent
ranks is one tensor-parallel group; ranks are laid out with ``tp`` innermost).

**The data layout.** The model's inputs arrive split along the batch over all ``W`` ranks (as a
data loader for a ``tp=1`` job splits them), and its outputs leave in that layout, so training
code (loss, labels) does not change. A part with ``tp=t > 1`` converts at its boundary, the
``f``/``g`` pair of Megatron-LM (Shoeybi et al. 2019) applied to the batch dimension:

- entering, batch-major tensor inputs are all-gathered along dim 0 over the part's ``tp``
  group (the part sees its data-parallel rank's rows, replicated across its tensor-parallel
  ranks); backward keeps this rank's rows of the (identical, replicated) gradient, times ``t``;
- leaving, tensor outputs are split back to this rank's rows; backward all-gathers the
  gradient rows and divides by ``t``.

Which tensors cross as rows is decided by shape, by one rule for inputs and outputs
(:func:`_boundary_kind`), against the batch's row count: on entry, dim 0 of the part's first
tensor argument (``B``: ``input_ids``, ``pixel_values``); on exit, the row counts gathered on
entry. 0-d tensors pass unchanged both ways. On entry:

- dim 0 == ``B``: batch-major, gathered;
- dim 0 == 1 (while ``B > 1``), or a 1-D vector whose length is not ``B``: broadcast over the
  batch (``position_ids`` ``(1, S)``, an ``(S,)`` mask), passed unchanged. After the gather
  every rank of the group computes every rank's rows, so such a tensor must be the same on
  all of them: a ``ValueError`` otherwise (checked with a fingerprint of its values, in the
  one small all-gather of every input's shape that each call makes);
- any other tensor of 2 or more dims: rows that follow the batch's rows in order (a VLM's
  visual features, one row per image placeholder of the batch), gathered; each rank must
  hold the same number of them.

A tensor shared by the batch whose shape looks like rows (an ``(S, S)`` mask, an
``(H, S, S)`` bias) would be gathered: give it a leading dim of 1 (``(1, S, S)``), as
broadcasting expects anyway. A tensor with the batch along dim 1 (M-RoPE's ``(3, B, S)``
positions) is refused. On exit only batch-major outputs are split: those whose dim 0 is a
row count gathered on entry. Any other non-scalar tensor (a per-expert load, a statistic:
the same on every rank of the group) raises a ``ValueError`` naming its shape, as splitting
it would hand each rank a different slice.

The factors keep every part's gradient averaging exact: a ``tp=t`` part averages gradients
over ``W / t`` ranks, each of which computed the mean of its ``t`` ranks' losses. A shared
input that needs a gradient gets that mean's gradient on each rank of the group, which the
data-parallel average of whatever produced it turns into the single-process gradient. Every rank
of a tensor-parallel group must hold the same number of rows (a ``ValueError`` naming the
counts otherwise: drop or pad a short last batch).

``SubmoduleParallel(batch_boundary=False)`` drops the conversion: the caller loads the same
batch on the ranks of each tensor-parallel group (a data loader over the ``tp > 1`` part's
data-parallel ranks, as for a plain tensor-parallel job), so inputs arrive replicated. A
``tp=1`` part then averages its gradients over ``W`` ranks holding ``t`` equal copies of each
data-parallel rank's batch: the data-parallel mean again. Packed rows (one row per rank,
documents delimited by ``cu_seqlens``) need this layout: gathering them along the batch would
make rows of several packs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from forge_parallel.config import CompileConfig, FSDPConfig, OffloadConfig, RecomputeConfig
from forge_parallel.context_parallel.config import CPConfig
from forge_parallel.data_parallel import no_gradient_sync
from forge_parallel.expert_parallel import EPConfig
from forge_parallel.parallelize import ParallelizeResult, parallelize
from forge_parallel.tensor_parallel import TPPlan

__all__ = ["HeterogeneousResult", "SubmoduleParallel", "gather_batch", "parallelize_submodules"]


@dataclass(frozen=True, kw_only=True)
class SubmoduleParallel:
    """The layout of one part of a model (the keyword arguments of :func:`parallelize`).

    ``tp``: tensor-parallel degree (needs ``plan``, with patterns relative to the part).
    ``dp_replicate``: replica groups (HSDP / DDP); the rest of ``W / tp`` shards.
    ``data_parallel``: ``"auto"``, ``"fsdp"``, ``"hsdp"``, ``"ddp"`` or ``None``.
    ``cp`` / ``context_parallel``: context parallelism for this part (a language model reading
    long sequences), as :func:`parallelize`'s; the part's FSDP then shards over
    ``dp_shard x cp``. The caller feeds the part its sequence shard
    (:func:`~forge_parallel.context_parallel.shard_sequence`); a part without ``cp`` sees
    the same inputs on the ``cp`` ranks (e.g. a vision encoder run on the whole batch) and
    averages its gradients over all of them. ``ep`` / ``expert_parallel``: expert parallelism
    for this part's MoE experts (a MoE language model; patterns relative to the part), as
    :func:`parallelize`'s: the experts are sharded over ``ep`` ranks taken from
    ``dp_shard x cp`` and FSDP shards them over the rest; the part's other modules, and the
    other parts, are data-parallel as without it. ``compile``: ``torch.compile`` this part's
    blocks (``True`` or a ``CompileConfig``; :func:`~forge_parallel.apply_compile`).
    """

    tp: int = 1
    plan: TPPlan | Mapping[str, str | ParallelStyle] | None = None
    dp_replicate: int = 1
    data_parallel: str | None = "auto"
    fsdp: FSDPConfig | None = None
    recompute: RecomputeConfig | None = None
    offload: OffloadConfig | None = None
    blocks: str | None = None
    batch_boundary: bool = True
    cp: int = 1
    context_parallel: CPConfig | None = None
    ep: int = 1
    expert_parallel: EPConfig | None = None
    compile: bool | CompileConfig = False

    def __post_init__(self) -> None:
        for name in ("tp", "dp_replicate", "cp", "ep"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.tp > 1 and self.plan is None:
            raise ValueError(
                f"tp={self.tp} needs a tensor-parallel plan for this part, e.g. "
                "SubmoduleParallel(tp=2, plan={'layers.*.attn.q_proj': 'colwise', ...})"
            )
        if self.cp > 1 and self.context_parallel is None:
            raise ValueError(
                f"cp={self.cp} needs context_parallel=CPConfig(...) for this part (ring or "
                "Ulysses attention)"
            )
        if self.ep > 1 and self.expert_parallel is None:
            raise ValueError(
                f"ep={self.ep} needs expert_parallel=EPConfig(experts='<pattern of the experts "
                "modules, relative to the part>') for this part"
            )
        if self.data_parallel in ("zero1", "zero2"):
            raise ValueError(
                f"data_parallel={self.data_parallel!r} lives in the optimizer, which is shared by "
                "all parts; use 'fsdp', 'hsdp' or 'ddp' per part"
            )


def _split_rows(t: torch.Tensor, size: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s rows of ``t`` split into ``size`` equal parts along dim 0."""
    if t.shape[0] % size:
        raise ValueError(
            f"heterogeneous batch boundary: a {tuple(t.shape)} tensor has {t.shape[0]} rows, "
            f"which do not split over the {size} ranks of a tp={size} part's tensor-parallel "
            f"group ({t.shape[0]} % {size} = {t.shape[0] % size}); only batch-major tensors "
            "(dim 0 = rows) cross the boundary: return other tensors from outside the part, "
            "or use SubmoduleParallel(batch_boundary=False)"
        )
    return t.narrow(0, rank * (t.shape[0] // size), t.shape[0] // size)


def _rows(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _split_rows(t, dist.get_world_size(group), dist.get_rank(group))


def _boundary_kind(shape: torch.Size, rows: Collection[int]) -> str:
    """How a tensor of ``shape`` crosses a heterogeneous boundary whose batch has ``rows`` rows
    (the one rule for inputs and outputs; see the module docstring).

    ``"scalar"``: 0-d, passes unchanged. ``"batch"``: dim 0 is a row count of the batch,
    gathered on entry and split on exit. ``"shared"``: broadcast over the batch's rows (dim 0
    of 1, or a 1-D vector whose length is not a row count): passed unchanged on entry, where it
    must be equal on the group's ranks. ``"rows"``: any other tensor, rows that follow the
    batch's rows (a VLM's visual features): gathered on entry. The decision is by shape only,
    so that every rank of the group, holding same-shaped inputs, takes the same collectives.
    """
    if len(shape) == 0:
        return "scalar"
    if shape[0] in rows:
        return "batch"
    if shape[0] == 1 or len(shape) == 1:
        return "shared"
    return "rows"


def _check_batch_major(t: torch.Tensor, rows: Collection[int], size: int) -> None:
    """``ValueError`` unless ``t`` (an output of a ``tp=size`` part) is batch-major: its dim 0
    is a row count the boundary gathered on the way in (``rows``).

    Splitting any other tensor along dim 0 would hand each rank a different slice of a value
    that is the same on all of them (an aux loss's per-expert load, a statistic): silently
    wrong, or an error deep in autograd when the length does not divide. A non-batch tensor
    whose length happens to equal a gathered row count cannot be told apart and is split:
    return such values as 0-d tensors, or outside the part.
    """
    if _boundary_kind(t.shape, rows) in ("scalar", "batch"):
        return
    gathered = ", ".join(str(r) for r in sorted(rows)) or "none (no tensor input)"
    raise ValueError(
        f"heterogeneous batch boundary: a tp={size} part returned a {tuple(t.shape)} tensor "
        f"whose dim 0 ({t.shape[0]}) is not a row count the boundary gathered on entry "
        f"({gathered}: each rank's rows x {size}), so it is not batch-major and cannot be split "
        "back to each rank's rows; return only batch-major tensors (or 0-d ones) from the "
        "part, or use SubmoduleParallel(batch_boundary=False) and load the same batch on the "
        "ranks of each tensor-parallel group"
    )


#: Per tensor input, the numbers the ranks of a tp group compare: ndim, dim 0, numel and two
#: sums of the values (the fingerprint of a shared input; 0 for the others).
_META = 5


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    """Two float64 sums of ``t``'s values (plain and position-weighted): equal on every rank
    when ``t`` is, and different for any accidental difference in practice. NaN and infinities
    map to fixed numbers so that equal tensors holding them compare equal."""
    x = t.detach()
    if x.is_complex():
        x = torch.view_as_real(x)
    x = torch.nan_to_num(x.reshape(-1).to(torch.float64), nan=0.5, posinf=1.5, neginf=-1.5)
    weights = torch.arange(1, x.numel() + 1, dtype=torch.float64, device=x.device)
    return torch.stack([x.sum(), (x * weights).sum()])


def _input_meta(t: torch.Tensor, kind: str, device: torch.device) -> torch.Tensor:
    shape = torch.tensor([t.ndim, t.shape[0], t.numel()], dtype=torch.float64, device=device)
    fingerprint = _fingerprint(t).to(device) if kind == "shared" else shape.new_zeros(2)
    return torch.cat([shape, fingerprint])


def _rows_error(shape: torch.Size, counts: list[int], size: int, ranks: Collection[int]) -> str:
    return (
        f"heterogeneous batch boundary: the ranks {list(ranks)} of a tp={size} part's "
        f"tensor-parallel group hold {counts} rows (dim 0 of a {tuple(shape)} input on this "
        "rank); each rank of the part's tp group must hold the same number of rows: drop or "
        "pad the last, short batch (e.g. DataLoader(drop_last=True))"
    )


def _decide_inputs(
    shapes: list[torch.Size], table: list[list[list[float]]], size: int, ranks: Collection[int]
) -> list[str]:
    """The :func:`_boundary_kind` of each tensor input (``shapes``, this rank's), checked
    against the group: ``table[r][k]`` holds rank ``r``'s :data:`_META` numbers of input ``k``.

    The batch's row count is dim 0 of the first input. ``ValueError`` (raised on every rank
    alike, as they all read the same table) when the ranks disagree: unequal batches, a shared
    input that differs, rows whose count differs, or the batch along dim 1 of a tensor.
    """
    batch = shapes[0][0]
    kinds = []
    for k, shape in enumerate(shapes):
        kind = _boundary_kind(shape, {batch})
        column = [table[r][k] for r in range(size)]
        ndims, counts = {int(c[0]) for c in column}, [int(c[1]) for c in column]
        if kind == "batch" and (len(ndims) > 1 or set(counts) != {batch}):
            raise ValueError(_rows_error(shape, counts, size, ranks))
        if kind == "shared" and any(c != column[0] for c in column):
            why = "dim 0 of 1" if len(shape) > 1 else f"a vector whose length is not {batch}"
            raise ValueError(
                f"heterogeneous batch boundary: a {tuple(shape)} input of a tp={size} part is "
                f"broadcast over the batch of {batch} rows ({why}), so it enters the part "
                f"unchanged, but its shape or values differ across the ranks {list(ranks)} of "
                "the part's tensor-parallel group; the part computes every rank's rows "
                "together, so a per-rank value cannot apply to them: give it the batch "
                f"dimension ({batch}, ...) so that it is gathered with the rows, or use "
                "SubmoduleParallel(batch_boundary=False) and load the same batch on the ranks "
                "of each tensor-parallel group"
            )
        if kind == "rows" and len(shape) >= 3 and shape[1] == batch:
            raise ValueError(
                f"heterogeneous batch boundary: a {tuple(shape)} input of a tp={size} part has "
                f"the batch's {batch} rows along dim 1 (as M-RoPE's (3, B, S) positions); the "
                "boundary gathers rows along dim 0 only: move the batch to dim 0, or use "
                "SubmoduleParallel(batch_boundary=False)"
            )
        if kind == "rows" and (len(ndims) > 1 or len(set(counts)) > 1):
            raise ValueError(
                f"heterogeneous batch boundary: a {tuple(shape)} input of a tp={size} part is "
                f"neither batch-major (dim 0 = the batch's {batch} rows) nor broadcast over the "
                "batch (dim 0 of 1), so it is gathered as rows that follow the batch's rows (a "
                "VLM's visual features), but the ranks "
                f"{list(ranks)} of the part's tensor-parallel group hold {counts} of them; "
                "give every rank the same number (pad), or use "
                "SubmoduleParallel(batch_boundary=False) and load the same batch on the ranks "
                "of each tensor-parallel group"
            )
        kinds.append(kind)
    return kinds


def _input_kinds(tensors: list[torch.Tensor], group: dist.ProcessGroup) -> list[str]:
    """:func:`_decide_inputs` over ``group``: one all-gather of every input's :data:`_META`
    numbers (for the whole call, where gathering each input used to check its rows alone)."""
    size = dist.get_world_size(group)
    batch = tensors[0].shape[0]
    device = tensors[0].device
    local = torch.stack([_input_meta(t, _boundary_kind(t.shape, {batch}), device) for t in tensors])
    table = local.new_empty((size * len(tensors), _META))
    dist.all_gather_into_tensor(table, local, group=group)
    rows = table.view(size, len(tensors), _META).tolist()
    ranks = dist.get_process_group_ranks(group)
    return _decide_inputs([t.shape for t in tensors], rows, size, ranks)


def _all_gather_rows(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    size = dist.get_world_size(group)
    t = t.contiguous()
    out = t.new_empty((size * t.shape[0], *t.shape[1:]))
    dist.all_gather_into_tensor(out, t, group=group)
    return out


def _check_same_rows(t: torch.Tensor, group: dist.ProcessGroup) -> None:
    """``ValueError`` unless every rank of ``group`` holds ``t.shape[0]`` rows: the row counts
    (one integer per rank) are gathered first, so that unequal batches give this error on
    every rank instead of a size-mismatched all-gather (an abort on gloo, a hang or garbage
    on NCCL)."""
    size = dist.get_world_size(group)
    count = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    counts = count.new_empty(size)
    dist.all_gather_into_tensor(counts, count, group=group)
    if bool((counts != count).any()):
        ranks = dist.get_process_group_ranks(group)
        raise ValueError(_rows_error(t.shape, counts.tolist(), size, ranks))


class _GatherBatch(torch.autograd.Function):
    """Forward: all-gather rows over ``group`` (``check``: their counts first). Backward: this
    rank's rows, times the size."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, check: bool) -> torch.Tensor:
        ctx.group = group
        if check:
            _check_same_rows(x, group)
        return _all_gather_rows(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _rows(grad, ctx.group) * dist.get_world_size(ctx.group), None, None


class _ScatterBatch(torch.autograd.Function):
    """Forward: this rank's rows. Backward: all-gather the gradient rows, over the size."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _rows(x, group).contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather_rows(grad, ctx.group) / dist.get_world_size(ctx.group), None


def gather_batch(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Rows of every rank of ``group``, concatenated (the boundary into a ``tp > 1`` part).

    Every rank must hold the same number of rows; a ``ValueError`` naming the counts otherwise
    (checked with one small all-gather of the counts per call)."""
    return _GatherBatch.apply(x, group, True)


def scatter_batch(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's rows of ``x`` (the boundary out of a ``tp > 1`` part)."""
    return _ScatterBatch.apply(x, group)


def _refuse_dtensor(x: torch.Tensor) -> None:
    if hasattr(x, "to_local"):
        raise ValueError(
            "a DTensor crossed the boundary of a part with tp > 1 (e.g. its vocab-sharded "
            "logits); at a heterogeneous boundary inputs and outputs must be plain tensors: use "
            "a replicated-output style such as 'colwise_output_replicated' for its last layer"
        )


def _install_boundary(module: nn.Module, group: dist.ProcessGroup) -> None:
    """Gather the part's batch-major and row inputs along dim 0 on entry, split its outputs on
    exit (:func:`_boundary_kind` decides for each tensor, in ``args`` and ``kwargs`` alike).

    The pre-hook records the row counts it gathered; the post-hook splits only outputs with
    one of them as dim 0 and refuses any other non-scalar tensor (:func:`_check_batch_major`).
    """
    size = dist.get_world_size(group)
    state: dict[str, set[int]] = {"rows": set()}  # the row counts the current call gathered

    def pre_hook(mod, args, kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        where = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.ndim]
        rows: set[int] = set()
        if where:
            for i in where:
                _refuse_dtensor(leaves[i])
            kinds = _input_kinds([leaves[i] for i in where], group)
            for i, kind in zip(where, kinds, strict=True):
                if kind in ("batch", "rows"):
                    leaves[i] = _GatherBatch.apply(leaves[i], group, False)
                    rows.add(leaves[i].shape[0])
        state["rows"] = rows
        return tree_unflatten(leaves, spec)

    def scatter(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.ndim == 0:
            return x
        _refuse_dtensor(x)
        _check_batch_major(x, state["rows"], size)
        return scatter_batch(x, group)

    def post_hook(mod, args, output):
        return tree_map(scatter, output)

    # Before FSDP's pre-forward hook, so FSDP sees the part's own layout.
    module.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True)
    module.register_forward_hook(post_hook)


@dataclass
class HeterogeneousResult:
    """The model with each part parallelized; ``parts[name]`` is that part's result."""

    model: nn.Module
    parts: dict[str, ParallelizeResult]

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.parts))

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Skip gradient reduction in every part (gradient accumulation)."""
        return no_gradient_sync(self.model)

    @contextlib.contextmanager
    def loss_context(self) -> Iterator[None]:
        """Every part's loss context (e.g. ``loss_parallel`` for a vocab-sharded head) at once."""
        with contextlib.ExitStack() as stack:
            for result in self.parts.values():
                stack.enter_context(result.loss_context())
            yield

    def build_optimizer(
        self,
        optimizer_class: Callable[..., torch.optim.Optimizer],
        params: Any = None,
        **kwargs: Any,
    ) -> torch.optim.Optimizer:
        """``optimizer_class(params, **kwargs)`` over all parts (default: every parameter).
        ZeRO parts are refused: one optimizer cannot shard state over several meshes."""
        zero = [n for n, r in self.parts.items() if r.data_parallel in ("zero1", "zero2")]
        if zero:
            raise ValueError(
                f"parts {zero} use ZeRO, whose optimizer shards state over one part's mesh; use "
                "fsdp or ddp for every part of a heterogeneous model"
            )
        return optimizer_class(self.model.parameters() if params is None else params, **kwargs)

    def __str__(self) -> str:
        return "\n".join(f"[{name}] {result.summary}" for name, result in self.parts.items())


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _part_dims(spec: SubmoduleParallel, world: int):
    """The part's ``ParallelDims`` over all ``world`` ranks (its data-parallel shard takes the
    rest: ``dp_shard=-1``)."""
    from forge_core import ParallelDims

    return ParallelDims(
        world_size=world,
        tp=spec.tp,
        cp=spec.cp,
        dp_replicate=spec.dp_replicate,
        dp_shard=-1,
        ep=spec.ep,
    )


def _validate_degrees(part: nn.Module, name: str, spec: SubmoduleParallel, world: int) -> None:
    """``ValueError`` naming the part, the numbers and the valid values when ``spec``'s degrees
    do not fit ``world`` ranks or its experts.

    Checked for every part before any is parallelized: :func:`parallelize` would find the
    same errors, but only when it reaches the part, with the parts before it already changed
    in place (and without the part's name or the values that fit both ranks and experts).
    """

    others = spec.cp * spec.dp_replicate
    if world % (spec.tp * others):
        fits = [d for d in _divisors(world) if world % (d * others) == 0]
        hint = (
            f"with cp={spec.cp} x dp_replicate={spec.dp_replicate}, tp can be {fits}"
            if fits
            else f"cp x dp_replicate = {others} does not divide it either"
        )
        raise ValueError(
            f"part {name!r}: tp={spec.tp} x cp={spec.cp} x dp_replicate={spec.dp_replicate} "
            f"must divide the world size {world}; {hint}"
        )
    if spec.ep > 1:
        from forge_parallel.expert_parallel import validate_ep

        if spec.data_parallel in ("ddp", None):
            raise ValueError(
                f"part {name!r}: ep={spec.ep} needs FSDP/HSDP, which reduces the experts' "
                "gradients over their expert-data-parallel ranks, but data_parallel="
                f"{spec.data_parallel!r}; use data_parallel='auto', 'fsdp' or 'hsdp' for it"
            )
        # The experts are sharded over ep of the part's dp_shard x cp ranks (etp = tp).
        borrowed = world // (spec.tp * spec.dp_replicate)
        try:
            found = validate_ep(part, spec.expert_parallel, 1)
        except ValueError as error:
            raise ValueError(f"part {name!r}: {error}") from None
        experts = {n: next(m.parameters(recurse=False)).shape[0] for n, m in found}
        counts = sorted(set(experts.values()))
        if borrowed % spec.ep or any(e % spec.ep for e in counts):
            fits = [d for d in _divisors(borrowed) if all(e % d == 0 for e in counts)]
            held = (
                f" and the {' / '.join(map(str, counts))} experts of its experts modules "
                f"(e.g. {next(iter(experts))})"
                if counts
                else ""
            )
            raise ValueError(
                f"part {name!r}: ep={spec.ep} must divide the part's dp_shard x cp = {borrowed} "
                f"ranks (world {world} / (tp={spec.tp} x dp_replicate={spec.dp_replicate}), "
                f"over which the experts are sharded){held}; choose ep among {fits}"
            )
    try:  # anything else ParallelDims refuses (and validate_ep at etp = tp), with the part named
        _part_dims(spec, world)
        if spec.ep > 1:
            validate_ep(part, spec.expert_parallel, spec.ep, spec.tp)
    except ValueError as error:
        raise ValueError(f"part {name!r}: {error}") from None


def _validate(model: nn.Module, parts: Mapping[str, SubmoduleParallel], world: int) -> None:
    if not parts:
        raise ValueError("submodules is empty: name at least one part, e.g. {'vision': ...}")
    names = list(parts)
    for name in names:
        if not isinstance(parts[name], SubmoduleParallel):
            raise ValueError(
                f"submodules[{name!r}] must be a SubmoduleParallel, got "
                f"{type(parts[name]).__name__}"
            )
        try:
            model.get_submodule(name)
        except AttributeError:
            children = ", ".join(n for n, _ in model.named_children())
            raise ValueError(
                f"{name!r} is not a sub-module of {type(model).__name__}; its children are "
                f"{children}"
            ) from None
        _validate_degrees(model.get_submodule(name), name, parts[name], world)
    for a in names:
        for b in names:
            if a != b and b.startswith(a + "."):
                raise ValueError(f"parts {a!r} and {b!r} are nested; name disjoint sub-modules")
    uncovered = [
        n
        for n, _ in model.named_parameters()
        if not any(n.startswith(name + ".") for name in names)
    ]
    if uncovered:
        raise ValueError(
            f"{len(uncovered)} parameters belong to no part (e.g. {', '.join(uncovered[:3])}); "
            "every parameter must be in a named part: add their module to submodules"
        )


def parallelize_submodules(
    model: nn.Module, submodules: Mapping[str, SubmoduleParallel]
) -> HeterogeneousResult:
    """Parallelize each named sub-module of ``model`` with its own layout over all ranks.

    ``submodules`` maps a sub-module name (``"vision"``, ``"language_model"``) to its
    :class:`SubmoduleParallel`. Needs the default process group; the model is changed in place.
    """
    if not dist.is_initialized():
        raise RuntimeError("parallelize_submodules needs the default process group")

    world = dist.get_world_size()
    _validate(model, submodules, world)
    parts: dict[str, ParallelizeResult] = {}
    for name, spec in submodules.items():
        dims = _part_dims(spec, world)
        result = parallelize(
            model.get_submodule(name),
            dims,
            context_parallel=spec.context_parallel,
            expert_parallel=spec.expert_parallel,
            plan=spec.plan,
            data_parallel=spec.data_parallel,
            fsdp=spec.fsdp,
            recompute=spec.recompute,
            offload=spec.offload,
            compile=spec.compile,
            blocks=spec.blocks,
        )
        if spec.tp > 1 and spec.batch_boundary:
            _install_boundary(result.model, result.mesh["tp"].get_group())
        parts[name] = result
    return HeterogeneousResult(model=model, parts=parts)
