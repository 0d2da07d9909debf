"""Training FLOPs of a vision-language model's vision encoder and projector, for MFU.

:func:`~forge_models.flops.flops_per_token` counts a language model per token; the vision side
has no per-token cost (its work grows with the patches of each image, and windowed or per-tile
attention with the square of each window or tile), so :func:`visual_flops` counts it per batch
of visual items (:class:`~forge_models.vlm.inputs.VisualInputs`), from their shapes and
``grid_thw`` alone (no device read).

The convention is :mod:`forge_models.flops`' (PaLM, Chowdhery et al. 2022, arXiv:2204.02311,
appendix B; Megatron-LM, Narayanan et al. 2021, arXiv:2104.04473): a matrix multiply with ``N``
weights costs ``2 N`` FLOPs per row forward (multiply + add), ``2 N`` for the gradient of its
input and ``2 N`` for the gradient of its weight; attention over a segment of ``s`` tokens
costs ``2 * 2 * s² * hidden`` forward (``q kᵀ`` and ``softmax · v`` over all heads, bidirectional:
no causal halving) and twice that backward. Embedding lookups, norms, biases, activations,
layer scales, RoPE and resampling (pixel shuffle, bilinear/bicubic interpolation) are left out,
as there. Each part's forward is split three ways (:class:`PartFlops`) and each term counts the
passes that really run (:meth:`PartFlops.training`):

    entry matmuls (read the part's input)  x (1 + trainable + input_grad)
    other matmuls                          x (1 + trainable + (trainable or input_grad))
    attention                              x (1 + 2 * (trainable or input_grad))

``trainable``: the part's weights get gradients. ``input_grad``: a part before it trains, so the
gradient flows through it. The encoder reads pixels, which need no gradient: trained, it costs
``6 N`` per patch for its blocks but ``4 N`` for the patch embedding; frozen (LLaVA stage 1,
forge-train's ``train.freeze=[vision]``) it runs forward only (``2 N``, attention ``1x``): no
weight gradients, and no input gradient either, since nothing before it trains. A frozen
projector behind a trained encoder runs forward and the input gradient (``4 N``). A trained
projector behind a frozen encoder skips the input gradient of a first linear that reads the
encoder's features directly (LLaVA-OneVision: ``4 N`` there, ``6 N`` after), not of one behind
a norm with a trained weight (the Qwen2.5-VL merger, InternVL's projector: ``6 N`` throughout,
as autograd needs the norm output's gradient for the norm's weight).

The language model follows the same rule matmul by matmul
(:func:`~forge_models.flops.flops_per_token`'s ``trainable``, ``lora_rank``/``lora_targets`` and
``input_grad``): its LoRA adapters are counted as they run and its frozen base weights without
weight gradients (``4 N``, ``2 N`` where no gradient reaches). Here a vision part holding LoRA
adapters (``lora.targets`` on ``vision.*`` or ``projector.*``) still counts as trained whole,
its base weights' ``6 N`` and not its adapters: an overcount of about ``2 N`` per base weight
for that part, as the formulas below do not split a part per linear layer.

Per family, with ``D`` the encoder width, ``I`` its MLP width, ``L`` the blocks it runs (up to
``feature_layer``), ``P`` the patch side, ``C`` the channels:

- Qwen2.5-VL ViT (:mod:`forge_models.vision.qwen2_5_vit`): entry ``C T P² D`` per patch
  (Conv3d as a matmul), blocks ``4 D² + 3 D I`` per patch (qkv, o; SwiGLU gate, up, down);
  attention per frame (``h w`` patches) in the ``fullatt_block_indexes`` blocks and per window
  in the others: a frame of ``h/m x w/m`` merge units tiled by ``k``-unit windows from its
  top-left corner has windows of ``r_i * c_j * m²`` patches (``r_i = min(k, h/m - i k)``, the
  same for columns), so ``sum s² = m⁴ (sum r_i²)(sum c_j²)``.
  Merger: ``(D m²)²`` (fc1) + ``D m² * D_text`` (fc2) per merge unit of ``m²`` patches.
- SigLIP (fixed resolution, tiles ``[N, C, S, S]``): entry ``C P² D``, blocks ``4 D² + 2 D I``
  per patch, attention per tile of ``(S / P)²`` patches. SigLIP 2 NaFlex: the same per image of
  ``h w`` patches (``grid_thw``).
- InternViT (tiles ``[N, C, H, W]``): entry ``C P² D`` per patch, blocks ``4 D² + 2 D I`` per
  token and attention per tile, over the ``(H/P)(W/P)`` patches plus the CLS token.
  Pixel-shuffle projector (InternVL): ``s² D * D_text`` (fc1) + ``D_text²`` (fc2) per token, a
  token per ``s x s`` patches of a tile. LLaVA-OneVision projector: ``D * D_text`` +
  ``D_text²`` per patch (its MLP runs before the unpadding and pooling).

The tests check these against ``torch.utils.flop_counter.FlopCounterMode`` on tiny encoders run
forward and backward, with attention computed per segment (the work a variable-length kernel
such as flash-attn's does; the CPU fallback computes dense masked scores instead).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from forge_models.vlm.inputs import VisualInputs

__all__ = [
    "PartFlops",
    "encoder_flops",
    "projector_flops",
    "visual_flops",
    "visual_flops_unsupported",
]


@dataclass(frozen=True)
class PartFlops:
    """Forward FLOPs of one part (encoder or projector) on one batch of visual items.

    Attributes:
        entry: matmuls that read the part's input directly (the patch embedding; a
            projector's first linear when no trained norm comes before it): no input gradient
            unless a part before this one trains.
        matmul: the part's other matmuls.
        attention: ``q kᵀ`` and ``softmax · v`` of every block, per attention segment.
    """

    entry: int
    matmul: int
    attention: int

    @property
    def forward(self) -> int:
        return self.entry + self.matmul + self.attention

    def training(self, *, trainable: bool, input_grad: bool) -> int:
        """Forward + backward FLOPs: see the module docstring for which passes run."""
        backward = trainable or input_grad
        return (
            self.entry * (1 + trainable + input_grad)
            + self.matmul * (1 + trainable + backward)
            + self.attention * (1 + 2 * backward)
        )


# --------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------


def _grid(visual: VisualInputs, who: str) -> list[tuple[int, int, int]]:
    visual.require("grid_thw", who=who)
    return [(int(t), int(h), int(w)) for t, h, w in visual.grid_thw.tolist()]


def _tiles(visual: VisualInputs, who: str) -> tuple[int, int, int]:
    """``(tiles, height, width)`` of tile-shaped ``pixel_values`` ``[tiles, C, H, W]``."""
    shape = tuple(visual.pixel_values.shape)
    if len(shape) != 4:
        raise ValueError(f"{who} counts tiles [tiles, C, H, W], got pixel_values {shape}")
    return shape[0], shape[2], shape[3]


def _windows_sum_sq(units: int, window: int) -> int:
    """``sum r_i²`` over the ``window``-unit strips (the last one shorter) of ``units`` units."""
    full, rest = divmod(units, window)
    return full * window * window + rest * rest


def _qwen2_5_vit(config: Any, visual: VisualInputs) -> PartFlops:
    grid = _grid(visual, "Qwen2.5-VL ViT FLOPs")
    d, m, k = config.hidden_size, config.spatial_merge_size, config.window_units
    patches = sum(t * h * w for t, h, w in grid)
    full_blocks = len(set(config.fullatt_block_indexes))
    frames_sq = sum(t * (h * w) ** 2 for t, h, w in grid)
    windows_sq = sum(
        t * m**4 * _windows_sum_sq(h // m, k) * _windows_sum_sq(w // m, k) for t, h, w in grid
    )
    block = 4 * d * d + 3 * d * config.intermediate_size
    return PartFlops(
        entry=2 * patches * config.patch_dim * d,
        matmul=2 * patches * config.depth * block,
        attention=4 * d * (full_blocks * frames_sq + (config.depth - full_blocks) * windows_sq),
    )


def _vit(config: Any, depth: int, tiles: int, tokens: int, patches: int) -> PartFlops:
    """A pre-norm ViT (GELU MLP) of ``depth`` blocks over ``tiles`` tiles of ``tokens`` tokens,
    ``patches`` of them from the patch embedding."""
    d = config.hidden_size
    block = 4 * d * d + 2 * d * config.intermediate_size
    return PartFlops(
        entry=2 * tiles * patches * config.num_channels * config.patch_size**2 * d,
        matmul=2 * tiles * tokens * depth * block,
        attention=4 * d * depth * tiles * tokens**2,
    )


def _siglip(config: Any, visual: VisualInputs) -> PartFlops:
    tiles, _, _ = _tiles(visual, "SigLIP FLOPs")
    n = config.num_patches
    return _vit(config, config.depth, tiles, n, n)


def _siglip2(config: Any, visual: VisualInputs) -> PartFlops:
    sizes = [t * h * w for t, h, w in _grid(visual, "SigLIP 2 FLOPs")]
    d = config.hidden_size
    patches = sum(sizes)
    block = 4 * d * d + 2 * d * config.intermediate_size
    return PartFlops(
        entry=2 * patches * config.num_channels * config.patch_size**2 * d,
        matmul=2 * patches * config.depth * block,
        attention=4 * d * config.depth * sum(s * s for s in sizes),
    )


def _intern_vit(config: Any, visual: VisualInputs) -> PartFlops:
    tiles, height, width = _tiles(visual, "InternViT FLOPs")
    patches = (height // config.patch_size) * (width // config.patch_size)
    return _vit(config, config.num_built_layers, tiles, patches + 1, patches)  # + CLS token


# --------------------------------------------------------------------------------------------
# Projectors
# --------------------------------------------------------------------------------------------


def _qwen2_5_merger(config: Any, visual: VisualInputs) -> PartFlops:
    units = sum(t * h * w for t, h, w in _grid(visual, "Qwen2.5-VL merger FLOPs"))
    units //= config.unit_size
    width = config.vision_hidden_size * config.unit_size
    # fc1 reads the output of a norm with a trained weight: no entry matmul (see _pixel_shuffle).
    return PartFlops(
        entry=0, matmul=2 * units * width * (width + config.out_hidden_size), attention=0
    )


def _llava_onevision(config: Any, visual: VisualInputs) -> PartFlops:
    tiles, _, _ = _tiles(visual, "LLaVA-OneVision projector FLOPs")
    rows = tiles * config.patches_per_tile
    dt = config.text_hidden_size
    return PartFlops(
        entry=2 * rows * config.vision_hidden_size * dt, matmul=2 * rows * dt * dt, attention=0
    )


def _pixel_shuffle(config: Any, visual: VisualInputs) -> PartFlops:
    tiles, height, width = _tiles(visual, "pixel-shuffle projector FLOPs")
    p, s = config.patch_size, config.scale
    tokens = tiles * (height // p // s) * (width // p // s)
    dt = config.text_hidden_size
    # fc1 reads the LayerNorm's output: when the projector trains, the norm's weight does, so
    # autograd computes fc1's input gradient even behind a frozen encoder (all of it 6 N).
    return PartFlops(
        entry=0, matmul=2 * tokens * (s * s * config.vision_hidden_size + dt) * dt, attention=0
    )


#: Config class name -> its part's forward FLOPs. Keyed by the exact class: a subclass may run
#: other modules.
_FORMULAS: dict[str, Callable[[Any, VisualInputs], PartFlops]] = {
    "forge_models.vision.qwen2_5_vit.Qwen2_5VisionConfig": _qwen2_5_vit,
    "forge_models.vision.siglip.SiglipVisionConfig": _siglip,
    "forge_models.vision.siglip2.Siglip2VisionConfig": _siglip2,
    "forge_models.vision.intern_vit.InternVisionConfig": _intern_vit,
    "forge_models.vision.qwen2_5_merger.Qwen2_5MergerConfig": _qwen2_5_merger,
    "forge_models.vision.llava_onevision_projector.LlavaOnevisionProjectorConfig": (
        _llava_onevision
    ),
    "forge_models.vision.pixel_shuffle_projector.PixelShuffleProjectorConfig": _pixel_shuffle,
}


def _key(config: Any) -> str:
    return f"{type(config).__module__}.{type(config).__qualname__}"


def _formula(config: Any, what: str) -> Callable[[Any, VisualInputs], PartFlops]:
    formula = _FORMULAS.get(_key(config))
    if formula is None:
        raise ValueError(
            f"no FLOP formula for the {what} config {type(config).__name__}; forge_models."
            "vision_flops counts the built-in encoders and projectors only (check "
            "visual_flops_unsupported(config) first, or count this part yourself)"
        )
    return formula


def encoder_flops(config: Any, visual: VisualInputs) -> PartFlops:
    """Forward :class:`PartFlops` of a built-in vision encoder (by its config) on ``visual``."""
    return _formula(config, "vision encoder")(config, visual)


def projector_flops(config: Any, visual: VisualInputs) -> PartFlops:
    """Forward :class:`PartFlops` of a built-in projector (by its config) on ``visual``."""
    return _formula(config, "projector")(config, visual)


def visual_flops_unsupported(config: Any) -> str | None:
    """Why :func:`visual_flops` cannot count the VLM ``config`` (a registered encoder or
    projector without a formula), or ``None`` when it can."""
    missing = [
        f"{what} {name!r}"
        for what, name, part in (
            ("vision encoder", config.vision_name, config.vision),
            ("projector", config.projector_name, config.projector),
        )
        if _key(part) not in _FORMULAS
    ]
    return f"no FLOP formula for the {' and '.join(missing)}" if missing else None


def visual_flops(config: Any, visual: VisualInputs, *, frozen: Iterable[str] | None = None) -> int:
    """Training FLOPs (forward + backward) of the vision encoder and projector of the
    :class:`~forge_models.vlm.config.VLMConfig` ``config`` on the items ``visual``.

    ``frozen``: the parts that get no weight gradients (default ``config.frozen``); a frozen
    encoder runs forward only, a frozen projector forward plus its input gradient when the
    encoder trains (see the module docstring). Add ``tokens x flops_per_token(config.text,
    seq_len)`` for the whole model's FLOPs.
    """
    frozen = set(config.frozen if frozen is None else frozen)
    vision_trains = "vision" not in frozen
    encoder = encoder_flops(config.vision, visual)
    projector = projector_flops(config.projector, visual)
    return encoder.training(trainable=vision_trains, input_grad=False) + projector.training(
        trainable="projector" not in frozen, input_grad=vision_trains
    )
