"""Cut a plain decoder (embedding -> repeated blocks -> norm -> head) into stage modules.

:func:`decoder_layout` finds the parts of a model from its blocks
(:func:`~forge_parallel.find_blocks`): the modules registered before the blocks' container
(on the path from the root to it) run before the blocks, those registered after run after
them, in registration order. Parameter-free rotary-embedding modules (``transformers``'
``*RotaryEmbedding``) are not run in sequence but on every stage: their
``(cos, sin)`` is passed to each block as ``position_embeddings`` with ``position_ids``.

A :class:`StageModule` holds references to the model's own sub-modules under their original
paths (``layers.3.attn.q_proj`` stays ``layers.3.attn.q_proj``), so tensor-parallel plans,
state dicts and checkpoints name parameters exactly as in the whole model. Nothing is copied:
once the caller drops the model, each rank keeps only its stages' layers.

Blocks that take more than the hidden states (Forge's ``TransformerBlock(h, inputs)`` with the
packed-document boundaries and RoPE tables of the batch) get them per micro-batch:
:meth:`StageModule.set_block_args` sets one tuple of extra positional arguments per
micro-batch, and each forward takes those of the micro-batch the pipeline runtime says it
runs (:attr:`StageModule.microbatch`). :meth:`~forge_parallel.pipeline.Pipeline.step` sets
them from its ``block_args``.

A quantity summed over the layers of *all* stages (e.g. the Switch Transformer balance loss,
whose per-expert token fractions and router probabilities are means over every MoE layer) can
travel with the hidden states: a :class:`StageCarry` set as :attr:`StageModule.carry` makes
every stage but the last output ``(hidden, *carried)`` and every stage but the first take
them as extra inputs; the pipeline runtime sends them on and sends their gradients back like
the hidden states', so a loss the last stage computes from the totals reaches every stage's
parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from forge_parallel.parallelize import find_blocks

__all__ = ["DecoderLayout", "StageCarry", "StageModule", "decoder_layout", "layer_costs"]


@dataclass(frozen=True)
class DecoderLayout:
    """Module paths of a decoder's parts, in execution order."""

    pre: tuple[str, ...]
    blocks: tuple[str, ...]
    post: tuple[str, ...]
    rotary: str | None

    @property
    def blocks_pattern(self) -> str:
        """The pattern matching the blocks (for ``parallelize(..., blocks=...)``)."""
        parent = self.blocks[0].rpartition(".")[0]
        return f"{parent}.*" if parent else "*"


def _is_rotary(module: nn.Module) -> bool:
    return "rotary" in type(module).__name__.lower() and not any(True for _ in module.parameters())


def _is_empty_container(module: nn.Module) -> bool:
    return isinstance(module, nn.ModuleList | nn.ModuleDict) and len(module) == 0


def decoder_layout(model: nn.Module, blocks: str | None = None) -> DecoderLayout:
    """Find embedding / blocks / norm-and-head of ``model`` (see the module docstring)."""
    found = find_blocks(model, blocks)
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList of blocks to split into pipeline "
            "stages; pass blocks='<pattern>' (e.g. 'layers.*')"
        )
    names = [n for n, _ in found]
    parent = names[0].rpartition(".")[0]
    if any(n.rpartition(".")[0] != parent for n in names):
        raise ValueError(f"the blocks must be children of one container, got {names[:4]}...")
    pre: list[str] = []
    post: list[str] = []
    rotary: str | None = None
    # Walk from the root down to the blocks' container, collecting siblings on each level.
    path = parent.split(".") if parent else []
    module, prefix = model, ""
    before_levels: list[list[str]] = []
    after_levels: list[list[str]] = []
    for part in path:
        before, after, seen = [], [], False
        for child_name, child in module.named_children():
            full = prefix + child_name
            if child_name == part:
                seen = True
                continue
            if _is_empty_container(child):  # e.g. an empty ``nn.ModuleList`` of optional heads
                continue
            if _is_rotary(child):
                if rotary is not None:
                    raise ValueError(f"two rotary-embedding modules: {rotary} and {full}")
                rotary = full
                continue
            (after if seen else before).append(full)
        before_levels.append(before)
        after_levels.append(after)
        module, prefix = getattr(module, part), prefix + part + "."
    for level in before_levels:  # outer before inner: outer pre-modules run first
        pre.extend(level)
    for level in reversed(after_levels):  # inner after-modules (norm) run before outer (head)
        post.extend(level)
    return DecoderLayout(pre=tuple(pre), blocks=tuple(names), post=tuple(post), rotary=rotary)


def _numel(model: nn.Module, paths: Sequence[str]) -> int:
    return sum(p.numel() for path in paths for p in model.get_submodule(path).parameters())


def layer_costs(
    model: nn.Module,
    layout: DecoderLayout,
    by: str,
    sample_input: torch.Tensor | None = None,
) -> tuple[list[float], float, float]:
    """Per-block costs and the costs of the pre (embedding) and post (norm, head) parts.

    ``by="layers"``: 1 per block, 0 for the rest; ``"params"``: parameter counts;
    ``"flops"``: forward FLOPs of one run of the whole model on ``sample_input`` (counted by
    ``torch.utils.flop_counter.FlopCounterMode``; an embedding lookup counts 0).
    """
    if by == "layers":
        return [1.0] * len(layout.blocks), 0.0, 0.0
    if by == "params":
        blocks = [float(_numel(model, [b])) for b in layout.blocks]
        return blocks, float(_numel(model, layout.pre)), float(_numel(model, layout.post))
    if by == "flops":
        if sample_input is None:
            raise ValueError("split='flops' counts FLOPs on a sample: pass sample_input=<batch>")
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            StageModule(model, layout, list(layout.blocks), first=True, last=True)(sample_input)
        counts = counter.get_flop_counts()

        def flops(path: str) -> float:
            # FlopCounterMode names modules "<RootClass>.<path>".
            for key, ops in counts.items():
                if key.partition(".")[2] == path:
                    return float(sum(ops.values()))
            return 0.0

        return (
            [flops(b) for b in layout.blocks],
            sum(flops(p) for p in layout.pre),
            sum(flops(p) for p in layout.post),
        )
    raise ValueError(f"unknown cost {by!r}; use 'layers', 'params' or 'flops'")


class StageCarry(Protocol):
    """Tensors that go from stage to stage beside the hidden states (:attr:`StageModule.carry`).

    Each stage's forward calls :meth:`start` first and, at its end, :meth:`send` (every stage
    but the last: what it passes on) or :meth:`finish` (the last stage: its output). One forward
    runs at a time on a rank, so an implementation may keep the running values between the
    calls. They also run in the runtime's metadata inference (``StageModule.in_schedule``
    false), which must see the carried tensors' shapes, dtypes and ``requires_grad`` of a real
    micro-batch: the first stage (``carried`` empty) starts from tensors of the same shapes
    and dtypes every time, and a floating-point carried tensor that gets a gradient in training
    requires one from the start (a stage's output must not gain ``requires_grad`` only at run
    time).
    """

    def start(self, stage: StageModule, carried: tuple[torch.Tensor, ...], x: torch.Tensor) -> None:
        """Begin a forward: ``carried`` the previous stage's tensors (``()`` on the first
        stage), ``x`` the stage's input."""

    def send(self, stage: StageModule) -> tuple[torch.Tensor, ...]:
        """End a forward of a stage that is not the last: the tensors passed on."""

    def finish(self, stage: StageModule, output: torch.Tensor) -> torch.Tensor:
        """End a forward of the last stage: its output (e.g. ``output`` with a loss term's
        gradient attached)."""


def _explain_block_call(
    err: TypeError, block: nn.Module, path: str, args: tuple, kwargs: dict[str, Any]
) -> None:
    """Raise a ``TypeError`` that says how to pass a block's other inputs when ``err`` came
    from calling ``block`` itself with arguments its ``forward`` does not take (a block that
    needs more than the hidden states, e.g. forge-models' ``TransformerBlock`` its RoPE tables
    and documents); return, for ``err`` to propagate as it is, when the call's arguments fit
    (the error came from inside the block)."""
    import inspect

    try:
        inspect.signature(block.forward).bind(*args, **kwargs)
    except TypeError as mismatch:
        given = f"{len(args)} positional argument(s)" + (
            f" and {', '.join(kwargs)}" if kwargs else ""
        )
        raise TypeError(
            f"pipeline block {path!r} ({type(block).__name__}) cannot be called with the "
            f"{given} the stage gives it: {mismatch}. A block that takes more than the hidden "
            "states gets its other inputs per micro-batch from Pipeline.step(..., "
            "block_args=[(...), ...]), one tuple per micro-batch (forge-models' CausalLM: "
            "block_args=[(model.attention_inputs(mb),) for mb in micro_batches])"
        ) from err


def _attach(root: nn.Module, path: str, module: nn.Module, containers: set[str]) -> None:
    parts = path.split(".")
    node = root
    for depth, part in enumerate(parts[:-1]):
        if not hasattr(node, part) or part not in node._modules:
            container_path = ".".join(parts[: depth + 1])
            node.add_module(part, nn.ModuleDict() if container_path in containers else nn.Module())
        node = node._modules[part]
    node.add_module(parts[-1], module)


class StageModule(nn.Module):
    """One pipeline stage: the pre-parts (first stage), some blocks, the post-parts (last).

    Sub-modules keep their paths in the whole model; the blocks' container is an
    ``nn.ModuleDict`` keyed by the original block indices.
    """

    def __init__(
        self,
        model: nn.Module,
        layout: DecoderLayout,
        blocks: Sequence[str],
        *,
        first: bool,
        last: bool,
        tied_holders: Sequence[str] = (),
    ) -> None:
        super().__init__()
        container = layout.blocks[0].rpartition(".")[0]
        containers = {container} if container else set()
        # Modules of parameters shared with an earlier stage, attached first (never run) so
        # the shared parameter keeps its first name (see forge_parallel.pipeline.tied).
        self._pre = tuple(layout.pre) if first else ()
        self._blocks = tuple(blocks)
        self._post = tuple(layout.post) if last else ()
        self._rotary = layout.rotary
        self._containers = containers
        #: Paths of the whole model's modules this stage holds, in registration order.
        self.attached_paths = (
            *tied_holders,
            *self._pre,
            *self._blocks,
            *self._post,
            *((self._rotary,) if self._rotary is not None else ()),
        )
        for path in self.attached_paths:
            _attach(self, path, model.get_submodule(path), containers)
        self._block_args: list[tuple] | None = None
        #: The micro-batch the next forward belongs to (set by the pipeline stage runtime).
        self.microbatch = 0
        #: ``fn(path, output, block_args) -> hidden``: what a block's output passes on, for
        #: blocks returning more than the hidden states (a MoE block's router statistics);
        #: default: the output, or its first element when it is a tuple. Called only in the
        #: schedule's forwards of micro-batches (:attr:`in_schedule`), not in the pipeline
        #: runtime's shape inference.
        self.block_output: Callable[[str, Any, tuple], torch.Tensor] | None = None
        #: Whether the running forward is a micro-batch's (set by the pipeline stage runtime).
        self.in_schedule = False
        #: ``fn(stage, hidden, block_args) -> output``: what the last stage computes from its
        #: blocks' output instead of running the post-parts in order (e.g. the loss, computed
        #: inside the stage's forward, where FSDP has gathered the head's weight; the
        #: micro-batch is :attr:`microbatch`). Also called outside the micro-batches
        #: (:attr:`in_schedule` false): the runtime's shape inference, on meta or uninitialized
        #: tensors. ``None``: the post-parts in order.
        self.post_forward: Callable[[StageModule, torch.Tensor, tuple], torch.Tensor] | None = None
        #: Tensors passed from stage to stage beside the hidden states (see
        #: :class:`StageCarry`); ``None``: the hidden states only.
        self.carry: StageCarry | None = None
        #: Whether this is the last stage (its output goes to the loss, not to a next stage).
        self.is_last = last

    def set_block_args(self, per_microbatch: list[tuple] | None) -> None:
        """Set the extra positional block arguments of the coming micro-batches (one tuple
        per micro-batch, indexed by :attr:`microbatch`); ``None``: blocks get only the hidden
        states (and rotary tables, see the module docstring)."""
        self._block_args = None if per_microbatch is None else list(per_microbatch)

    def _current_block_args(self, x: torch.Tensor) -> tuple:
        if self._block_args is None:
            return ()
        if not 0 <= self.microbatch < len(self._block_args):
            raise RuntimeError(
                f"micro-batch {self.microbatch} has no block arguments ({len(self._block_args)} "
                "given); pass block_args with one entry per micro-batch to Pipeline.step"
            )
        args = self._block_args[self.microbatch]
        if x.is_meta:  # shape inference on meta tensors
            from torch.utils._pytree import tree_map_only

            return tree_map_only(torch.Tensor, lambda t: t.to("meta"), args)
        return args

    @staticmethod
    def merged(stages: Sequence[StageModule]) -> nn.Module:
        """One module holding the parts of all ``stages`` (a rank's virtual stages) under their
        paths in the whole model, each once: what an optimizer or a checkpoint of the rank
        sees. Never run (each stage runs on its own); a single stage is returned as is."""
        if len(stages) == 1:
            return stages[0]
        merged = nn.Module()
        for stage in stages:
            for path in stage.attached_paths:
                module = stage.get_submodule(path)
                try:
                    if merged.get_submodule(path) is module:  # e.g. the rotary tables
                        continue
                except AttributeError:
                    pass
                _attach(merged, path, module, stage._containers)
        return merged

    @property
    def block_names(self) -> tuple[str, ...]:
        return self._blocks

    def forward(self, x: torch.Tensor, *carried: torch.Tensor) -> Any:
        """The stage's output; with a :attr:`carry`, every stage but the last returns
        ``(output, *carried)`` and every stage but the first takes the previous stage's
        carried tensors after the hidden states."""
        if self.carry is not None:
            self.carry.start(self, carried, x)
        elif carried:
            raise ValueError(
                f"the stage got {len(carried)} inputs besides the hidden states but has no carry "
                "to take them; set the same StageCarry on every stage (pipeline(carry=...))"
            )
        out = self._run_parts(x)
        if self.carry is None:
            return out
        if self.is_last:
            return self.carry.finish(self, out)
        return (out, *self.carry.send(self))

    def _run_parts(self, x: torch.Tensor) -> torch.Tensor:
        for path in self._pre:
            x = self.get_submodule(path)(x)
        extra = self._current_block_args(x)
        kwargs = {}
        if self._rotary is not None and self._blocks and not extra:
            position_ids = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
            rotary = self.get_submodule(self._rotary)
            kwargs = {
                "position_embeddings": rotary(x, position_ids),
                "position_ids": position_ids,
            }
        for path in self._blocks:
            block = self.get_submodule(path)
            try:
                out = block(x, *extra, **kwargs)
            except TypeError as err:
                _explain_block_call(err, block, path, (x, *extra), kwargs)
                raise
            if self.block_output is not None and self.in_schedule:
                x = self.block_output(path, out, extra)
            else:
                x = out[0] if isinstance(out, tuple) else out
        if self._post and self.post_forward is not None:
            return self.post_forward(self, x, extra)
        for path in self._post:
            x = self.get_submodule(path)(x)
        return x
