"""``VisionLanguageModel``: vision encoder -> projector -> forge language model.

The projected visual features replace the embeddings of the placeholder tokens (one row per
placeholder, items in order), then the language model runs on the mixed embeddings: the
composition of LLaVA (Liu et al. 2023, arXiv:2304.08485), LLaVA-OneVision (Li et al. 2024,
arXiv:2408.03326), Qwen2-VL / Qwen2.5-VL (Wang et al. 2024, arXiv:2409.12191; Bai et al. 2025,
arXiv:2502.13923) and InternVL (Chen et al. 2024, arXiv:2312.14238).

Module tree::

    vision            the encoder (forge_models.vision.*)
    projector         the projector / merger
    language_model    a CausalLM (embed_tokens, layers.{i}, norm, lm_head)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from forge_models.causal_lm import CausalLM
from forge_models.vlm.components import get_component
from forge_models.vlm.config import VLMConfig
from forge_models.vlm.inputs import VisualInputs

__all__ = ["VisionLanguageModel", "encode_visual", "projects_kinds_jointly", "visual_block_ids"]

COMPONENTS = ("vision", "projector", "language_model")

#: The built-in projectors whose rows for an item depend on that item alone, never on its kind:
#: a micro-batch's images and videos go through them in one call. (LLaVA-OneVision's pools a
#: video's frames and lays out an image's AnyRes crops: it projects each kind apart.) A
#: registered projector joins them with a ``projects_kinds_jointly = True`` attribute.
KIND_FREE_PROJECTORS = frozenset({"qwen2_5_vl_merger", "pixel_shuffle_mlp"})


def projects_kinds_jointly(projector_name: str, projector: nn.Module) -> bool:
    """Whether ``projector`` (registered as ``projector_name``) takes images and videos in one
    call (:data:`KIND_FREE_PROJECTORS`, or its own ``projects_kinds_jointly`` attribute)."""
    flag = getattr(projector, "projects_kinds_jointly", None)
    return bool(flag) if flag is not None else projector_name in KIND_FREE_PROJECTORS


def encode_visual(
    vision: nn.Module,
    projector: nn.Module,
    groups: list[VisualInputs],
    *,
    jointly: bool,
    kinds: tuple[str, ...] = (),
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(features per group, stand-in features)``: the projected features (one row per
    placeholder) of each of ``groups`` (a micro-batch's images, then its videos), from ONE call
    of the encoder ``vision`` on all their items (:meth:`VisualInputs.join`), then one call of
    ``projector`` on all of them (``jointly``: it reads no kind, :func:`projects_kinds_jointly`)
    or one call per kind in ``kinds`` order.

    Why one encoder call: under FSDP (or any sharding that gathers the encoder's weights per
    call) every data-parallel rank must make as many encoder calls as its peers, whatever its
    micro-batch holds; a rank encoding its images and its video apart made two sets of
    all-gathers where a peer with images only made one (a gloo "collective mismatch", an NCCL
    hang). The encoders encode every item (tile, frame, patch grid) on its own, so the joined
    call gives each group's rows as a call of its own does, up to the float rounding of matrix
    products over more rows (CPU and GPU GEMMs round a row differently at another row count).

    A projector that takes each kind apart is called for every kind of ``kinds`` (``("image",
    "video")`` for a model that takes videos; empty: the kinds given) on every micro-batch, the
    same count on every rank (under FSDP of the projector each call reduces its gradients):
    a kind the micro-batch lacks gets a stand-in, the first group's first tile as a one-tile
    image or a one-frame video (the ``[tiles, C, H, W]`` layout of the tile encoders such
    projectors follow), whose features the caller joins with zero weight
    (:meth:`VisionLanguageModel.stand_in_scatter`): the loss and every gradient stay as
    without it, bit for bit."""
    missing = [k for k in kinds if all(g.kind != k for g in groups)] if not jointly else []
    if len(groups) == 1 and not missing:
        visual = groups[0]
        return [projector(vision(visual), visual)], []
    joined = VisualInputs.join(groups) if len(groups) > 1 else groups[0]
    features = vision(joined)
    if jointly:
        out = projector(features, joined)
        sizes = [sum(int(n) for n in projector.num_tokens(v)) for v in groups]
        if out.shape[0] != sum(sizes):
            raise ValueError(
                f"the projector gave {out.shape[0]} rows for the joined groups, whose metadata "
                f"says {sizes} placeholder tokens; a projector whose rows depend on the item's "
                "kind must set projects_kinds_jointly = False"
            )
        return list(out.split(sizes)), []
    # Apart: the encoder's rows split as its input rows (a fixed number per tile / patch).
    rows = [int(v.pixel_values.shape[0]) for v in groups]
    per_row, rest = divmod(int(features.shape[0]), max(sum(rows), 1))
    if rest:
        raise ValueError(
            f"the encoder gave {features.shape[0]} rows for {sum(rows)} pixel_values rows: "
            "not a fixed number per row, so they cannot be split back into images and videos"
        )
    split = features.split([r * per_row for r in rows])
    parts = dict(zip([v.kind for v in groups], split, strict=True))
    given = {v.kind: v for v in groups}
    out: dict[str, torch.Tensor] = {}
    for kind in [*dict.fromkeys([*kinds, *given])]:
        if kind in given:
            out[kind] = projector(parts[kind], given[kind])
        else:
            out[kind] = projector(features[:per_row], _one_tile(groups[0], kind))
    return [out[v.kind] for v in groups], [out[k] for k in missing]


def _one_tile(visual: VisualInputs, kind: str) -> VisualInputs:
    """``visual``'s first tile as a one-tile image (its size the tile's) or a one-frame video:
    the stand-in of :func:`encode_visual` for a kind a micro-batch lacks."""
    tile = visual.pixel_values[:1]
    one = torch.ones(1, dtype=torch.long, device=tile.device)
    sizes = torch.tensor([list(tile.shape[-2:])], device=tile.device) if kind == "image" else None
    return VisualInputs(pixel_values=tile, tiles_per_item=one, image_sizes=sizes, kind=kind)


def visual_block_ids(
    input_ids: torch.Tensor, token_ids: list[int], tokens_per_item: list[list[int]]
) -> torch.Tensor:
    """``block_ids`` (same shape as ``input_ids``): a distinct id ``>= 0`` on the placeholder
    tokens of each image / video, ``-1`` elsewhere.

    ``token_ids[g]`` is a placeholder token and ``tokens_per_item[g]`` the placeholder count of
    each of its items, in order of appearance.
    """
    block_ids = torch.full_like(input_ids, -1, dtype=torch.long)
    next_id = 0
    for token_id, counts in zip(token_ids, tokens_per_item, strict=True):
        where = (input_ids == token_id).reshape(-1)
        ids = torch.repeat_interleave(
            torch.arange(next_id, next_id + len(counts), device=input_ids.device),
            torch.as_tensor(counts, device=input_ids.device),
        )
        block_ids.view(-1)[where] = ids
        next_id += len(counts)
    return block_ids


class VisionLanguageModel(nn.Module):
    """A vision-language model assembled from a :class:`VLMConfig` (see the module docstring).

    Build one with :func:`forge_models.vlm.build_vlm` (``device="meta"`` allocates nothing) or
    load a Hugging Face folder with :func:`forge_models.from_pretrained`.
    """

    def __init__(self, config: VLMConfig) -> None:
        super().__init__()
        self.config = config
        vision = get_component(config.vision_name, "vision")
        projector = get_component(config.projector_name, "projector")
        self.vision = vision.module_cls(config.vision)
        self.projector = projector.module_cls(config.projector)
        self.language_model = CausalLM(config.text)
        if config.frozen:
            self.set_trainable(**dict.fromkeys(config.frozen, False))

    @torch.no_grad()
    def init_weights(self, *, generator: torch.Generator | None = None) -> None:
        """Initialize every part in place (works after ``to_empty``, on any shard)."""
        for part in (self.vision, self.projector):
            init = getattr(part, "init_weights", None) or part.reset_parameters
            init(generator=generator) if generator is not None else init()
        self.language_model.init_weights(generator=generator)

    def set_trainable(
        self,
        *,
        vision: bool | None = None,
        projector: bool | None = None,
        language_model: bool | None = None,
    ) -> None:
        """Freeze (``False``) or unfreeze (``True``) whole parts; ``None`` leaves one as it is.

        E.g. LLaVA's stage 1 trains the projector only:
        ``set_trainable(vision=False, projector=True, language_model=False)``.
        """
        for name, flag in (
            ("vision", vision),
            ("projector", projector),
            ("language_model", language_model),
        ):
            if flag is not None:
                getattr(self, name).requires_grad_(flag)

    def trainable_parts(self) -> list[str]:
        """The parts with at least one trainable parameter."""
        return [
            n for n in COMPONENTS if any(p.requires_grad for p in getattr(self, n).parameters())
        ]

    # -- forward ------------------------------------------------------------------------------
    def visual_features(self, visual: VisualInputs) -> torch.Tensor:
        """``[placeholders, text_hidden]`` embeddings of ``visual``'s items, in order."""
        features = self.vision(visual)
        return self.projector(features, visual)

    def encode_visual(
        self, groups: list[VisualInputs]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(features per group, stand-in features)``: :meth:`visual_features` of each of
        ``groups`` (a micro-batch's images, then its videos) from one encoder call, and the
        projector called as often on every micro-batch (with stand-ins for a missing kind,
        to be joined with zero weight): see :func:`encode_visual`."""
        jointly = projects_kinds_jointly(self.config.projector_name, self.projector)
        takes_videos = self.config.video_token_id is not None
        kinds = ("image", "video") if takes_videos else ()
        return encode_visual(self.vision, self.projector, groups, jointly=jointly, kinds=kinds)

    def num_visual_tokens(self, visual: VisualInputs) -> list[int]:
        """Placeholder tokens each item of ``visual`` takes (from its metadata)."""
        return [int(n) for n in self.projector.num_tokens(visual)]

    def embed(
        self,
        input_ids: torch.Tensor,
        *,
        images: VisualInputs | None = None,
        videos: VisualInputs | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the image / video features in place of their placeholders."""
        embeds = self.language_model.embed_tokens(input_ids)
        for where, features in self.visual_scatter(input_ids, images=images, videos=videos):
            embeds = embeds.masked_scatter(where[..., None], features.to(embeds.dtype))
        return embeds

    def visual_scatter(
        self,
        input_ids: torch.Tensor,
        *,
        images: VisualInputs | None = None,
        videos: VisualInputs | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(placeholder mask, feature rows)`` of the images, then the videos (checked against
        the placeholder counts): what :meth:`embed` scatters into the token embeddings. Both
        kinds are encoded in one encoder call (:meth:`encode_visual`), so a micro-batch makes
        one call whatever it holds."""
        groups = []
        for visual, token_id, what in (
            (images, self.config.image_token_id, "image"),
            (videos, self.config.video_token_id, "video"),
        ):
            where = input_ids == token_id if token_id is not None else None
            count = 0 if where is None else int(where.sum())
            if visual is None:
                if count:
                    raise ValueError(
                        f"input_ids hold {count} {what} placeholder tokens (id {token_id}) but no "
                        f"{what}s were passed"
                    )
                continue
            if token_id is None:
                raise ValueError(f"{what}s were passed but the config has no {what}_token_id")
            groups.append((visual, token_id, what, where, count))
        if not groups:
            return []
        out = []
        encoded, stand_ins = self.encode_visual([g[0] for g in groups])
        for (visual, token_id, what, where, count), features in zip(groups, encoded, strict=True):
            if features.shape[0] != count:
                raise ValueError(
                    f"the {visual.num_items} {what}(s) give {features.shape[0]} feature rows but "
                    f"input_ids hold {count} {what} placeholder tokens (id {token_id}); expand "
                    f"each placeholder to the model's token count (num_visual_tokens: "
                    f"{self.num_visual_tokens(visual)})"
                )
            out.append((where, features))
        for features in stand_ins:
            out += self.stand_in_scatter(input_ids, features)
        return out

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        images: VisualInputs | None = None,
        videos: VisualInputs | None = None,
        block_ids: torch.Tensor | None = None,
        sequence_index: torch.Tensor | None = None,
        dummy_visual: VisualInputs | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Logits, or the next-token loss with ``labels`` (as :meth:`CausalLM.forward`).

        Args:
            input_ids: ``[B, S]`` or a packed ``[1, T]`` / ``[T]`` row with ``cu_seqlens``, holding
                ``image_token_id`` / ``video_token_id`` placeholders (as many as
                :meth:`num_visual_tokens` says per item).
            images, videos: the batch's visual items in placeholder order (all rows / packed
                documents together).
            position_ids: RoPE positions; default: M-RoPE positions from the placeholders for
                an ``mrope_section`` model (per document when packed), else as CausalLM.
            block_ids: bidirectional blocks; default with ``image_attention="bidirectional"``:
                one block per image / video.
            sequence_index: ``[n]`` positions of the (packed, one-row) sequence that this rank
                computes, for context parallelism (each rank a shard of every sequence): the
                visual features and M-RoPE positions are placed on the whole row given as
                ``input_ids`` (the encoder sees every item), then the language model runs on
                these positions only, without ``cu_seqlens`` (the context-parallel attention
                holds the documents) and with ``targets`` (the shard's next tokens, cut from
                the whole row's) in place of ``labels``. The language model runs plain causal
                attention on the shard: documents and, with ``image_attention="bidirectional"``,
                the image blocks (:meth:`attention_block_ids` of the whole row) are the
                context-parallel attention's to apply (forge-parallel's
                ``ContextParallelHandle.packed(cu_seqlens, block_ids=...)``), so ``block_ids``
                cannot be given here.
            dummy_visual: a minimal visual input (one small image, in the encoder's layout)
                run through the encoder and projector when the batch has neither ``images``
                nor ``videos`` (ignored otherwise): its features join the embeddings with
                zero weight (:meth:`_no_visual_scatter`), so a text-only micro-batch runs the
                same encoder collectives as one with images (FSDP / TP of the encoder would
                otherwise leave the other ranks waiting) and gives the encoder and projector
                exact zero gradients instead of none.
            kwargs: the rest of :meth:`CausalLM.forward` (``loss_reduction``, ``max_seqlen``,
                ``targets``).
        """
        # The features go in inside the language model's forward, where its embedding runs
        # (with FSDP, only there are the embedding's shards gathered).
        scatter = self.visual_scatter(input_ids, images=images, videos=videos)
        if images is None and videos is None and dummy_visual is not None:
            scatter = self._no_visual_scatter(input_ids, dummy_visual)
        if position_ids is None and self.config.text.mrope_section is not None:
            position_ids = self.mrope_positions(
                input_ids, images=images, videos=videos,
                attention_mask=attention_mask, cu_seqlens=cu_seqlens,
            )  # fmt: skip
        if sequence_index is not None:
            return self._forward_shard(
                input_ids, position_ids, scatter, sequence_index, block_ids, labels, kwargs
            )
        if block_ids is None:
            block_ids = self.attention_block_ids(input_ids, images=images, videos=videos)
        return self.language_model(
            input_ids,
            position_ids,
            cu_seqlens,
            attention_mask,
            labels,
            embeds_scatter=scatter,
            block_ids=block_ids,
            **kwargs,
        )

    def _no_visual_scatter(
        self, input_ids: torch.Tensor, dummy: VisualInputs
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The scatter of a batch without visual items: ``dummy``'s features under an empty
        placeholder mask, which places none of them. The embeddings are unchanged (the same
        values, bit for bit, as without it: ``masked_scatter`` copies no row and adds nothing,
        so unlike ``0 * features.sum()`` a non-finite feature cannot leak into the loss), yet
        the features stay in the graph: the backward runs through the projector and encoder
        with zero gradients (the effect of the common ``+ 0 * features.sum()``), so every
        rank runs the encoder's forward and backward collectives."""
        encoded, stand_ins = self.encode_visual([dummy])
        return [s for f in [*encoded, *stand_ins] for s in self.stand_in_scatter(input_ids, f)]

    @staticmethod
    def stand_in_scatter(
        input_ids: torch.Tensor, features: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The scatter that joins a stand-in's ``features`` to the embeddings of ``input_ids``
        with zero weight (an empty placeholder mask; see :meth:`_no_visual_scatter`): for a
        caller that runs the encoder itself, as the decoupled encoder of
        :mod:`forge_train.vlm_pipeline` does."""
        return [(torch.zeros_like(input_ids, dtype=torch.bool), features)]

    def attention_block_ids(
        self,
        input_ids: torch.Tensor,
        *,
        images: VisualInputs | None = None,
        videos: VisualInputs | None = None,
    ) -> torch.Tensor | None:
        """The bidirectional blocks :meth:`forward` attends with by default: with
        ``image_attention="bidirectional"``, :func:`visual_block_ids` (one block per image /
        video) of ``input_ids``; ``None`` with causal image attention."""
        if self.config.image_attention != "bidirectional":
            return None
        groups = [(self.config.image_token_id, images), (self.config.video_token_id, videos)]
        groups = [(t, v) for t, v in groups if v is not None]
        return visual_block_ids(
            input_ids, [t for t, _ in groups], [self.num_visual_tokens(v) for _, v in groups]
        )

    def _forward_shard(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        scatter: list[tuple[torch.Tensor, torch.Tensor]],
        index: torch.Tensor,
        block_ids: torch.Tensor | None,
        labels: torch.Tensor | None,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """The language model on positions ``index`` of the one-row ``input_ids`` (see
        :meth:`forward`'s ``sequence_index``), the features of the placeholders there."""
        if block_ids is not None:
            raise ValueError(
                "with sequence_index (context parallelism) the language model runs a plain "
                "causal shard: give the whole row's block_ids (attention_block_ids) to the "
                "context-parallel attention (ContextParallelHandle.packed(cu_seqlens, "
                "block_ids=...)) instead of to the model"
            )
        if labels is not None:
            raise ValueError(
                "with sequence_index pass targets (the shard's next tokens, shifted on the whole "
                "row) instead of labels"
            )
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(
                f"sequence_index needs one packed row [1, T] of input_ids, got "
                f"{tuple(input_ids.shape)}"
            )
        index = index.to(input_ids.device)

        def take(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(t.dim() - 1, index)

        local = []
        for where, rows in scatter:
            # Row k of ``rows`` is the k-th placeholder of the whole row.
            order = torch.cumsum(where.reshape(-1).long(), 0) - 1
            here = take(where)
            local.append((here, rows.index_select(0, order[index][here.reshape(-1)])))
        return self.language_model(
            take(input_ids),
            None if position_ids is None else take(position_ids),
            embeds_scatter=local,
            **kwargs,
        )

    def mrope_positions(
        self,
        input_ids: torch.Tensor,
        *,
        images: VisualInputs | None = None,
        videos: VisualInputs | None = None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Qwen2-VL's 3-D positions ``[3, B, S]`` for text, image and video placeholders."""
        from forge_models.vlm.mrope import mrope_position_ids

        ids = input_ids if input_ids.dim() == 2 else input_ids[None]
        merge = getattr(self.projector, "spatial_merge_size", None)
        if merge is None:
            raise ValueError(
                f"M-RoPE positions need the projector's spatial_merge_size; projector "
                f"{self.config.projector_name!r} has none: pass position_ids yourself"
            )
        mask = None if attention_mask is None else attention_mask.reshape(ids.shape)
        positions, _ = mrope_position_ids(
            ids,
            image_grid_thw=None if images is None else images.grid_thw,
            video_grid_thw=None if videos is None else videos.grid_thw,
            second_per_grid_ts=None if videos is None else videos.second_per_grid_ts,
            image_token_id=self.config.image_token_id,
            video_token_id=self.config.video_token_id,
            vision_start_token_id=self.config.vision_start_token_id,
            spatial_merge_size=merge,
            tokens_per_second=self.config.tokens_per_second,
            attention_mask=mask,
            cu_seqlens=cu_seqlens,
        )
        return positions if input_ids.dim() == 2 else positions[:, 0]
