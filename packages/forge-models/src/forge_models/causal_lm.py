"""``CausalLM``: the decoder-only language model shared by the Llama and Qwen families.

Llama 2 (Touvron et al. 2023, arXiv:2307.09288), Llama 3/3.1/3.2 (Dubey et al. 2024,
arXiv:2407.21783), Qwen2/Qwen2.5 (Yang et al. 2024, arXiv:2407.10671; Qwen2.5 Technical Report,
arXiv:2412.15115) and Qwen3 dense (Yang et al. 2025, arXiv:2505.09388) are all this module with
a different :class:`~forge_models.config.TransformerConfig`; so are Qwen2-MoE / Qwen1.5-MoE and
Qwen3-MoE, whose config's ``moe`` turns the MLP of their sparse layers into a
:class:`~forge_models.blocks.MoEBlock`, and DeepSeek-V3 (DeepSeek-AI 2024, arXiv:2412.19437),
whose config's ``mla`` swaps the attention for multi-head latent attention and whose
``mtp_depth`` adds multi-token prediction modules trained with the loss.

Module tree (the names forge-ckpt maps and parallel plans target)::

    embed_tokens            nn.Embedding [padded_vocab, hidden]
    layers.{i}              TransformerBlock
        attn_norm           RMSNorm
        attn.q_proj/k_proj/v_proj/o_proj   nn.Linear (q/k/v bias with attention_bias,
                            o bias with attention_out_bias)
        attn.q_norm/k_norm  RMSNorm [head_dim] (qk_norm)
        (with ``mla``, ``attn`` is a MultiHeadLatentAttention instead:)
        attn.q_proj or attn.q_a_proj/q_a_norm/q_b_proj, attn.kv_a_proj, attn.kv_a_norm,
        attn.kv_b_proj, attn.o_proj
        mlp_norm            RMSNorm
        mlp.gate_up_proj    nn.Linear [2 * intermediate, hidden] (gate rows, then up rows)
        mlp.down_proj       nn.Linear
        (on a mixture-of-experts layer, ``mlp`` is a MoEBlock instead:)
        mlp.router          nn.Linear [num_experts, hidden]
        mlp.experts.gate_up_proj   [num_experts, 2 * moe_intermediate, hidden]
        mlp.experts.down_proj      [num_experts, hidden, moe_intermediate]
        mlp.shared_expert.gate_up_proj/down_proj   (shared_expert_intermediate_size > 0)
        mlp.shared_expert_gate     nn.Linear [1, hidden] (gated shared expert)
        mlp.expert_bias            buffer [num_experts] fp32 (aux-loss-free selection bias)
    norm                    RMSNorm
    lm_head                 nn.Linear [padded_vocab, hidden]; with tie_word_embeddings its weight
                            *is* embed_tokens.weight and ``lm_head.weight`` is left out of the
                            state dict (loading one aliases it to the embedding)
    mtp.{k}                 MultiTokenPrediction (mtp_depth > 0): enorm, hnorm, eh_proj,
                            block (a TransformerBlock), norm; embedding and head shared
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

import forge_kernels
from forge_kernels.attention import AttentionMask
from forge_kernels.moe import (
    load_balancing_loss_from_logits,
    sequence_balance_loss_from_sums,
    sequence_balance_sums,
)
from forge_models.blocks import (
    AttentionInputs,
    MoEBlock,
    MoEExperts,
    MultiTokenPrediction,
    RMSNorm,
    RotaryEmbedding,
    RouterOutput,
    TransformerBlock,
)
from forge_models.config import TransformerConfig
from forge_models.init import init_, materialized_device

__all__ = [
    "IGNORE_INDEX",
    "CausalLM",
    "MoEStats",
    "mtp_depth_inputs",
    "mtp_depths",
    "router_sequence_balance",
    "shift_labels",
    "token_documents",
]

#: Label value that contributes no loss (as ``torch.nn.functional.cross_entropy``'s default).
IGNORE_INDEX = -100


def shift_labels(
    labels: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token targets for ``labels`` aligned with the inputs: ``targets[..., t] = labels[..., t+1]``.

    The last position gets ``IGNORE_INDEX``; so does every position whose own token or next
    token is padding (``attention_mask == 0``), and the last token of every packed document
    (it must not predict the next document's first token).
    """
    targets = F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
    if attention_mask is not None:
        valid = attention_mask.bool()
        next_valid = F.pad(valid[..., 1:], (0, 1), value=False)
        targets = targets.masked_fill(~(valid & next_valid), IGNORE_INDEX)
    if cu_seqlens is not None:
        ends = cu_seqlens[1:].long() - 1
        ends = ends[ends >= 0]
        targets = targets.clone()
        targets[..., ends] = IGNORE_INDEX
    return targets


def mtp_depth_inputs(
    ids: torch.Tensor,
    targets: torch.Tensor | None,
    depth: int,
    *,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """``[(input ids, targets) of depth 1, ..., depth]`` for the multi-token prediction modules
    (DeepSeek-V3, arXiv:2412.19437 §2.2): at depth ``k`` position ``i`` embeds ``t_{i+k}`` and
    predicts ``t_{i+k+1}``, so ``ids`` and the main ``targets`` (:func:`shift_labels`' output)
    move one place left per depth. A target leaving its document (``cu_seqlens``) or reaching
    padding (``attention_mask``) is ignored, like the main loss's last token; the ids moved in
    at the end are ``0`` (any valid id: their targets are ignored).

    Computed on a whole sequence, then cut like it, these are what a context-parallel shard
    passes to :func:`mtp_depths` (``depth_inputs``): a shard's last position's next token may
    live on another rank. ``targets=None``: ``None`` targets (logits only).
    """
    inputs = []
    for _ in range(depth):
        ids = F.pad(ids[..., 1:], (0, 1), value=0)
        if targets is not None:
            targets = shift_labels(targets, attention_mask=attention_mask, cu_seqlens=cu_seqlens)
        inputs.append((ids, targets))
    return inputs


def mtp_depths(
    modules: Sequence[nn.Module],
    h: torch.Tensor,
    ids: torch.Tensor,
    embed: Callable[[torch.Tensor], torch.Tensor],
    inputs: AttentionInputs,
    *,
    targets: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    route: Callable[[nn.Module, tuple], torch.Tensor] | None = None,
    depth_inputs: Sequence[tuple[torch.Tensor, torch.Tensor | None]] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Run the multi-token prediction modules in order (DeepSeek-V3, arXiv:2412.19437 §2.2):
    yield each depth's normed hidden states (what the shared output head reads) and, when the
    main ``targets`` are given, that depth's targets.

    Each depth's input ids and targets are :func:`mtp_depth_inputs` of ``ids`` and ``targets``
    (the document boundaries ``inputs.cu_seqlens``, padding ``attention_mask``), or
    ``depth_inputs`` when given: that function's output computed on the whole sequence and cut
    like ``h`` (a context-parallel shard; ``ids``, ``targets`` and ``attention_mask`` are then
    not read). The hidden states are not moved: position ``i`` combines ``h_i`` with the
    embedding of ``t_{i+k}``. ``h``: the main model's last hidden states (before the final
    norm); ``embed``: the shared embedding; ``route(module, (h, router))``: the hidden states
    to go on with, for a caller that records MoE routers (default: ``h`` as returned). One
    function for :class:`CausalLM` and for a pipeline's last stage, which holds the same
    modules.
    """
    if depth_inputs is None:
        depth_inputs = mtp_depth_inputs(
            ids, targets, len(modules), attention_mask=attention_mask, cu_seqlens=inputs.cu_seqlens
        )
    elif len(depth_inputs) != len(modules):
        raise ValueError(
            f"depth_inputs has {len(depth_inputs)} (ids, targets) pairs for "
            f"{len(modules)} multi-token prediction modules: give one per depth "
            "(mtp_depth_inputs(ids, targets, depth) on the whole sequence)"
        )
    for module, (depth_ids, depth_targets) in zip(modules, depth_inputs, strict=True):
        out = module(h, embed(depth_ids), inputs)
        h = out[0] if route is None else route(module, out)
        yield module.norm(h), depth_targets


@dataclass(frozen=True, eq=False)
class MoEStats:
    """What the mixture-of-experts layers of one forward produced (``CausalLM.moe_stats``).

    Attributes:
        layers: indices of the MoE layers that ran, in order (``num_layers + k`` for the block
            of multi-token prediction module ``k``, which runs only with labels).
        tokens_per_expert: ``[len(layers), num_experts]`` int64 (token, slot) assignments per
            expert and layer (detached): the per-expert load, for logging and for
            :meth:`CausalLM.update_expert_bias`.
        router_logits: per MoE layer ``[tokens, num_experts]``, when router logits were
            requested (``output_router_logits``), else ``None``.
        aux_loss: the balance loss when router logits were requested, else ``None``
            (unscaled, differentiable): transformers' ``load_balancing_loss_func``
            (``moe.aux_loss="switch"``) or DeepSeek-V3's sequence-wise loss summed over the
            layers (``"sequence"``).
        routers: each MoE layer's :class:`~forge_models.blocks.RouterOutput`, in ``layers``
            order (differentiable): for a balance loss formed outside the model, e.g. from
            statistics summed over ranks that split the batch's tokens.
    """

    layers: tuple[int, ...]
    tokens_per_expert: torch.Tensor
    router_logits: tuple[torch.Tensor, ...] | None = None
    aux_loss: torch.Tensor | None = None
    routers: tuple[RouterOutput, ...] = ()


def _drop_tied_head(module: CausalLM, state_dict, prefix: str, local_metadata) -> None:
    if module.config.tie_word_embeddings:
        state_dict.pop(prefix + "lm_head.weight", None)


def _alias_tied_head(module: CausalLM, state_dict, prefix: str, *args) -> None:
    if module.config.tie_word_embeddings:
        state_dict.pop(prefix + "lm_head.weight", None)
        if prefix + "embed_tokens.weight" in state_dict:
            state_dict[prefix + "lm_head.weight"] = state_dict[prefix + "embed_tokens.weight"]


def token_documents(
    batch_shape: torch.Size,
    attention_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, int]:
    """``(document index of every token [batch * seq] int64, number of documents)`` for
    DeepSeek-V3's sequence-wise balance loss: each packed document of a ``cu_seqlens`` row, else
    each row (``-1`` for the padding of an ``attention_mask``)."""
    batch, seq = batch_shape
    if cu_seqlens is not None:  # one packed row: each document is a sequence
        bounds = cu_seqlens.to(device=device, dtype=torch.int64)
        positions = torch.arange(seq, device=device)
        documents = torch.searchsorted(bounds[1:], positions, right=True)
        return documents, bounds.numel() - 1
    rows = torch.arange(batch, device=device)[:, None].expand(batch, seq)
    if attention_mask is not None:  # padded rows: the real tokens of each row
        rows = torch.where(attention_mask.to(device).bool(), rows, -1)
    return rows.reshape(-1), batch


def router_sequence_balance(
    router: RouterOutput,
    batch_shape: torch.Size,
    attention_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss of one layer, averaged over its sequences: the
    rows of an unpadded batch, the real tokens of each padded row, or each packed document
    (from the per-document sums, ``forge_kernels.moe.sequence_balance_sums``, of the whole
    batch, as when a batch's tokens are split over ranks and their sums added up)."""
    tokens = router.scores.shape[0]
    if tokens != batch_shape.numel():
        raise ValueError(
            f"the router saw {tokens} tokens but the batch {tuple(batch_shape)} has "
            f"{batch_shape.numel()}: a layer run on a shard of the sequence needs its tokens' "
            "documents (token_documents of the whole batch, cut like the shard) and the sums "
            "summed over the ranks (forge_kernels.moe.sequence_balance_sums)"
        )
    documents, num_documents = token_documents(
        batch_shape, attention_mask, cu_seqlens, router.scores.device
    )
    sums = sequence_balance_sums(
        router.scores, router.indices, documents, num_documents=num_documents
    )
    return sequence_balance_loss_from_sums(sums, top_k=router.indices.shape[-1])


def _check_cu_seqlens_end(cu_seqlens: torch.Tensor, seq: int) -> None:
    """Check that the last document boundary is the row's token count ``seq`` (the check that
    :func:`forge_kernels.packed_position_ids` makes when positions are derived from
    ``cu_seqlens``). Boundaries on the CPU are checked at once; on an accelerator the check is
    an asynchronous device assert, so the forward never waits for the device."""
    message = (
        f"cu_seqlens must end at the packed row's {seq} tokens (its last boundary is the number "
        "of tokens); fix the boundaries passed with position_ids"
    )
    if cu_seqlens.numel() == 0:
        raise ValueError(message + ", got an empty cu_seqlens")
    if cu_seqlens.device.type == "cpu":
        end = int(cu_seqlens[-1])
        if end != seq:
            raise ValueError(message + f", got last boundary {end}")
    elif cu_seqlens.device.type != "meta":  # no values to check while tracing shapes
        torch._assert_async(cu_seqlens[-1] == seq, message)


class CausalLM(nn.Module):
    """A decoder-only language model (see the module docstring for the module tree).

    Build it by name with :func:`forge_models.build_model` (``device="meta"`` to allocate
    nothing), or from a Hugging Face folder with :func:`forge_models.from_pretrained`.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        vocab = config.padded_vocab_size
        # Given an empty weight, nn.Embedding skips its own init (on the meta device, the first
        # normal_ would import torch's Python decompositions: seconds). init_weights() fills it.
        self.embed_tokens = nn.Embedding(
            vocab,
            config.hidden_size,
            padding_idx=config.pad_token_id,
            _weight=torch.empty(vocab, config.hidden_size),
        )
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, vocab, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(MultiTokenPrediction(config, k) for k in range(config.mtp_depth))
        self.rope = RotaryEmbedding(
            config.rope_dim,
            theta=config.rope_theta,
            scaling=config.rope_scaling,
            mrope_section=config.mrope_section,
        )
        #: :class:`MoEStats` of the last forward of a mixture-of-experts model (else ``None``).
        self.moe_stats: MoEStats | None = None
        #: Next-token cross-entropy of the last forward with labels (detached fp32, the
        #: forward's ``loss_reduction``), ``None`` after one without. The returned loss is the
        #: objective (this plus the multi-token prediction depths and the MoE auxiliary loss); a
        #: trainer that reports the plain cross-entropy reads it here rather than subtracting
        #: the other terms back out (which is exact only up to float rounding).
        self.main_loss: torch.Tensor | None = None
        #: Per-depth multi-token prediction losses of the last forward with labels (detached),
        #: for logging; ``None`` without MTP.
        self.mtp_losses: tuple[torch.Tensor, ...] | None = None
        self.register_state_dict_post_hook(_drop_tied_head)
        self.register_load_state_dict_pre_hook(_alias_tied_head)
        if not self.embed_tokens.weight.is_meta:
            self.init_weights()  # built directly on a device: initialize as build_model does

    # -- construction -------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        # Moving from the meta device (to_empty) or across devices can replace the Parameter
        # objects; keep the output projection tied to the embedding.
        super()._apply(fn, recurse)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        return self

    @torch.no_grad()
    def init_weights(self, *, generator: torch.Generator | None = None) -> None:
        """Initialize as the references do: linear (also FP8 linear) and embedding weights
        ``normal(0, initializer_range)``, biases zero, norm weights one; the padding-token row
        and vocabulary padding rows zero.

        Works parameter by parameter in place, so it runs after ``to_empty`` on any device,
        on whatever shard of each parameter this process holds, and on a pipeline stage whose
        other parameters stay on the meta device: through :func:`forge_models.init.init_`,
        every layout gets the values one process draws with the same seed.
        """
        std = self.config.initializer_range
        vocab = self.config.vocab_size
        device = materialized_device(self)

        def normal_(weight: torch.Tensor, *, zero_rows: Sequence[int] = (), vocab_rows=False):
            # Rows are zeroed on the whole tensor, before it is cut into this rank's shard.
            def fill(x: torch.Tensor) -> None:
                nn.init.normal_(x, std=std, generator=generator)
                for row in zero_rows:
                    x[row].zero_()
                if vocab_rows:
                    x[vocab:].zero_()

            init_(weight, fill, device=device)

        from forge_kernels.fp8 import Fp8Linear  # the model's linears, converted to FP8

        for module in self.modules():
            if isinstance(module, nn.Embedding):
                padding = () if module.padding_idx is None else (module.padding_idx,)
                normal_(module.weight, zero_rows=padding, vocab_rows=True)
            elif isinstance(module, (nn.Linear, Fp8Linear)):
                if module is self.lm_head and self.config.tie_word_embeddings:
                    continue
                normal_(module.weight, vocab_rows=module is self.lm_head)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, MoEExperts):
                module.reset_parameters(std, generator=generator, device=device)
            elif isinstance(module, MoEBlock) and module.expert_bias is not None:
                module.expert_bias.zero_()

    # -- auxiliary-loss-free load balancing ------------------------------------------------------
    def moe_blocks(self) -> dict[int, MoEBlock]:
        """Layer index -> :class:`MoEBlock` of every MoE layer (MTP blocks: ``num_layers + k``)."""
        blocks = list(self.layers) + [m.block for m in self.mtp]
        return {b.layer_idx: b.mlp for b in blocks if b.is_moe}

    @torch.no_grad()
    def update_expert_bias(
        self,
        tokens_per_expert: torch.Tensor | None = None,
        *,
        layers: tuple[int, ...] | None = None,
        update_rate: float | None = None,
    ) -> None:
        """Auxiliary-loss-free load balancing (DeepSeek-V3, arXiv:2412.19437 section 2.1.2; Wang
        et al. 2024, arXiv:2408.15664): for each MoE layer,
        ``expert_bias += update_rate * sign(mean_load - load)``.

        Call it after each optimizer step. ``tokens_per_expert`` ``[len(layers), num_experts]``
        is the load of the whole step: sum ``moe_stats.tokens_per_expert`` over the
        micro-batches and all-reduce it over the data-parallel ranks, so every rank applies the
        same update. Default: the last forward's ``moe_stats`` (one micro-batch, this rank).
        ``layers`` defaults to ``moe_stats.layers`` with the default load, else to every MoE
        layer without the MTP blocks; ``update_rate`` to ``moe.bias_update_speed``.
        """
        moe = self.config.moe
        if moe is None or not moe.expert_bias:
            raise ValueError(
                "update_expert_bias needs a mixture-of-experts config with expert_bias=True "
                "(aux-loss-free balancing, DeepSeek-V3)"
            )
        if tokens_per_expert is None:
            if self.moe_stats is None:
                raise ValueError("no forward has run yet: pass tokens_per_expert")
            tokens_per_expert = self.moe_stats.tokens_per_expert
            layers = self.moe_stats.layers if layers is None else layers
        blocks = self.moe_blocks()
        if layers is None:
            layers = tuple(i for i in sorted(blocks) if i < self.config.num_layers)
        expected = (len(layers), moe.num_experts)
        if tuple(tokens_per_expert.shape) != expected:
            raise ValueError(
                f"tokens_per_expert must be [layers, num_experts] = {list(expected)} for MoE "
                f"layers {list(layers)}, got {list(tokens_per_expert.shape)}"
            )
        unknown = sorted(set(layers) - set(blocks))
        if unknown:
            raise ValueError(f"layers {unknown} are not MoE layers; MoE layers: {sorted(blocks)}")
        rate = moe.bias_update_speed if update_rate is None else update_rate
        for row, idx in zip(tokens_per_expert, layers, strict=True):
            blocks[idx].update_expert_bias(row, rate)

    def parallel_plan(self, *, sequence_parallel: bool = True) -> dict[str, str]:
        """This family's default tensor/sequence-parallel plan (see :mod:`forge_models.parallel_plan`),
        plus, with ``qk_norm``, the per-head norms: they run on each rank's heads, so their
        replicated weights' gradients are summed over the tensor-parallel ranks."""
        from forge_models.registry import get_family

        family = get_family(self.config.family)
        plan = family.parallel_plan(sequence_parallel=sequence_parallel)
        if getattr(self.config, "qk_norm", False):
            for name in ("q_norm", "k_norm"):
                plan[f"layers.*.attn.{name}"] = "replicate_partial"
        return plan

    # -- forward ------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        targets: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        embeds_scatter: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
        block_ids: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        loss_reduction: Literal["mean", "sum"] = "mean",
        output_router_logits: bool | None = None,
        output_mtp_logits: bool = False,
        mtp_inputs: Sequence[tuple[torch.Tensor, torch.Tensor | None]] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits, or the next-token loss when ``labels`` are given.

        Args:
            input_ids: ``[B, S]`` token ids, or ``[S]`` for one sequence. A packed batch (several
                documents in one row) is ``[1, T]`` or ``[T]`` with ``cu_seqlens``.
            position_ids: RoPE positions, ``[B, S]`` or ``[S]``. Default: ``0..S-1`` (also with
                padding, as transformers does), or restarting at 0 in each packed document.
                With M-RoPE (``config.mrope_section``) ``[3, B, S]`` or ``[3, S]`` (temporal,
                height, width; 1-D positions are used for all three).
            cu_seqlens: ``[documents + 1]`` boundaries of the packed documents, starting at 0 and
                ending at ``T`` (FlashAttention's varlen convention). Attention never crosses a
                document. Put trailing padding in a document of its own.
            attention_mask: ``[B, S]`` with 1 for real tokens and 0 for padding (transformers'
                convention; left, right or any padding). Padding tokens are never attended to;
                their own outputs are meaningless.
            labels: token ids aligned with ``input_ids`` (transformers' convention: *not*
                shifted; the model predicts ``labels[t + 1]`` at position ``t``, see
                :func:`shift_labels`). ``-100`` is ignored, and so are padding positions,
                positions before padding and the last token of each packed document.
            targets: instead of ``labels``, the next-token ids already aligned with the
                inputs (``shift_labels(labels, ...)``, Megatron-LM's convention; ``-100``
                ignored): for a context-parallel shard, whose positions' next tokens may
                live on another rank. With multi-token prediction, pass ``mtp_inputs`` too
                (the deeper targets need the whole sequence).
            inputs_embeds: ``[*input_ids.shape, hidden]`` embeddings to use instead of
                ``embed_tokens(input_ids)`` (a vision-language model's text embeddings with the
                image features scattered in); ``input_ids`` still gives the shape.
            embeds_scatter: ``(where, rows)`` pairs applied in order to ``embed_tokens(input_ids)``
                (``where``: bool of ``input_ids``' shape, ``rows``: ``[where.sum(), hidden]``),
                as ``masked_scatter``: a vision-language model's image / video features put
                in place of their placeholder tokens inside this forward, so an FSDP unit
                around this model gathers the embedding for it.
            block_ids: ``[B, S]`` or ``[S]``: tokens with the same non-negative id (one image
                or video) attend to each other bidirectionally, ``-1`` marks causal tokens
                (see :class:`forge_kernels.attention.AttentionMask`). Combines with
                ``cu_seqlens`` or ``attention_mask``.
            max_seqlen: longest packed document, if known (saves flash-attn a host sync).
            loss_reduction: ``"mean"`` over the predicted tokens (transformers' default) or
                ``"sum"`` (for normalizing over a whole accumulated batch yourself).
            mtp_inputs: (multi-token prediction) each depth's ``(input ids, targets)``
                computed on the whole sequence (:func:`mtp_depth_inputs` of the unsharded ids
                and main targets), cut like ``input_ids``: for a context-parallel shard,
                whose positions' tokens ``k`` ahead may live on another rank. Default: moved
                within ``input_ids`` and the targets here. Targets may be ``None`` without
                ``labels`` and ``targets`` (``output_mtp_logits``).
            output_router_logits: (MoE models) keep the router logits and compute the
                load-balancing loss; with ``labels`` the loss is then
                ``ce + router_aux_loss_coef * aux_loss`` as in transformers (the aux term is
                added as is, also with ``loss_reduction="sum"``). Default: the config's
                ``moe.output_router_logits``. Either way ``self.moe_stats`` (:class:`MoEStats`)
                holds this forward's per-expert load afterwards. (DeepSeek-V3: the aux loss is
                the sequence-wise balance loss, ``moe.aux_loss="sequence"``.)

        With ``labels`` and ``config.mtp_depth = D > 0`` the multi-token prediction modules run
        too and the loss is ``ce + mtp_loss_weight / D * sum_k ce_k`` (``ce_k``: module ``k``'s
        prediction of the token ``k + 1`` ahead, same reduction); ``self.mtp_losses`` holds the
        ``ce_k`` and ``self.main_loss`` the ``ce`` (set by every forward with labels, MTP or
        not: the plain next-token cross-entropy, without the depths or the MoE auxiliary
        loss). Without labels they run only with ``output_mtp_logits=True``: the return is
        then ``(logits, [logits of depth 1, ..., D])`` (for a loss computed outside, e.g. on
        vocabulary-sharded logits under tensor parallelism; depth ``k``'s targets are
        :func:`shift_labels` applied ``k + 1`` times).

        Returns:
            Without ``labels``: logits ``[*input_ids.shape, vocab_size]`` in the model dtype.
            With ``labels``: the fp32 scalar loss, computed by
            ``forge_kernels.fused_linear_cross_entropy`` without materializing the logits.
        """
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(
                f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got "
                f"{tuple(labels.shape)} (pass them unshifted: the model shifts them)"
            )
        if targets is not None:
            if labels is not None:
                raise ValueError("give labels (unshifted) or targets (already shifted), not both")
            if targets.shape != input_ids.shape:
                raise ValueError(
                    f"targets must have the shape of input_ids {tuple(input_ids.shape)}, got "
                    f"{tuple(targets.shape)}"
                )
            if len(self.mtp) and mtp_inputs is None:
                raise ValueError(
                    "targets (pre-shifted labels) cannot train the multi-token prediction "
                    "modules, which predict tokens further ahead; pass labels instead, or "
                    "mtp_inputs (mtp_depth_inputs of the whole sequence, cut like input_ids)"
                )
        if mtp_inputs is not None:
            mtp_inputs = self._check_mtp_inputs(
                mtp_inputs, input_ids, with_targets=labels is not None or targets is not None
            )
        ids, inputs = self._prepare(
            input_ids, position_ids, cu_seqlens, attention_mask, max_seqlen, block_ids
        )
        mask = None if attention_mask is None else attention_mask.reshape(ids.shape).to(ids.device)
        if inputs_embeds is None:
            h = self.embed_tokens(ids)
            for where, rows in embeds_scatter:
                h = h.masked_scatter(where.reshape(ids.shape)[..., None], rows.to(h.dtype))
        else:
            if tuple(inputs_embeds.shape[:-1]) != tuple(input_ids.shape):
                raise ValueError(
                    f"inputs_embeds must be [*input_ids.shape, hidden] = "
                    f"{[*input_ids.shape, self.config.hidden_size]}, got {list(inputs_embeds.shape)}"
                )
            h = inputs_embeds.reshape(*ids.shape, -1)
        routers: list[tuple[int, RouterOutput]] = []
        for layer in self.layers:
            h = layer(h, inputs)
            if isinstance(h, tuple):
                h, router = h
                routers.append((layer.layer_idx, router))
        x = self.norm(h)

        vocab = self.config.vocab_size
        if labels is None and targets is None:
            self.main_loss = None
            self.mtp_losses = None
            normed = [x]
            if output_mtp_logits:
                normed += [
                    n for n, _ in self._mtp_depths(h, ids, None, mask, inputs, routers, mtp_inputs)
                ]
            self._moe_stats(routers, output_router_logits, mask, ids.shape, inputs.cu_seqlens)
            logits = []
            for n in normed:
                out = self.lm_head(n)
                if out.shape[-1] != vocab:
                    out = out[..., :vocab]
                logits.append(out.reshape(*input_ids.shape, vocab))
            return (logits[0], logits[1:]) if output_mtp_logits else logits[0]

        if targets is None:
            targets = shift_labels(
                labels.reshape(ids.shape).to(ids.device),
                attention_mask=mask,
                cu_seqlens=inputs.cu_seqlens,
            )
        else:
            targets = targets.reshape(ids.shape).to(ids.device)
        loss = self._lm_loss(x, targets, loss_reduction)
        self.main_loss = loss.detach()
        if len(self.mtp):
            mtp_losses = self._mtp_losses(
                h, ids, targets, mask, inputs, routers, loss_reduction, mtp_inputs
            )
            self.mtp_losses = tuple(x.detach() for x in mtp_losses)
            loss = loss + self.config.mtp_loss_weight / len(mtp_losses) * sum(mtp_losses)
        aux_loss = self._moe_stats(
            routers, output_router_logits, mask, ids.shape, inputs.cu_seqlens
        )
        if aux_loss is not None:
            loss = loss + self.config.moe.router_aux_loss_coef * aux_loss
        return loss

    def attention_inputs(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        block_ids: torch.Tensor | None = None,
    ) -> AttentionInputs:
        """What every block of this batch gets besides the hidden states (RoPE tables, packed
        document boundaries, attention mask), validated as in :meth:`forward`, whose arguments
        these are. A pipeline stage holds only some blocks: pass these per micro-batch as
        ``forge_parallel.pipeline.Pipeline.step(..., block_args=[(inputs,), ...])``. Uses
        only the config and the rotary tables, so a meta-device copy of the model serves."""
        return self._prepare(
            input_ids, position_ids, cu_seqlens, attention_mask, max_seqlen, block_ids
        )[1]

    def _lm_loss(self, x: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
        """Cross-entropy of ``lm_head(x)`` against ``targets`` without materializing logits."""
        weight = self.lm_head.weight
        if weight.shape[0] != self.config.vocab_size:
            weight = weight[: self.config.vocab_size]
        return forge_kernels.fused_linear_cross_entropy(
            x.reshape(-1, x.shape[-1]),
            weight,
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction=reduction,
        )

    def _mtp_depths(
        self,
        h: torch.Tensor,
        ids: torch.Tensor,
        targets: torch.Tensor | None,
        mask: torch.Tensor | None,
        inputs: AttentionInputs,
        routers: list[tuple[int, RouterOutput]],
        depth_inputs: Sequence[tuple[torch.Tensor, torch.Tensor | None]] | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """:func:`mtp_depths` of this model, its MoE blocks' routers appended to ``routers``."""

        def route(module: nn.Module, out: tuple) -> torch.Tensor:
            hidden, router = out
            if router is not None:
                routers.append((module.block.layer_idx, router))
            return hidden

        return mtp_depths(
            self.mtp, h, ids, self.embed_tokens, inputs,
            targets=targets, attention_mask=mask, route=route, depth_inputs=depth_inputs,
        )  # fmt: skip

    def _mtp_losses(
        self,
        h: torch.Tensor,
        ids: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor | None,
        inputs: AttentionInputs,
        routers: list[tuple[int, RouterOutput]],
        reduction: str,
        depth_inputs: Sequence[tuple[torch.Tensor, torch.Tensor | None]] | None = None,
    ) -> list[torch.Tensor]:
        """Loss of each multi-token prediction depth (:func:`mtp_depths`). A depth whose inputs
        are all too short to have a target contributes 0 (not NaN)."""
        losses = []
        depths = self._mtp_depths(h, ids, targets, mask, inputs, routers, depth_inputs)
        for normed, depth_targets in depths:
            loss = self._lm_loss(normed, depth_targets, "sum")
            if reduction == "mean":  # a depth without any target (short documents) adds 0
                loss = loss / (depth_targets != IGNORE_INDEX).sum().clamp_min(1)
            losses.append(loss)
        return losses

    def _check_mtp_inputs(
        self,
        mtp_inputs: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
        input_ids: torch.Tensor,
        *,
        with_targets: bool,
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """``mtp_inputs`` checked against the model and ``input_ids``, shaped ``[B, S]``."""
        if len(mtp_inputs) != len(self.mtp):
            raise ValueError(
                f"mtp_inputs has {len(mtp_inputs)} (ids, targets) pairs but the model has "
                f"mtp_depth={len(self.mtp)}: give one pair per depth (mtp_depth_inputs)"
            )
        shape = (1, -1) if input_ids.dim() == 1 else tuple(input_ids.shape)
        checked = []
        for k, (depth_ids, depth_targets) in enumerate(mtp_inputs, start=1):
            given = {"ids": depth_ids, "targets": depth_targets}
            if with_targets and depth_targets is None:
                raise ValueError(
                    f"mtp_inputs depth {k} has no targets but the loss is asked for (labels or "
                    "targets given): pass mtp_depth_inputs(ids, targets, depth) of the whole "
                    "sequence"
                )
            for what, t in given.items():
                if t is not None and t.shape != input_ids.shape:
                    raise ValueError(
                        f"mtp_inputs depth {k}: {what} must have the shape of input_ids "
                        f"{tuple(input_ids.shape)}, got {tuple(t.shape)}"
                    )
            checked.append(
                tuple(
                    None if t is None else t.reshape(shape).to(input_ids.device)
                    for t in (depth_ids, depth_targets)
                )
            )
        return checked

    def _moe_stats(
        self,
        routers: list[tuple[int, RouterOutput]],
        output_router_logits: bool | None,
        attention_mask: torch.Tensor | None,
        batch_shape: torch.Size,
        cu_seqlens: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """Record :attr:`moe_stats`; the aux loss when router logits are requested."""
        moe = self.config.moe
        if moe is None or not routers:
            self.moe_stats = None
            return None
        if output_router_logits is None:
            output_router_logits = moe.output_router_logits
        logits = tuple(r.logits for _, r in routers) if output_router_logits else None
        aux_loss = None
        if logits is not None and moe.aux_loss == "switch":
            aux_loss = load_balancing_loss_from_logits(
                logits,
                num_experts=moe.num_experts,
                top_k=moe.num_experts_per_tok,
                attention_mask=attention_mask,
            )
        elif logits is not None:
            aux_loss = sum(
                router_sequence_balance(r, batch_shape, attention_mask, cu_seqlens)
                for _, r in routers
            )
        self.moe_stats = MoEStats(
            layers=tuple(i for i, _ in routers),
            tokens_per_expert=torch.stack([r.tokens_per_expert for _, r in routers]),
            router_logits=logits,
            aux_loss=aux_loss,
            routers=tuple(r for _, r in routers),
        )
        return aux_loss

    def _prepare(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        max_seqlen: int | None,
        block_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, AttentionInputs]:
        """Validate the inputs; ``(ids [B, S], attention inputs)``."""
        if input_ids.dim() not in (1, 2) or input_ids.dtype.is_floating_point:
            raise ValueError(
                f"input_ids must be integer [batch, seq] or [seq], got {input_ids.dtype} "
                f"{tuple(input_ids.shape)}"
            )
        ids = input_ids if input_ids.dim() == 2 else input_ids[None]
        batch, seq = ids.shape
        device = ids.device
        mask = None
        if cu_seqlens is not None:
            if attention_mask is not None:
                raise ValueError(
                    "pass either cu_seqlens (packed documents) or attention_mask (padding), not "
                    "both; put padding of a packed row in a document of its own"
                )
            if batch != 1:
                raise ValueError(
                    f"a packed batch is one row: input_ids [1, T] or [T] with cu_seqlens, got "
                    f"{tuple(input_ids.shape)}"
                )
            if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point:
                raise ValueError(f"cu_seqlens must be a 1-D integer tensor, got {cu_seqlens!r}")
            if position_ids is not None:
                _check_cu_seqlens_end(cu_seqlens, seq)
            cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
            if position_ids is None:
                position_ids = forge_kernels.packed_position_ids(cu_seqlens)
                if position_ids.shape[0] != seq:
                    raise ValueError(
                        f"cu_seqlens ends at {position_ids.shape[0]} but the packed row has {seq} "
                        "tokens; the last boundary must equal the number of tokens"
                    )
        elif attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                    f"got {tuple(attention_mask.shape)}"
                )
            attention_mask = attention_mask.reshape(ids.shape).to(device)
            if not bool(attention_mask.bool().all()):
                # Real tokens form document 0 of their row, padding tokens document -1: padding
                # is never a key of a real token, and every query still sees itself.
                segment_ids = attention_mask.bool().to(torch.long) - 1
                mask = AttentionMask(causal=True, segment_ids=segment_ids)
        if block_ids is not None:
            mask = self._block_mask(block_ids, ids, cu_seqlens, mask)
        position_ids = self._positions(position_ids, ids, input_ids)
        cos, sin = self.rope(position_ids)
        inputs = AttentionInputs(
            cos=cos, sin=sin, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, mask=mask
        )
        return ids, inputs

    def _positions(
        self, position_ids: torch.Tensor | None, ids: torch.Tensor, input_ids: torch.Tensor
    ) -> torch.Tensor:
        """Validated RoPE positions: ``[B, S]``/``[S]``, or ``[3, ...]`` for M-RoPE."""
        seq = ids.shape[1]
        mrope = self.config.mrope_section is not None
        if position_ids is None:
            position_ids = torch.arange(seq, device=ids.device)
        position_ids = position_ids.to(ids.device)
        max_dims = 3 if mrope else 2
        if position_ids.shape[-1] != seq or position_ids.dim() > max_dims:
            expected = "[3, batch, seq] or [3, seq]" if mrope else "[batch, seq] or [seq]"
            raise ValueError(
                f"position_ids must be {expected} matching input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(position_ids.shape)}"
            )
        if mrope:
            # 3-D positions have one more dim than input_ids; others are text-only 1-D positions.
            if position_ids.dim() == input_ids.dim() + 1:
                if position_ids.shape[0] != 3:
                    raise ValueError(
                        "M-RoPE position_ids must have 3 rows (temporal, height, width), got "
                        f"shape {tuple(position_ids.shape)}"
                    )
            else:
                position_ids = position_ids.expand(3, *position_ids.shape)
        return position_ids

    @staticmethod
    def _block_mask(
        block_ids: torch.Tensor,
        ids: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        padding_mask: AttentionMask | None,
    ) -> AttentionMask | None:
        """Causal mask with bidirectional blocks, keeping documents / padding apart."""
        block_ids = block_ids.to(ids.device).reshape(ids.shape)
        if block_ids.dtype.is_floating_point:
            raise ValueError(f"block_ids must be an integer tensor, got {block_ids.dtype}")
        if not bool((block_ids >= 0).any()):
            return padding_mask  # no block: plain causal attention
        segment_ids = None if padding_mask is None else padding_mask.segment_ids
        if cu_seqlens is not None:
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
            segment_ids = torch.repeat_interleave(
                torch.arange(len(lengths), device=ids.device), lengths
            )[None]
        return AttentionMask(causal=True, segment_ids=segment_ids, block_ids=block_ids)
