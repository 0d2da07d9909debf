"""InternViT, the vision encoder of InternVL (transformers ``InternVLVisionModel``).

Papers: ViT, Dosovitskiy et al. 2020, arXiv:2010.11929 (patch embedding, CLS token, learned
absolute positions); InternVL, Chen et al. 2023, arXiv:2312.14238 (InternViT-6B: RMSNorm, q/k
norm); InternVL 2.5, Chen et al. 2024, arXiv:2412.05271 (InternViT-300M with LayerNorm, dynamic
tiling). Layer scale: CaiT, Touvron et al. 2021, arXiv:2103.17239.

Each tile (a fixed-size crop of an image, or a video frame) is a ``C x H x W`` image cut into
``P x P`` patches; a CLS token is prepended, learned positions added (bicubically interpolated
when the tile's patch grid differs from the configured one), and pre-norm blocks run::

    h = x + ls1 * attn(norm1(x))
    y = h + ls2 * mlp(norm2(h))

Module tree (the parameter names forge-ckpt maps, see
``forge_ckpt.mapping.families.intern_vit_vision``)::

    patch_embed.weight [D, C, P, P], patch_embed.bias [D]      (a stride-P conv, as a matmul)
    cls_token [1, 1, D]
    pos_embed [1, 1 + N, D]                                    (use_absolute_position_embeddings)
    blocks.{i}.norm1.weight (.bias for layer_norm)
    blocks.{i}.attn.{q,k,v}_proj.weight [D, D] (.bias with attention_bias)
    blocks.{i}.attn.{q,k}_norm.weight [D]                      (use_qk_norm; RMSNorm over all heads)
    blocks.{i}.attn.o_proj.weight [D, D], .bias
    blocks.{i}.ls1 [D], blocks.{i}.ls2 [D]                     (layer scale)
    blocks.{i}.norm2.weight (.bias)
    blocks.{i}.mlp.fc1.weight [I, D], .bias; blocks.{i}.mlp.fc2.weight [D, I], .bias
    unapplied_blocks.{k}. ...                                  (the checkpoint's blocks after
                                                               feature_layer: buffers, never run)
    post_norm.weight, post_norm.bias                           (post_norm; applied only with
                                                               feature_layer == -1, else buffers)

As a VLM encoder it reads ``VisualInputs.pixel_values`` ``[tiles, C, H, W]`` (all tiles of a
batch share one size) and returns the features packed as ``[tiles * patches, D]``, without the
CLS token (``drop_cls_token``: transformers' ``vision_feature_select_strategy="default"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from forge_kernels.attention import attention
from forge_models.blocks.norm import RMSNorm
from forge_models.init import init_
from forge_models.vision.unapplied_blocks import UnappliedBlocks
from forge_models.vision.vit_blocks import (
    ConvPatchEmbed,
    LayerNorm,
    UnappliedLayerNorm,
    VitMLP,
    activation,
    feature_layer_depth,
    square_size,
)
from forge_models.vlm.inputs import VisualInputs

__all__ = [
    "InternVisionConfig",
    "InternVisionEncoder",
    "intern_vit_config_from_hf",
    "intern_vit_config_to_hf",
]

#: transformers' InternViT q/k RMSNorm uses its default epsilon, not ``layer_norm_eps``.
QK_NORM_EPS = 1e-6


@dataclass(frozen=True, kw_only=True)
class InternVisionConfig:
    """InternViT hyper-parameters (the keys of transformers' ``InternVLVisionConfig``).

    Attributes:
        num_layers: the checkpoint's blocks; the encoder runs :attr:`num_built_layers` and
            carries the rest unapplied (buffers, for a bit-exact checkpoint round trip).
        norm_type: ``"layer_norm"`` (InternViT-300M) or ``"rms_norm"`` (InternViT-6B).
        image_size: the tile size ``(h, w)`` (or one int) the position table was trained for.
        patch_size: the (square) patch side in pixels.
        post_norm: a final LayerNorm on the last block's output (transformers applies it when
            ``use_mean_pooling`` is false); applied only with ``feature_layer == -1``, else
            carried unapplied (transformers loads it but reads an inner hidden state).
        feature_layer: the hidden state returned, indexed as transformers' ``hidden_states``
            (0: the embeddings, ``i``: after block ``i``; negative from the end, ``-1`` the
            last block, then ``post_norm``), InternVL's ``vision_feature_layer``. Only the
            blocks it needs run; the later ones are carried unapplied.
        drop_cls_token: drop the CLS token from the output (a VLM encoder; transformers'
            ``vision_feature_select_strategy="default"``).
    """

    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "gelu"
    norm_type: str = "layer_norm"
    norm_eps: float = 1e-6
    attention_bias: bool = False
    use_qk_norm: bool = False
    image_size: tuple[int, int] = (448, 448)
    patch_size: int = 14
    num_channels: int = 3
    layer_scale_init_value: float = 0.1
    use_absolute_position_embeddings: bool = True
    post_norm: bool = False
    feature_layer: int = -1
    drop_cls_token: bool = True
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        size = self.image_size
        size = (size, size) if isinstance(size, int) else tuple(int(v) for v in size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"InternVisionConfig.image_size must be (h, w) or an int, got {size}")
        object.__setattr__(self, "image_size", size)
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"InternVisionConfig.{name} must be >= 1, got {getattr(self, name)}"
                )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"InternVisionConfig: hidden_size {self.hidden_size} is not divisible by "
                f"num_heads {self.num_heads}; choose num_heads dividing hidden_size"
            )
        if self.norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(
                f"InternVisionConfig.norm_type must be 'layer_norm' or 'rms_norm', got "
                f"{self.norm_type!r}"
            )
        activation(self.hidden_act)
        if any(s % self.patch_size for s in self.image_size):
            raise ValueError(
                f"InternVisionConfig: image_size {self.image_size} is not a multiple of "
                f"patch_size {self.patch_size}"
            )
        if self.feature_layer is None:
            raise ValueError(
                "InternVisionConfig.feature_layer must be an int (-1: the last layer, then "
                "post_norm if set), as InternVL's vision_feature_layer"
            )
        feature_layer_depth(self.num_layers, self.feature_layer)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> tuple[int, int]:
        """The patch grid of a tile of ``image_size`` (the position table's grid)."""
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @property
    def num_built_layers(self) -> int:
        """The blocks ``feature_layer`` needs and the encoder runs (the hidden state it
        selects comes after them)."""
        return feature_layer_depth(self.num_layers, self.feature_layer)

    @property
    def applies_post_norm(self) -> bool:
        return self.post_norm and self.feature_layer == -1


def intern_vit_config_from_hf(
    hf_vision_config: Mapping[str, Any],
    *,
    vision_feature_layer: int = -1,
    vision_feature_select_strategy: str = "default",
) -> InternVisionConfig:
    """:class:`InternVisionConfig` from the ``vision_config`` dict of an InternVL ``config.json``.

    ``vision_feature_layer`` and ``vision_feature_select_strategy`` are keys of the top-level
    InternVL config (defaults as there); ``"default"`` drops the CLS token, ``"full"`` keeps it.
    """
    hf = hf_vision_config
    if not isinstance(vision_feature_layer, int):
        raise ValueError(
            f"vision_feature_layer {vision_feature_layer!r}: features from several layers are "
            "not supported; give one layer index"
        )
    if vision_feature_select_strategy not in ("default", "full"):
        raise ValueError(
            f"vision_feature_select_strategy must be 'default' or 'full', got "
            f"{vision_feature_select_strategy!r}"
        )
    for key in ("hidden_dropout_prob", "attention_dropout", "projection_dropout"):
        if float(hf.get(key) or 0.0) != 0.0:
            raise ValueError(
                f"InternViT: {key}={hf[key]} is not supported (forge's encoder has no dropout); "
                f"set {key} to 0.0 in the vision config"
            )
    return InternVisionConfig(
        hidden_size=int(hf.get("hidden_size", 1024)),
        num_layers=int(hf.get("num_hidden_layers", 24)),
        num_heads=int(hf.get("num_attention_heads", 16)),
        intermediate_size=int(hf.get("intermediate_size", 4096)),
        hidden_act=str(hf.get("hidden_act", "gelu")),
        norm_type=str(hf.get("norm_type", "layer_norm")),
        norm_eps=float(hf.get("layer_norm_eps", 1e-6)),
        attention_bias=bool(hf.get("attention_bias", False)),
        use_qk_norm=bool(hf.get("use_qk_norm", False)),
        image_size=hf.get("image_size", 448),
        patch_size=square_size(hf, "patch_size", "InternVisionConfig")
        if "patch_size" in hf
        else 14,
        num_channels=int(hf.get("num_channels", 3)),
        layer_scale_init_value=float(hf.get("layer_scale_init_value", 0.1)),
        use_absolute_position_embeddings=bool(hf.get("use_absolute_position_embeddings", True)),
        post_norm=not bool(hf.get("use_mean_pooling", True)),
        feature_layer=vision_feature_layer,
        drop_cls_token=vision_feature_select_strategy == "default",
        initializer_range=float(hf.get("initializer_range", 0.02)),
    )


def intern_vit_config_to_hf(config: InternVisionConfig) -> dict[str, Any]:
    """The ``vision_config`` dict of an InternVL ``config.json`` (inverse of
    :func:`intern_vit_config_from_hf`); ``feature_layer`` and ``drop_cls_token`` belong to the
    top-level config (``vision_feature_layer``, ``vision_feature_select_strategy``)."""
    return {
        "model_type": "internvl_vision",
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size,
        "hidden_act": config.hidden_act,
        "norm_type": config.norm_type,
        "layer_norm_eps": config.norm_eps,
        "attention_bias": config.attention_bias,
        "use_qk_norm": config.use_qk_norm,
        "image_size": list(config.image_size),
        "patch_size": [config.patch_size, config.patch_size],
        "num_channels": config.num_channels,
        "layer_scale_init_value": config.layer_scale_init_value,
        "use_absolute_position_embeddings": config.use_absolute_position_embeddings,
        "use_mean_pooling": not config.post_norm,
        "use_mask_token": False,
        "hidden_dropout_prob": 0.0,
        "attention_dropout": 0.0,
        "projection_dropout": 0.0,
        "initializer_range": config.initializer_range,
    }


def _norm(config: InternVisionConfig) -> nn.Module:
    if config.norm_type == "rms_norm":
        return RMSNorm(config.hidden_size, eps=config.norm_eps)
    return LayerNorm(config.hidden_size, eps=config.norm_eps)


class InternVisionAttention(nn.Module):
    """Bidirectional multi-head self-attention; q/k RMSNorm spans all heads (InternViT-6B)."""

    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        d, bias = config.hidden_size, config.attention_bias
        self.num_heads = config.num_heads
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, d, bias=bias)
        self.v_proj = nn.Linear(d, d, bias=bias)
        self.q_norm = RMSNorm(d, eps=QK_NORM_EPS) if config.use_qk_norm else None
        self.k_norm = RMSNorm(d, eps=QK_NORM_EPS) if config.use_qk_norm else None
        self.o_proj = nn.Linear(d, d)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        b, s, d = x_BSD.shape
        q, k, v = self.q_proj(x_BSD), self.k_proj(x_BSD), self.v_proj(x_BSD)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        shape = (b, s, self.num_heads, d // self.num_heads)
        out = attention(q.view(shape), k.view(shape), v.view(shape), causal=False)
        return self.o_proj(out.reshape(b, s, d))


class InternVisionBlock(nn.Module):
    """Pre-norm transformer block with layer scale (``ls1``, ``ls2``: transformers' lambdas)."""

    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.norm1 = _norm(config)
        self.attn = InternVisionAttention(config)
        self.ls1 = nn.Parameter(torch.full((d,), config.layer_scale_init_value))
        self.norm2 = _norm(config)
        self.mlp = VitMLP(d, config.intermediate_size, config.hidden_act)
        self.ls2 = nn.Parameter(torch.full((d,), config.layer_scale_init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ls1 * self.attn(self.norm1(x)) + x
        return self.ls2 * self.mlp(self.norm2(h)) + h


class InternVisionEncoder(nn.Module):
    """InternViT as a VLM encoder: ``forward(visual) -> [tiles * tokens, hidden_size]``.

    Reads ``visual.pixel_values`` ``[tiles, C, H, W]`` (H and W multiples of the patch size);
    ``tokens`` is the patch count ``(H / P) * (W / P)``, plus one for the CLS token (first in
    each tile) unless ``drop_cls_token``.
    """

    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.hidden_size = d
        self.patch_embed = ConvPatchEmbed(config.num_channels, config.patch_size, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        grid = config.grid
        self.pos_embed = (
            nn.Parameter(torch.zeros(1, 1 + grid[0] * grid[1], d))
            if config.use_absolute_position_embeddings
            else None
        )
        self.blocks = nn.ModuleList(
            InternVisionBlock(config) for _ in range(config.num_built_layers)
        )
        self.unapplied_blocks = UnappliedBlocks(
            InternVisionBlock(config) for _ in range(config.num_layers - config.num_built_layers)
        )
        if config.applies_post_norm:
            self.post_norm = LayerNorm(d, eps=config.norm_eps)
        elif config.post_norm:  # transformers loads it, but an inner feature layer skips it
            self.post_norm = UnappliedLayerNorm(d)
        else:
            self.post_norm = None
        if not self.cls_token.is_meta:
            self.init_weights()

    # -- initialization -----------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Initialize in place (so it runs after ``to_empty``): linear and patch-embedding
        weights, CLS token and position table ``normal(0, initializer_range)``, biases zero,
        norms one, layer scales ``layer_scale_init_value``. (transformers zeroes the CLS token
        and position table instead, which starts training with no position signal.)"""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, ConvPatchEmbed)):
                init_(module.weight, nn.init.normal_, mean=0.0, std=std, generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (LayerNorm, RMSNorm, UnappliedLayerNorm)):
                module.reset_parameters()
            elif isinstance(module, InternVisionBlock):
                module.ls1.fill_(self.config.layer_scale_init_value)
                module.ls2.fill_(self.config.layer_scale_init_value)
        init_(self.cls_token, nn.init.normal_, mean=0.0, std=std, generator=generator)
        if self.pos_embed is not None:
            init_(self.pos_embed, nn.init.normal_, mean=0.0, std=std, generator=generator)

    def reset_parameters(self) -> None:
        self.init_weights()

    def no_weight_decay(self) -> set[str]:
        """Parameters (names relative to this module) that an optimizer should not decay: the
        CLS token and the position table, as timm's ``VisionTransformer.no_weight_decay``."""
        return {"cls_token"} | ({"pos_embed"} if self.pos_embed is not None else set())

    # -- forward ------------------------------------------------------------------------------
    def patch_grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """``(h, w)`` in patches of tiles ``[tiles, C, H, W]``; ``ValueError`` if they do not fit."""
        c = self.config
        if pixel_values.dim() != 4 or pixel_values.shape[1] != c.num_channels:
            raise ValueError(
                f"InternVisionEncoder reads pixel_values [tiles, {c.num_channels}, H, W], got "
                f"{tuple(pixel_values.shape)}; stack the tiles of every image into one batch"
            )
        height, width = pixel_values.shape[-2:]
        p = c.patch_size
        if height % p or width % p:
            raise ValueError(
                f"InternVisionEncoder: tile size {height}x{width} is not a multiple of the patch "
                f"size {p}x{p}; resize the tiles to a multiple of it (InternVL: {c.image_size})"
            )
        return height // p, width // p

    def position_embeddings(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position table ``[1, 1 + h * w, D]`` for a tile of ``grid`` patches: the stored
        one, or its patch part resized bicubically (as DINO / transformers do) otherwise."""
        if grid == self.config.grid:
            return self.pos_embed
        d = self.hidden_size
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = patch_pos.reshape(1, *self.config.grid, d).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, -1, d)], dim=1)

    def forward(self, visual: VisualInputs) -> torch.Tensor:
        pixel_values = visual.pixel_values
        grid = self.patch_grid(pixel_values)
        x = self.patch_embed(pixel_values)  # [tiles, patches, D]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.position_embeddings(grid)
        for block in self.blocks:
            x = block(x)
        if self.config.applies_post_norm:
            x = self.post_norm(x)
        if self.config.drop_cls_token:
            x = x[:, 1:]
        return x.reshape(-1, self.hidden_size)

    def num_tokens_per_tile(self, pixel_values: torch.Tensor) -> int:
        """Output rows per tile (patches, plus the CLS token unless it is dropped)."""
        gh, gw = self.patch_grid(pixel_values)
        return gh * gw + (0 if self.config.drop_cls_token else 1)
