"""Pipeline parallelism for vision-language models, with the vision encoder decoupled from the
language model's pipeline (``model.kind=vlm``, ``parallel.pp > 1``).

Only the language model's decoder blocks (and its final norm and head) form the pipeline
stages; stage 0 takes ``inputs_embeds`` (float) instead of token ids. The vision encoder, the
projector and the token embedding (with the projected visual features scattered into the
placeholder rows, as :meth:`forge_models.vlm.VisionLanguageModel.embed` does) run *ahead* of
the pipeline schedule for all of a rank's micro-batches (one encoder call per micro-batch, as
one process runs them), and their backward runs after it, from the gradient the schedule
leaves on stage 0's input. Encoder work therefore sits in no
pipeline stage: it neither slows stage 0 (the pipeline runs at the pace of its slowest stage,
and a coupled stage 0 pays the encoder on every micro-batch, also in the warm-up and cool-down
slots where the other stages idle) nor forces an uneven layer split.

Where the encoder runs. LoongForge (Baidu Baige) runs the ViT and the LLM as separate tasks
("decoupled encoder-decoder training", 1,064 vs 543 tokens/s/GPU on Qwen2.5-VL-7B at PP 2);
running the encoder only on the first-stage ranks would put all of it on one pipeline rank's
critical path while the others wait. Here every pipeline rank encodes a share of the
micro-batches, chosen from the batch (which every pipeline rank of a data-parallel group
holds) by longest-processing-time on the patch count, so the encoder's time is divided by
``pp``; the rank holding stage 0 receives the features (point-to-point), builds the embeddings
and later sends each owner the gradient of its features. A micro-batch without images or videos
encodes its stand-in image (``dummy_visual``) as one process does
(:meth:`forge_models.vlm.VisionLanguageModel.forward`): its owner back-propagates zeros from
the features (pipeline rank 0 scatters its own into the embeddings with zero weight), so with
the encoder FSDP-sharded over the data-parallel ranks a text-only rank runs the same
collectives as the others, and every pipeline rank encodes as many micro-batches on every
data-parallel rank (:func:`assign_encoder_work`). The encoder's weights are *owned* by
pipeline rank 0 (its optimizer state, its checkpoint keys, its share of the gradient norm); the
other pipeline ranks hold a compute replica, sharded over the same data-parallel axis: after
the backward their encoder gradients are summed onto pipeline rank 0 (one ``reduce``) and
dropped, and before the next forward the updated weights are broadcast back (one
``broadcast``): the same traffic as an all-reduce, with no optimizer state on the replicas.
``train.freeze`` parts are left out of both, and a frozen encoder sends no gradients back.

The token embedding is the pipeline's first pre-part run *ahead* (``pipeline(ahead=...)``):
stage 0 neither holds nor runs it, but the pipeline knows it, so a head tied to it
(``tie_word_embeddings``) is handled as for a language model (:mod:`forge_parallel.pipeline.tied`,
Megatron-LM's embedding group): the last stage holds a copy under the embedding's name,
broadcast from pipeline rank 0 at the start and after loading, the two gradients summed after
the embedding's backward (``Pipeline.step(finish=...)`` runs it before the sum), the norm
counting the matrix once. With ``parallel.tp`` the language model's stages and the embedding
are tensor-parallel (the embedding vocabulary-parallel, sharded as the tied head), with
``parallel.sequence_parallel`` as :func:`forge_train.vlm_model.vlm_text_plan` describes
(stage 0 takes the whole sequence and its first block splits it); the encoder is replicated
over the tensor-parallel ranks, which encode the same micro-batches. Virtual stages
(interleaved 1F1B) keep stage 0 on pipeline rank 0. Zero-bubble schedules split each
stage's backward, but torch runs stage 0's as one full backward (its weight pass), which
leaves the whole input gradient on the leaf before the schedule returns.

A mixture-of-experts language model's stages handle their balance losses and expert load as
a language model's (:mod:`forge_train.pipeline_moe`, the switch loss's sums carried with the
hidden states), also under ``parallel.tp``: its MoE blocks run whole on every
tensor-parallel rank (:func:`forge_train.vlm_model.vlm_text_plan`), on the rank's sequence
shard with ``parallel.sequence_parallel``, their routing statistics then summed over the
tensor-parallel ranks (:mod:`forge_train.sharded_routing`).

LoRA adapters (:func:`forge_train.lora.apply_vlm_lora`, applied before the split) go to the
stages with their layers, split with them under ``parallel.tp``
(:func:`forge_train.lora.lora_tp_styles`); the export merges them from the stages' streamed
tensors. Their dropout masks are keyed by the data (:mod:`forge_train.lora_dropout`): the
stages' by the tokens of the micro-batch they run, the encoder's by the pixel blocks of the
micro-batch it encodes (:attr:`VLMPipelineParts.dropout_keys`). FP8 linears (``train.fp8``, the language model's) live on the stages likewise, their
amaxes reduced over the ranks that split their tokens (``forge_train.fp8``).

Under context parallelism (``parallel.cp``) every context-parallel rank encodes all of a
row's items and embeds the whole row, as without pipeline stages
(:func:`forge_train.components._parallelize_vlm`): the encoder and the embedding run without
the context-parallel router, FSDP-sharded over ``dp_shard x cp`` as the stages; stage 0 takes
the rank's positions of the rows (``ContextParallelInputs.shard``'s ``sequence_index``) and
the gradient of the whole rows (zero at the other ranks' positions) goes back to the
features and the embedding, the ranks' gradients averaged by FSDP. With the language model
frozen (``train.freeze=[language_model]``) its stages still run forward and backward, so the
gradient reaches the projector and the encoder; a stage with nothing to train has an
optimizer that steps nothing (``build_optimizer(allow_empty=True)``) and no optimizer state in
the checkpoint.

The blocks of every stage get each micro-batch's attention inputs, M-RoPE positions and
bidirectional image blocks included, as pipeline block arguments
(:meth:`forge_models.CausalLM.attention_inputs`, see :mod:`forge_train.pipeline_step`).
On each rank :attr:`VLMPipelineParts.stage` is one module holding everything this rank owns
under the whole model's parameter names (``vision.*``, ``projector.*``,
``language_model.embed_tokens.*`` on pipeline rank 0, its decoder blocks, ``norm`` and
``lm_head`` on the last), so the optimizer, the checkpoints (resumable at any layout) and the
Hugging Face export (:meth:`~forge_train.pipeline_model.PipelineParts.full_state_dict`
gathers the stages) work as for a language model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from forge_train.config import ConfigError
from forge_train.pipeline_model import PipelineLoss, PipelineParts

__all__ = [
    "DecoderTrunk",
    "TokenEmbedding",
    "VLMPipelineParts",
    "VisualEncoder",
    "assign_encoder_work",
    "build_vlm_pipeline",
    "check_vlm_pipeline",
]

#: The batch keys of the visual inputs, with the config field of their placeholder token.
VISUAL_KINDS = (("images", "image_token_id"), ("videos", "video_token_id"))


class VisualEncoder(nn.Module):
    """A VLM's vision encoder and projector (``vision.*``, ``projector.*``):
    ``forward(visual)`` gives the projected features, one row per placeholder token; given a
    list (a micro-batch's images and videos), the features of each from one encoder call
    (:func:`forge_models.vlm.model.encode_visual`, as the whole model encodes them)."""

    def __init__(self, model: nn.Module) -> None:
        from forge_models.vlm.model import projects_kinds_jointly

        super().__init__()
        self.vision = model.vision
        self.projector = model.projector
        self.jointly = projects_kinds_jointly(model.config.projector_name, model.projector)

    def forward(self, visual) -> torch.Tensor | list[torch.Tensor]:
        if not isinstance(visual, (list, tuple)):
            return self.projector(self.vision(visual), visual)
        from forge_models.vlm.model import encode_visual

        # No stand-ins for a kind the micro-batch lacks: the projector is part of this one
        # module (one FSDP unit), whose gradients are reduced once however often it runs.
        features, _ = encode_visual(self.vision, self.projector, list(visual), jointly=self.jointly)
        return features


class TokenEmbedding(nn.Module):
    """The language model's token embedding (``language_model.embed_tokens``) with visual
    features in place of their placeholder tokens."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.language_model = nn.Module()
        self.language_model.embed_tokens = model.language_model.embed_tokens

    def forward(
        self, input_ids: torch.Tensor, scatters: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """``scatters``: ``(placeholder mask like input_ids, features [placeholders, hidden])``
        per visual kind, the features in row-major order of the mask."""
        embeds = self.language_model.embed_tokens(input_ids)
        for where, features in scatters:
            embeds = embeds.masked_scatter(where[..., None], features.to(embeds.dtype))
        return embeds


class DecoderTrunk(nn.Module):
    """The language model's parts in the order they run (``language_model.embed_tokens``,
    ``layers``, ``norm``, ``lm_head``): what the pipeline splits, with the token embedding
    run ahead of the schedule (``pipeline(ahead=...)``), so stage 0 takes embeddings. Held
    here, the embedding names a head tied to it (``tie_word_embeddings``) as one process
    does, and the pipeline keeps the two copies in sync (:mod:`forge_parallel.pipeline.tied`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        lm = model.language_model
        self.language_model = nn.Module()
        self.language_model.embed_tokens = lm.embed_tokens
        self.language_model.layers = lm.layers
        self.language_model.norm = lm.norm
        self.language_model.lm_head = lm.lm_head


def _mount(root: nn.Module, module: nn.Module, prefix: str = "") -> None:
    """Register ``module``'s sub-modules in ``root`` under their paths, through fresh
    containers (a path's plain ``nn.Module`` / ``ModuleDict`` parents are recreated, so modules
    of several parts merge under one ``language_model``)."""
    for name, child in module.named_children():
        if type(child) in (nn.Module, nn.ModuleDict):  # a container: merge its children
            if name not in root._modules:
                root.add_module(name, nn.Module())
            _mount(root._modules[name], child, f"{prefix}{name}.")
        elif name in root._modules:
            raise AssertionError(f"{prefix}{name} is mounted twice")
        else:
            root.add_module(name, child)


def assign_encoder_work(costs: list[int], ranks: int) -> list[int]:
    """The pipeline rank that encodes each micro-batch: largest cost first, each to the rank
    with the least work so far (ties to the highest rank: rank 0 also embeds and runs stage
    0) among those with room left. Of the ``n`` micro-batches to encode, each rank takes
    ``n // ranks``, the highest ``n % ranks`` ranks one more: a count set by ``n`` alone, not
    by the costs, because the encoder is FSDP-sharded over the data-parallel ranks, whose
    encoder calls must pair up (one all-gather per call): with every micro-batch encoded
    (images, videos or the stand-in image of a text-only one) ``n`` is the same on every
    data-parallel rank, and so is each pipeline rank's count, whatever the image sizes.
    Micro-batches with nothing to encode (cost 0) stay on rank 0, which needs no features
    for them. Deterministic: every pipeline rank computes it from its own copy of the batch."""
    owners = [0] * len(costs)
    load = [0] * ranks
    work = [i for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)) if costs[i]]
    room = [len(work) // ranks + (r >= ranks - len(work) % ranks) for r in range(ranks)]
    for i in work:
        rank = min((r for r in range(ranks) if room[r]), key=lambda r: (load[r], -r))
        owners[i] = rank
        load[rank] += costs[i]
        room[rank] -= 1
    return owners


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def check_vlm_pipeline(config, parallel) -> None:
    """``ConfigError`` for the VLM layouts the decoupled pipeline does not carry yet."""
    text = config.text
    if text.num_layers < parallel.pp:
        raise ConfigError(
            f"parallel.pp: {parallel.pp} pipeline stages need at least {parallel.pp} language "
            f"model layers, the model has {text.num_layers}; lower parallel.pp"
        )
    if getattr(text, "mtp_depth", 0):
        raise ConfigError(
            "parallel.pp: multi-token prediction modules are not pipelined yet; set "
            "model.config.text.mtp_depth=0 or parallel.pp=1"
        )
    if parallel.pp_schedule == "zbv" and text.tie_word_embeddings:
        raise ConfigError(
            "parallel.pp_schedule: zbv places the first and the last stage on one rank, where "
            "the token embedding run ahead of the pipeline and the head tied to it would be one "
            "parameter of two separately wrapped parts; use interleaved_1f1b or zero_bubble, or "
            "+model.config.text.tie_word_embeddings=false (a new model)"
        )


@dataclass
class _Step:
    """What one schedule call of :meth:`VLMPipelineParts.first_stage_inputs` keeps for its
    backward: the token ids and visual groups, stage 0's embeddings and input leaf (rank 0),
    the ``(kind, owner)`` of each received feature block (rank 0) and this rank's own encoded
    features per kind (the stand-ins' included)."""

    ids: torch.Tensor
    groups: list[tuple]
    embeds: torch.Tensor | None = None
    leaf: torch.Tensor | None = None
    received: list[tuple[int, int]] = field(default_factory=list)
    own: dict[int, torch.Tensor] = field(default_factory=dict)
    #: Under context parallelism: this rank's positions of the whole rows (stage 0 takes
    #: the embeddings there), else ``None``.
    index: torch.Tensor | None = None

    def row_gradient(self) -> torch.Tensor:
        """The gradient of the whole rows' embeddings: stage 0's input gradient, placed at this
        rank's positions under context parallelism (zero at the other ranks')."""
        if self.index is None:
            return self.leaf.grad
        return torch.zeros_like(self.embeds).index_copy_(1, self.index, self.leaf.grad)


@dataclass
class VLMPipelineParts(PipelineParts):
    """:class:`PipelineParts` of a vision-language model (see the module docstring):
    ``encoder`` (vision + projector; pipeline rank 0's own, a replica elsewhere) and
    ``embedding`` (pipeline rank 0 only) run ahead of the schedule."""

    encoder: VisualEncoder | None = None
    embedding: TokenEmbedding | None = None
    vlm_config: Any = None
    #: The replica's weights may differ from pipeline rank 0's (set after each backward).
    stale: bool = True
    _frozen_synced: bool = False
    #: The run's keyed LoRA dropout (``forge_train.lora_dropout.DropoutKeys``; None: none):
    #: each training encoder call runs with its micro-batch's visual keys, in a mode that
    #: blocks recomputed in backward re-enter with ``dropout_replay``.
    dropout_keys: Any = None
    dropout_replay: bool = False

    @property
    def pp_rank(self) -> int:
        return dist.get_rank(self.group)

    def _global(self, pp_rank: int) -> int:
        return dist.get_global_rank(self.group, pp_rank)

    def materialize(self, device: torch.device, *, init: bool = True) -> None:
        import forge_models

        if self.pp_rank != 0:  # the replica (pipeline rank 0's encoder is part of its stage)
            forge_models.materialize(self.encoder, device, init=False)
        super().materialize(device, init=init)

    def norm_parameters(self) -> list[nn.Parameter]:
        """The pipeline's (pipeline rank 0's embedding included, a tied head's copy counted
        once), and pipeline rank 0's encoder (not the replicas)."""
        own = super().norm_parameters()
        if self.pp_rank == 0:
            own += list(self.encoder.parameters())
        return own

    # -- encoder weights: owned by pipeline rank 0, replicated on the others ------------------
    def _encoder_params(self, *, trainable: bool) -> list[nn.Parameter]:
        return [p for p in self.encoder.parameters() if p.requires_grad or not trainable]

    @torch.no_grad()
    def sync_encoder(self) -> None:
        """Broadcast the encoder weights from pipeline rank 0 to the replicas (every pipeline
        rank calls it): all of them the first time, then the trainable ones."""
        params = self._encoder_params(trainable=self._frozen_synced)
        self._frozen_synced = True
        if not params or self.pp == 1:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        local = [_local(p.data) for p in params]
        flat = _flatten_dense_tensors(local)
        dist.broadcast(flat, src=self._global(0), group=self.group)
        for t, value in zip(local, _unflatten_dense_tensors(flat, local), strict=True):
            t.copy_(value)

    @torch.no_grad()
    def _reduce_encoder_grads(self) -> None:
        """Sum the replicas' encoder gradients onto pipeline rank 0's and drop them."""
        params = self._encoder_params(trainable=True)
        if not params or self.pp == 1:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        for p in params:
            if p.grad is None:  # no micro-batch encoded here: still joins the sum
                p.grad = torch.zeros_like(p)
        local = [_local(p.grad) for p in params]
        flat = _flatten_dense_tensors(local)
        dist.reduce(flat, dst=self._global(0), group=self.group)
        if self.pp_rank == 0:
            for t, value in zip(local, _unflatten_dense_tensors(flat, local), strict=True):
                t.copy_(value)
        else:
            for p in params:
                p.grad = None

    @property
    def pp(self) -> int:
        return dist.get_world_size(self.group)

    # -- the schedule's first-stage inputs ----------------------------------------------------
    def first_stage_inputs(self, ids, batches, *, backward: bool):
        """Encode this rank's share of the micro-batches, gather the features on pipeline rank
        0 and embed there; returns ``(stage 0's inputs, finish)`` where ``finish()`` (after
        the schedule) back-propagates stage 0's input gradient into the embedding and the
        encoders of every pipeline rank."""
        if self.stale:
            self.sync_encoder()
            self.stale = False
        if self.pp_rank != 0:
            # The replica is outside the stage that the evaluation's ``model.eval()`` reaches
            # (pipeline rank 0's encoder is in its stage): a forward without backward (the
            # evaluation's, the only one) runs it in eval mode, without dropout, as one
            # process does; a training step back in training mode.
            self.encoder.train(backward)
        grad = backward and torch.is_grad_enabled()
        needs_feature_grad = grad and bool(self._encoder_params(trainable=True))
        groups = self._visual_groups(ids, batches)
        state = _Step(ids=ids, groups=groups)
        dtype = self._exchange_dtype
        hidden = self.vlm_config.text.hidden_size
        me = self.pp_rank
        features: dict[int, list[torch.Tensor | None]] = {}
        # One encoder call per micro-batch, its images and videos together, as one process
        # runs it: every data-parallel rank then makes as many calls (the encoder is
        # FSDP-sharded over them) whatever its micro-batches hold. Not one call for all of
        # them: that would make a dense-mask attention backend (CPU) quadratic in the total
        # patches.
        encoded: dict[tuple[int, int], torch.Tensor] = {}
        owners = groups[0][3] if groups else []
        for i, owner in enumerate(owners):
            kinds = [k for k, group in enumerate(groups) if group[1][i] is not None]
            if owner != me or not kinds:
                continue
            with self._encoder_keys(i, grad):
                outs = self.encoder([groups[k][1][i] for k in kinds])
            encoded.update({(k, i): out for k, out in zip(kinds, outs, strict=True)})
        for k, (token_id, visual, counts, owners) in enumerate(groups):
            mine = [i for i, o in enumerate(owners) if o == me and visual[i] is not None]
            if mine:
                out = torch.cat([encoded[k, i] for i in mine]).to(dtype)
                expected = sum(counts[i] for i in mine)
                if token_id is not None and out.shape[0] != expected:
                    raise ValueError(
                        f"the encoder gave {out.shape[0]} feature rows for {expected} placeholder "
                        "tokens; expand each placeholder to the model's token count"
                    )
                state.own[k] = out
            if token_id is None:  # stand-ins: their features stay where they were encoded
                continue
            if me != 0:
                if mine:
                    dist.send(out.detach().contiguous(), dst=self._global(0), group=self.group)
                continue
            blocks: list[torch.Tensor | None] = [None] * len(owners)
            for owner in range(self.pp):
                rows = [i for i, o in enumerate(owners) if o == owner and counts[i]]
                if not rows:
                    continue
                if owner == 0:
                    block = state.own[k]
                else:
                    n = sum(counts[i] for i in rows)
                    block = torch.empty(n, hidden, dtype=dtype, device=ids.device)
                    dist.recv(block, src=self._global(owner), group=self.group)
                    state.received.append((k, owner))
                for i, part in zip(rows, block.split([counts[i] for i in rows]), strict=True):
                    blocks[i] = part
            features[k] = blocks
        if me != 0:
            return (), lambda: self._finish(state, grad, needs_feature_grad)
        scatters = []
        for k, (token_id, *_) in enumerate(groups):
            if token_id is None:  # rank 0's stand-ins: in the embeddings with zero weight
                from forge_models.vlm import VisionLanguageModel

                if k in state.own:
                    scatters += VisionLanguageModel.stand_in_scatter(ids, state.own[k])
                continue
            parts = [f for f in features[k] if f is not None]
            if parts:
                scatters.append((ids == token_id, torch.cat(parts)))
        state.embeds = self.embedding(ids, scatters)
        shard = state.embeds
        # Context parallelism: the features go into the whole rows, stage 0 takes this rank's
        # positions of them (ContextParallelInputs.shard's sequence_index, one for every row).
        state.index = batches[0].get("sequence_index") if batches else None
        if state.index is not None:
            shard = shard.index_select(1, state.index)
        # The leaf needs a gradient for the embedding, for rank 0's own features, or for the
        # features of the other ranks (whose gradients are its rows at their placeholders).
        wanted = state.embeds.requires_grad or (needs_feature_grad and bool(state.received))
        state.leaf = shard.detach().requires_grad_(grad and wanted)
        return (state.leaf,), lambda: self._finish(state, grad, needs_feature_grad)

    def _encoder_keys(self, microbatch: int, grad: bool):
        """The LoRA dropout keys of the ``microbatch``-th micro-batch's encoding in a training
        step (:meth:`forge_train.lora_dropout.DropoutKeys.encoding`), else nothing."""
        import contextlib

        if self.dropout_keys is None or not (grad and self.encoder.training):
            return contextlib.nullcontext()
        return self.dropout_keys.encoding(microbatch, replay=self.dropout_replay)

    @property
    def _exchange_dtype(self) -> torch.dtype:
        """The dtype features and their gradients travel in: the encoder's parameters'."""
        return next(self.encoder.parameters()).dtype

    def _visual_groups(self, ids: torch.Tensor, batches: list[dict[str, Any]]):
        """Per visual kind present in the batch: ``(placeholder token id, visual inputs per
        micro-batch, placeholder count per micro-batch, encoding rank per micro-batch)``, then,
        if a micro-batch has neither images nor videos but a stand-in image
        (``dummy_visual``, see :meth:`forge_models.vlm.VisionLanguageModel.forward`), the
        stand-ins' group, with token id ``None`` and no placeholders: the micro-batch's owner
        encodes its stand-in and back-propagates zeros from it (the stand-in's features join
        the embeddings with zero weight), so a text-only micro-batch runs the encoder's
        collectives as one process does. A micro-batch's inputs of every kind go to one
        pipeline rank (:func:`assign_encoder_work` on their total patch count)."""
        kinds = []
        for key, token_field in VISUAL_KINDS:
            visual = [b.get(key) for b in batches]
            if all(v is None for v in visual):
                continue
            token_id = getattr(self.vlm_config, token_field)
            counts = [int((row == token_id).sum()) for row in ids]
            for i, (v, n) in enumerate(zip(visual, counts, strict=True)):
                if (v is None) != (n == 0):
                    raise ValueError(
                        f"micro-batch {i} has {n} {key[:-1]} placeholder tokens (id {token_id}) "
                        f"but {'no' if v is None else 'some'} {key}"
                    )
            kinds.append((token_id, visual, counts))
        keys = [key for key, _ in VISUAL_KINDS]
        stand_ins = [
            None if any(b.get(key) is not None for key in keys) else b.get("dummy_visual")
            for b in batches
        ]
        if any(v is not None for v in stand_ins):
            kinds.append((None, stand_ins, [0] * len(batches)))
        costs = [
            sum(
                int(visual[i].pixel_values.shape[0])
                for _, visual, _ in kinds
                if visual[i] is not None
            )
            for i in range(len(batches))
        ]
        owners = assign_encoder_work(costs, self.pp)
        return [(token_id, visual, counts, owners) for token_id, visual, counts in kinds]

    def _finish(self, state: _Step, grad: bool, needs_feature_grad: bool) -> None:
        """After the schedule: the gradients of the other ranks' features (stage 0's input
        gradient at their placeholder rows) sent to them first, so their encoders' backward
        runs while rank 0 back-propagates into its own features and the embedding; then the
        encoders' gradients summed on pipeline rank 0."""
        if not grad:
            return
        self.stale = True
        exchange = needs_feature_grad and bool(state.groups)
        if self.pp_rank == 0:
            leaf = state.leaf
            if leaf is not None and leaf.requires_grad and leaf.grad is None:
                raise RuntimeError(
                    "the pipeline schedule left no gradient on stage 0's input embeddings; the "
                    "encoder and the token embedding cannot be trained with this schedule"
                )
            row_grad = state.row_gradient() if leaf is not None and leaf.requires_grad else None
            if exchange:
                self._send_feature_grads(state, row_grad)
            if state.embeds is not None and state.embeds.requires_grad:
                state.embeds.backward(row_grad)
        elif exchange:
            outs, grads = [], []
            for k in sorted(state.own):
                if state.groups[k][0] is None:  # stand-ins: zero weight, so zero gradient
                    g = torch.zeros_like(state.own[k])
                else:
                    g = torch.empty_like(state.own[k])
                    dist.recv(g, src=self._global(0), group=self.group)
                outs.append(state.own[k])
                grads.append(g)
            if outs:
                torch.autograd.backward(outs, grads)
        if exchange:
            self._reduce_encoder_grads()

    def _send_feature_grads(self, state: _Step, row_grad: torch.Tensor) -> None:
        """Send each received feature block's gradient back to the rank that encoded it: the
        rows of the whole rows' embedding gradient ``row_grad`` at the block's placeholders
        (``masked_scatter`` copies the features there, and each kind's placeholders are its
        own)."""
        for k, owner in state.received:
            token_id, _, counts, owners = state.groups[k]
            rows = row_grad[state.ids == token_id].split(counts)
            mine = [rows[i] for i, o in enumerate(owners) if o == owner and counts[i]]
            g = torch.cat(mine).to(self._exchange_dtype)  # the owner's features' dtype
            dist.send(g.contiguous(), dst=self._global(owner), group=self.group)


def _whole_on_context_ranks(parallelized) -> None:
    """The encoder and the token embedding run on the whole rows on every context-parallel
    rank (each rank encodes all of a row's items, as without pipeline stages): no attention
    routed over ``mesh["cp"]`` (``parallelize`` installs it on a mesh with ``cp > 1``), their
    FSDP shards over ``dp_shard x cp`` as the stages', averaging each rank's gradient of its
    own positions' loss."""
    handle = getattr(parallelized, "context_parallel_handle", None)
    if handle is not None:
        handle.remove()


def build_vlm_pipeline(
    model: nn.Module,
    config,
    mesh,
    *,
    microbatches: int,
    schedule: str,
    split: str,
    stage_parallel: dict[str, Any],
    virtual_stages: int = 1,
    sequence_parallel: bool = False,
    encoder_recompute: Any = "stages",
) -> VLMPipelineParts:
    """Split a :class:`~forge_models.vlm.VisionLanguageModel`'s decoder over ``mesh["pp"]``
    (``virtual_stages`` stages per pipeline rank) and place its encoder and embedding (see the
    module docstring); ``stage_parallel``: :func:`forge_parallel.parallelize` arguments but
    ``plan``, applied to every part. With ``mesh["tp"]`` the language model's stages and its
    embedding are tensor-parallel (:func:`forge_train.vlm_model.vlm_text_plan`, with
    ``sequence_parallel``), the encoder replicated over the tensor-parallel ranks.
    ``encoder_recompute``: the encoder's ``RecomputeConfig`` (or ``None``), if not the stages'."""
    from forge_models.vlm import build_vlm
    from forge_parallel import parallelize
    from forge_parallel.pipeline import pipeline, stage_plan
    from forge_train.lora import lora_tp_plan
    from forge_train.vlm_model import vlm_text_plan

    if mesh.size("tp") > 1:
        text_plan = vlm_text_plan(
            model.language_model, sequence_parallel=sequence_parallel, prefix="language_model."
        )
        # LoRA-adapted layers split with their adapters
        stage_parallel = {**stage_parallel, "plan": lora_tp_plan(model, text_plan)}
    loss = PipelineLoss(microbatches=microbatches, vocab_size=config.text.vocab_size)
    moe = None
    if getattr(config.text, "moe", None) is not None:  # as a language model's stages do
        from forge_train.pipeline_moe import PipelineMoE

        moe = PipelineMoE(config.text, microbatches=microbatches)
    on_meta = any(p.is_meta for p in model.parameters())
    pipe = pipeline(
        DecoderTrunk(model),
        mesh,
        loss_fn=loss,
        schedule=schedule,
        microbatches=microbatches,
        virtual_stages=virtual_stages,
        split=split,
        stage_parallel=stage_parallel,
        ahead=("language_model.embed_tokens",),
        block_output=moe,
        carry=moe if moe is not None and moe.switch else None,  # the switch loss's sums
    )
    plan = stage_parallel.get("plan")
    # The encoder is replicated over the tensor-parallel ranks (an empty plan), which encode
    # the same micro-batches.
    encoder_parallel = {**stage_parallel, "plan": None if plan is None else {}}
    if encoder_recompute != "stages":
        encoder_parallel["recompute"] = encoder_recompute
    encoder = VisualEncoder(model)
    _whole_on_context_ranks(parallelize(encoder, mesh, **encoder_parallel))
    owned = nn.Module()  # everything this rank owns, under the whole model's names
    pp_rank = dist.get_rank(pipe.group)
    embedding = None
    if pp_rank == 0:
        embedding = TokenEmbedding(model)
        # Under tensor parallelism the embedding is vocabulary-parallel as in the language
        # model's plan: the same shards as a head tied to it on the last stage.
        embedding_parallel = {
            **encoder_parallel,
            "recompute": None,
            "compile": False,
            "plan": None if plan is None else stage_plan(plan, embedding),
        }
        _whole_on_context_ranks(parallelize(embedding, mesh, **embedding_parallel))
        _mount(owned, encoder)
        _mount(owned, embedding)
    _mount(owned, pipe.local_module())
    if not on_meta:  # a meta-device model syncs after its initialization (materialize)
        pipe.sync_tied_weights()
    return VLMPipelineParts(
        pipe=pipe,
        stage=owned,
        loss=loss,
        inputs_model=build_vlm(config, device="meta").language_model,
        stage_parallel=pipe.parallelized[0],
        moe=moe,
        whole_model=model if on_meta else None,
        encoder=encoder,
        embedding=embedding,
        vlm_config=config,
    )
