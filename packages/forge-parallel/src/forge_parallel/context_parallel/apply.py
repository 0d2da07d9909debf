"""Context parallelism for a model that calls ``scaled_dot_product_attention``, unedited.

:func:`context_parallel` is a ``TorchFunctionMode``: inside it, every call to
``torch.nn.functional.scaled_dot_product_attention`` is answered by
:func:`~forge_parallel.context_parallel.context_parallel_attention` over the context-parallel
group. That covers any model whose attention goes through SDPA (Forge's models, a model you
wrote, ``transformers``' ``attn_implementation="sdpa"`` path) without changing its code.
:func:`apply_cp` installs the mode around every forward of a model with hooks.

Only calls that reach ``torch.nn.functional.scaled_dot_product_attention`` are routed. Attention
computed any other way (flash-attn's ``flash_attn_func``, xformers, a Triton or vendor kernel,
hand-written ``softmax(q @ k^T) @ v``) would attend within each rank's own shard only: silently
wrong. So after every forward under :func:`apply_cp` the handle checks that at least one call was
routed, and raises otherwise (a model with several attention paths, some of them not SDPA, is
beyond this check: route them all through SDPA).

What stays the training loop's job: feed each rank its shard of the tokens, labels **and
position ids** (:func:`~forge_parallel.context_parallel.shard_sequence`; rotary embeddings must
see global positions), and average the loss over the full sequence
(:func:`~forge_parallel.context_parallel.context_parallel_cross_entropy`). Gradients must be
reduced over the context-parallel ranks too: FSDP/HSDP over ``dp_shard x cp`` does it.

Calls with a dense ``attn_mask`` or dropout are refused: the mask would be for the local shard
only. Express masks as ``is_causal`` plus ids of the whole sequence: ``cu_seqlens`` (packed
documents) and ``block_ids`` (bidirectional blocks such as an image's tokens, inside causal
attention); the model itself then runs a plain causal shard. On a
``transformers`` model, :func:`apply_cp` also switches the attention implementation so that
``transformers`` passes ``is_causal`` instead of building a mask from the local shard
(:mod:`~forge_parallel.context_parallel.hf_attention`; :meth:`ContextParallelHandle.remove`
switches it back).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from forge_core.collectives import GroupLike, as_process_group
from forge_parallel.context_parallel.attention import context_parallel_attention
from forge_parallel.context_parallel.config import CPConfig
from forge_parallel.context_parallel.hf_attention import (
    is_transformers_model,
    use_context_parallel_attention,
)

__all__ = ["ContextParallelHandle", "apply_cp", "context_parallel"]

_SDPA_PARAMS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

#: The router of the forward running now (innermost), for code that ``transformers`` calls by
#: name and that cannot be handed the group: its mask builder, which must know the global
#: sequence length to tell whether a sliding window takes effect
#: (:func:`~forge_parallel.context_parallel.hf_attention._check_window`). Set and reset with the
#: router's own ``__enter__`` / ``__exit__``, so it follows torch's mode stack.
_ACTIVE_ROUTER: contextvars.ContextVar[_SDPAToContextParallel | None] = contextvars.ContextVar(
    "forge_cp_active_router", default=None
)


def active_cp_size() -> int | None:
    """The context-parallel group size of the router active now, or ``None`` outside one."""
    router = _ACTIVE_ROUTER.get()
    return None if router is None else router.group.size()


class _SDPAToContextParallel(TorchFunctionMode):
    def __init__(
        self,
        group,
        config: CPConfig,
        cu_seqlens: torch.Tensor | None,
        block_ids: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.group, self.config = group, config
        self.cu_seqlens, self.block_ids = cu_seqlens, block_ids
        self.routed = 0  # attention calls answered by context parallelism
        self._tokens: list[contextvars.Token] = []

    def __enter__(self):
        self._tokens.append(_ACTIVE_ROUTER.set(self))
        return super().__enter__()

    def __exit__(self, exc_type, exc_value, traceback):
        try:
            return super().__exit__(exc_type, exc_value, traceback)
        finally:
            _ACTIVE_ROUTER.reset(self._tokens.pop())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        query, key, value, *rest = args
        options = dict(zip(_SDPA_PARAMS, rest, strict=False)) | kwargs
        if options.get("attn_mask") is not None:
            raise ValueError(
                "scaled_dot_product_attention got a dense attn_mask under context parallelism; "
                "the mask would cover only this rank's shard. Use is_causal=True and pass packed "
                "document boundaries and bidirectional blocks of the whole sequence as "
                "context_parallel(..., cu_seqlens=..., block_ids=...) or "
                "ContextParallelHandle.packed(cu_seqlens, block_ids=...) instead (for "
                "transformers models: no padding mask, attn_implementation='sdpa')"
            )
        if options.get("dropout_p", 0.0):
            raise ValueError(
                f"attention dropout (dropout_p={options['dropout_p']}) is not supported under "
                "context parallelism; set it to 0"
            )
        heads, kv_heads = query.shape[1], key.shape[1]
        if heads != kv_heads and not options.get("enable_gqa", False):
            raise ValueError(
                f"query has {heads} heads and key {kv_heads}: pass enable_gqa=True as "
                "scaled_dot_product_attention itself requires"
            )
        return self._route(query, key, value, options)

    @torch.compiler.disable
    def _route(self, query, key, value, options: dict) -> torch.Tensor:
        # Outside torch.compile's graph (a compiled block breaks its graph here): the count and
        # this batch's document boundaries are read at run time, not guarded on (a guard on
        # ``routed`` would recompile the block at every layer).
        self.routed += 1
        return context_parallel_attention(
            query,
            key,
            value,
            group=self.group,
            causal=bool(options.get("is_causal", False)),
            cu_seqlens=self.cu_seqlens,
            block_ids=self.block_ids,
            style=self.config.style,
            load_balance=self.config.load_balance,
            scale=options.get("scale"),
        )


@contextlib.contextmanager
def context_parallel(
    group: GroupLike,
    config: CPConfig | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    block_ids: torch.Tensor | None = None,
) -> Iterator[None]:
    """Route ``scaled_dot_product_attention`` calls inside the block to context parallelism.

    ``cu_seqlens``: document boundaries of the full packed sequence (same for every row of
    the batch), or ``None``. ``block_ids``: bidirectional blocks of the full sequence (``[S]``,
    ``-1`` outside any block; see
    :func:`~forge_parallel.context_parallel.context_parallel_attention`), applied to causal
    calls, or ``None``. Only the forward needs to run inside; backward does not.
    """
    mode = _SDPAToContextParallel(
        as_process_group(group), config or CPConfig(), cu_seqlens, block_ids
    )
    with mode:
        yield


class ContextParallelHandle:
    """What :func:`apply_cp` installed: :meth:`packed` sets document boundaries (and
    bidirectional blocks), :meth:`remove` takes the hooks off again (and restores a
    ``transformers`` model's attention)."""

    def __init__(self, model: nn.Module, group: GroupLike, config: CPConfig) -> None:
        self.group, self.config = as_process_group(group), config
        self.cu_seqlens: torch.Tensor | None = None
        self.block_ids: torch.Tensor | None = None
        self._model_name = type(model).__name__
        self._modes: list[_SDPAToContextParallel] = []
        self._restore = (
            use_context_parallel_attention(model) if is_transformers_model(model) else None
        )
        self._hooks = [
            model.register_forward_pre_hook(self._enter),
            model.register_forward_hook(self._exit, always_call=True),
        ]

    def _enter(self, module: nn.Module, args) -> None:
        mode = _SDPAToContextParallel(self.group, self.config, self.cu_seqlens, self.block_ids)
        mode.__enter__()
        self._modes.append(mode)

    def _exit(self, module: nn.Module, args, output) -> None:
        mode = self._modes.pop()
        mode.__exit__(None, None, None)
        # torch runs this hook also when the forward raised (inside its ``except``): that error
        # is the one to report.
        if mode.routed == 0 and sys.exc_info()[1] is None:
            raise ValueError(
                f"context parallelism: a forward of {self._model_name} made no "
                "torch.nn.functional.scaled_dot_product_attention call, so none of its attention "
                "was routed across the context-parallel ranks and each rank attended within its "
                "own sequence shard only (wrong results). Under context parallelism the model's "
                "attention must call F.scaled_dot_product_attention (no attn_mask, dropout_p=0): "
                "replace flash-attn / xformers / custom-kernel / hand-written matmul-softmax "
                "attention by that call (forge-kernels: its 'sdpa' attention backend; "
                "transformers models are switched automatically), or call "
                "forge_parallel.context_parallel.context_parallel_attention in the model directly"
            )

    @contextlib.contextmanager
    def packed(
        self, cu_seqlens: torch.Tensor | None, *, block_ids: torch.Tensor | None = None
    ) -> Iterator[None]:
        """Forwards run inside attend within the documents of ``cu_seqlens`` and, under their
        causal mask, both ways within the blocks of ``block_ids`` (both of the full sequence;
        see :func:`~forge_parallel.context_parallel.context_parallel_attention`)."""
        previous = self.cu_seqlens, self.block_ids
        self.cu_seqlens, self.block_ids = cu_seqlens, block_ids
        try:
            yield
        finally:
            self.cu_seqlens, self.block_ids = previous

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._restore is not None:
            self._restore()
            self._restore = None


def apply_cp(
    model: nn.Module, group: GroupLike, config: CPConfig | None = None
) -> ContextParallelHandle:
    """Make every forward of ``model`` run its SDPA calls context-parallel over ``group``
    (a process group or the 1-D ``mesh["cp"]``); the model's code is not changed.

    Requirement: the model's attention must call
    ``torch.nn.functional.scaled_dot_product_attention`` (``is_causal`` or no mask, no dropout);
    only those calls are routed to ring / Ulysses attention. Attention through flash-attn,
    xformers, another kernel or hand-written matmul-softmax is not seen and would be computed
    within each rank's shard only; a forward in which no SDPA call was routed raises
    ``ValueError``. A ``transformers`` model is switched to an SDPA attention implementation
    here (:mod:`~forge_parallel.context_parallel.hf_attention`); forge-models' attention goes
    through SDPA with forge-kernels' ``"sdpa"`` backend (forge-train pins it under CP).
    Blocks checkpointed by :func:`~forge_parallel.apply_recompute` replay their forward in
    backward under the same router (:mod:`forge_parallel.replay_checkpoint`); under a selective
    policy each routed attention is one unit, recomputed whole with its exchanges
    (:func:`forge_parallel.replay_checkpoint.recomputed_whole`).
    """
    return ContextParallelHandle(model, group, config or CPConfig())
