"""Context parallelism in the training step: each rank's shard of a packed micro-batch.

``forge_parallel.parallelize(..., context_parallel=CPConfig(...))`` routes the model's
``scaled_dot_product_attention`` calls to ring attention (Liu et al. 2023, arXiv:2310.01889) or
DeepSpeed-Ulysses (Jacobs et al. 2023, arXiv:2309.14509) over ``mesh["cp"]``. What the step
does here, per micro-batch:

- the next-token targets are computed on the **whole** packed row (``forge_models.shift_labels``
  with the document boundaries: a position's next token may live on another rank), then the
  tokens, targets and position ids (rotary embeddings need global positions) are cut with the
  same layout (zigzag or contiguous, :func:`forge_parallel.context_parallel.shard_sequence`);
  so are, with multi-token prediction (DeepSeek-V3, arXiv:2412.19437 §2.2), each depth's input
  ids and targets, moved ``k`` places left on the whole row
  (``forge_models.causal_lm.mtp_depth_inputs``; the model's ``mtp_inputs``; a vision-language
  model's language model embeds a depth's ids as tokens, placeholders included, as in one
  process);
- the forward runs with the document boundaries (and a vision-language model's bidirectional
  image blocks) of the whole row set on the attention
  (:meth:`forge_parallel.context_parallel.ContextParallelHandle.packed`; the model itself sees a
  plain causal shard), and with forge-kernels' attention pinned to its SDPA backend, the call
  the context-parallel router intercepts (on a GPU the automatic choice would be flash-attn, and
  an eager reference or plugin override would not call SDPA at all);
- token counts and loss sums are reduced over the context-parallel ranks as well as the
  data-parallel ones (:class:`forge_train.step.StepRunner`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

__all__ = [
    "ContextParallelInputs",
    "RowAttention",
    "check_sequence_split",
    "context_parallel_config",
    "shard_tokens",
]


class RowAttention(NamedTuple):
    """What the context-parallel attention of a micro-batch's whole packed row needs: its
    document boundaries and, for a vision-language model with
    ``image_attention=bidirectional``, its image blocks (``block_ids`` ``[1, T]``, ``-1`` on
    text), applied on global positions across the ranks while each rank's model runs a plain
    causal shard."""

    cu_seqlens: torch.Tensor
    block_ids: torch.Tensor | None = None


class ContextParallelInputs:
    """Shard micro-batches over the context-parallel ranks and run their forwards.

    ``parallel``: forge_parallel's ``ParallelizeResult`` of a ``cp > 1`` layout.
    """

    def __init__(self, parallel) -> None:
        self.handle = parallel.context_parallel_handle
        self.load_balance = parallel.context_parallel.load_balance
        self.group = parallel.mesh["cp"].get_group()
        self.size = parallel.mesh.size("cp")
        self.rank = parallel.mesh.local_rank("cp")

    def shard(
        self, kwargs: dict[str, Any], *, mtp_depth: int = 0
    ) -> tuple[dict[str, Any], torch.Tensor, RowAttention]:
        """``(forward kwargs of this rank's shard, its predicted tokens, what the attention of
        the whole row needs (:meth:`forward`'s argument))`` from
        :func:`forge_train.data.model_inputs`' keyword arguments;
        ``mtp_depth``: the model's multi-token prediction modules (their inputs and targets,
        ``mtp_inputs``, are moved on the whole row, then cut)."""
        from forge_models.causal_lm import IGNORE_INDEX, mtp_depth_inputs, shift_labels
        from forge_parallel.context_parallel import shard_sequence

        cu_seqlens = kwargs["cu_seqlens"]
        targets = shift_labels(kwargs["labels"], cu_seqlens=cu_seqlens)
        layout = {"cp_size": self.size, "cp_rank": self.rank, "load_balance": self.load_balance}
        local_targets = shard_sequence(targets, dim=1, **layout)
        predicted = (local_targets != IGNORE_INDEX).sum()
        depths = []
        if mtp_depth:  # a VLM's too: its language model embeds each depth's ids as tokens
            depths = mtp_depth_inputs(
                kwargs["input_ids"], targets, mtp_depth, cu_seqlens=cu_seqlens
            )
            depths = [tuple(shard_sequence(t, dim=1, **layout) for t in d) for d in depths]
        visual_keys = ("images", "videos", "dummy_visual")
        if any(k in kwargs for k in visual_keys):
            # A vision-language model places the visual features (and M-RoPE positions) on
            # the whole row, then runs its language model on this rank's positions; a
            # text-only micro-batch too (its stand-in image keeps the encoder's collectives).
            row = torch.arange(kwargs["input_ids"].shape[-1], device=targets.device)
            visual = {k: kwargs[k] for k in (*visual_keys, "position_ids") if k in kwargs}
            local = {
                "input_ids": kwargs["input_ids"],
                "cu_seqlens": cu_seqlens,
                "targets": local_targets,
                "sequence_index": shard_sequence(row, dim=0, **layout),
                **visual,
            }
            if depths:
                local["mtp_inputs"] = depths
            # Bidirectional image blocks (image_attention=bidirectional) of the whole row go
            # to the context-parallel attention with the documents; the model runs causal.
            return local, predicted, RowAttention(cu_seqlens, kwargs.get("block_ids"))
        local = {
            "input_ids": shard_sequence(kwargs["input_ids"], dim=1, **layout),
            "targets": local_targets,
            "position_ids": shard_sequence(kwargs["position_ids"], dim=1, **layout),
        }
        if depths:
            local["mtp_inputs"] = depths
        return local, predicted, RowAttention(cu_seqlens)

    @contextlib.contextmanager
    def forward(self, row: RowAttention) -> Iterator[None]:
        """Run the forward of a shard inside: attention within the documents (and image
        blocks) of the whole row, across all context-parallel ranks."""
        with (
            self.handle.packed(row.cu_seqlens, block_ids=row.block_ids),
            _attention_through_sdpa(),
        ):
            yield

    def backward(self) -> contextlib.AbstractContextManager:
        """Run a shard's backward inside: blocks recomputed there replay their forward under
        the context-parallel router (``forge_parallel.replay_checkpoint``), and forge-kernels'
        attention must reach it through SDPA as in the forward."""
        return _attention_through_sdpa()

    def bind_pipeline(self, parallelized: list) -> None:
        """Pipeline parallelism: each stage module (``forge_parallel`` ``Pipeline.parallelized``
        results) takes the document boundaries (and image blocks) of the micro-batch it runs
        (``StageModule.microbatch``) from :meth:`pipeline_forward`'s list."""
        self._microbatch_rows: list[RowAttention] = []
        for result in parallelized:
            handle = result.context_parallel_handle

            def set_documents(stage, args, handle=handle) -> None:
                row = self._microbatch_rows[stage.microbatch]
                handle.cu_seqlens, handle.block_ids = row.cu_seqlens, row.block_ids

            # before the handle's own hook, which reads the boundaries
            result.model.register_forward_pre_hook(set_documents, prepend=True)

    @contextlib.contextmanager
    def pipeline_forward(self, rows: list[RowAttention]) -> Iterator[None]:
        """Run a pipeline schedule inside: micro-batch ``i`` attends as ``rows[i]`` says
        (:meth:`shard`'s third result)."""
        self._microbatch_rows = list(rows)
        try:
            with _attention_through_sdpa():
                yield
        finally:
            self._microbatch_rows = []


def shard_tokens(
    per_token: torch.Tensor, *, cp_size: int, cp_rank: int, load_balance: bool
) -> torch.Tensor:
    """Rank ``cp_rank``'s part of ``per_token``, one value per token of a micro-batch's packed
    row (``[rows * seq_len]``, rows back to back), in the order :meth:`ContextParallelInputs.shard`
    gives the rank's tokens to the model: the same zigzag or contiguous cut. A language model's
    LoRA dropout keys (:mod:`forge_train.lora_dropout`) are cut so."""
    from forge_parallel.context_parallel import shard_sequence

    layout = {"cp_size": cp_size, "cp_rank": cp_rank, "load_balance": load_balance}
    return shard_sequence(per_token.reshape(1, -1), dim=1, **layout).reshape(-1)


@contextlib.contextmanager
def _attention_through_sdpa() -> Iterator[None]:
    """forge-kernels' attention pinned to its SDPA backend, the call the context-parallel
    router intercepts."""
    from forge_kernels import registry

    dispatch = registry.get_default("attention")

    def through_sdpa(q, k, v, **kwargs):
        return dispatch(q, k, v, **{**kwargs, "backend": "sdpa"})

    with registry.overridden("attention", through_sdpa, source="forge-train context parallel"):
        yield


def context_parallel_config(cfg, model_config, degrees: dict[str, int]):
    """forge_parallel's ``CPConfig`` for ``parallel.cp > 1`` (``None`` at ``cp == 1``), after
    checking that the run can split its sequences (:func:`check_sequence_split`, also for
    sequence parallelism alone) and, for Ulysses, its heads; ``ConfigError`` naming the
    setting if not."""
    from forge_train.config import ConfigError

    check_sequence_split(cfg, degrees)
    cp = degrees["cp"]
    if cp == 1:
        return None
    settings = cfg.parallel
    text_config = getattr(model_config, "text", model_config)  # a VLM's language model
    if settings.cp_style == "ulysses":
        # Tensor parallelism first gives each rank num_heads / tp heads (and KV heads); Ulysses
        # then splits those over the cp ranks.
        tp = degrees["tp"]
        heads = {
            "num_heads": text_config.num_heads,
            "num_kv_heads": text_config.num_kv_heads or text_config.num_heads,
        }
        bad = {k: v for k, v in heads.items() if v % (cp * tp)}
        if bad:
            split = f"cp={cp}" if tp == 1 else f"tp x cp = {tp} x {cp} = {cp * tp}"
            after_tp = (
                ""
                if tp == 1
                else " (tensor parallelism gives each rank 1/tp of the heads, which Ulysses "
                "splits over cp)"
            )
            fewer = "a cp" if tp == 1 else "a lower parallel.tp or parallel.cp"
            raise ConfigError(
                f"parallel.cp_style=ulysses: {split} must divide the head counts "
                f"({', '.join(f'{k}={v}' for k, v in heads.items())}){after_tp}; use "
                f"cp_style=ring or {fewer} that divides both"
            )
    from forge_parallel.context_parallel import CPConfig

    return CPConfig(style=settings.cp_style, load_balance=settings.cp_load_balance)


def check_sequence_split(cfg, degrees: dict[str, int]) -> None:
    """``ConfigError`` unless a micro-batch's packed row can be cut as the layout cuts it.

    :func:`forge_train.data.model_inputs` packs a micro-batch into one row of ``data.seq_len x
    data.micro_batch_rows`` tokens. Context parallelism cuts it into ``cp`` (zigzag: ``2 x
    cp``) equal chunks, each rank keeping ``row / cp`` tokens; sequence parallelism
    (``parallel.sequence_parallel`` with ``tp > 1``; Korthikanti et al. 2022) then cuts each
    rank's tokens into ``tp`` equal shards. Uneven shards would make the sequence all-gathers
    disagree across ranks (an abort on gloo, a hang or garbage on NCCL).
    """
    from forge_train.config import ConfigError

    cp, tp = degrees["cp"], degrees["tp"]
    settings = cfg.parallel
    tokens = cfg.data.seq_len * cfg.data.micro_batch_rows
    row = (
        f"a micro-batch's packed row of data.seq_len x data.micro_batch_rows = "
        f"{cfg.data.seq_len} x {cfg.data.micro_batch_rows} = {tokens} tokens"
    )
    if cp > 1:
        chunks = 2 * cp if settings.cp_load_balance else cp
        if tokens % chunks:
            raise ConfigError(
                f"parallel.cp={cp}: {row} cannot be cut into {chunks} equal chunks "
                f"({'zigzag: 2 x cp' if settings.cp_load_balance else 'cp'}); choose "
                f"data.seq_len so that the row is a multiple of {chunks}"
            )
    if tp > 1 and settings.sequence_parallel and tokens % (cp * tp):
        per_rank = f"{tokens} / cp={cp} = {tokens / cp:g} tokens per rank" if cp > 1 else ""
        split = f"tp x cp = {tp} x {cp} = {tp * cp}" if cp > 1 else f"tp={tp}"
        raise ConfigError(
            f"parallel.sequence_parallel=true with parallel.tp={tp}: {row}"
            f"{' (' + per_rank + ')' if per_rank else ''} cannot be cut into {tp} equal "
            f"sequence shards; choose data.seq_len (or data.micro_batch_rows) so that the row "
            f"is a multiple of {split}, or set parallel.sequence_parallel=false"
        )
