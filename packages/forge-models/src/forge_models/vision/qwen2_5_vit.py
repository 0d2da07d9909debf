"""The Qwen2.5-VL vision encoder: a native-resolution ViT with 2-D RoPE and window attention.

Qwen2.5-VL Technical Report (Bai et al. 2025, arXiv:2502.13923), after Qwen2-VL (Wang et al.
2024, arXiv:2409.12191) and ViT (Dosovitskiy et al. 2020, arXiv:2010.11929). Every image or
video is cut into ``temporal_patch_size x patch_size x patch_size`` patches at its own
resolution; the patches of all items are packed into one sequence. Each block is
pre-RMSNorm attention + a SwiGLU MLP with biases (Shazeer 2020, arXiv:2002.05202); queries and
keys carry a 2-D rotary embedding (RoFormer, Su et al. 2021, arXiv:2104.09864) of the patch's
(row, column). The blocks listed in ``fullatt_block_indexes`` attend over a whole frame; the
others attend inside windows of ``window_size`` pixels (a square of merge units), which keeps the
cost linear in the image size.

Input (:class:`~forge_models.vlm.inputs.VisualInputs`): ``pixel_values``
``[patches, C * T * P * P]`` (the Qwen2.5-VL processor's flattened patches, each frame's patches
in merge-block order: for each ``spatial_merge_size``-square block, row-major, its patches
row-major) and ``grid_thw`` ``[items, 3]`` in patches. Output: per-patch features
``[patches, hidden_size]`` in the same (original) order as ``pixel_values``, so consecutive
``spatial_merge_size ** 2`` rows form one merge unit for
:class:`~forge_models.vision.qwen2_5_merger.Qwen2_5VLPatchMerger`.

Module tree (the names forge-ckpt maps; transformers' names in brackets)::

    patch_embed.weight          [hidden, C, T, P, P]       [patch_embed.proj.weight]
    blocks.{i}.attn_norm        RMSNorm                    [blocks.{i}.norm1]
    blocks.{i}.attn.qkv_proj    nn.Linear [3 * hidden, hidden] + bias (q, k, v rows)
                                                           [blocks.{i}.attn.qkv]
    blocks.{i}.attn.o_proj      nn.Linear + bias           [blocks.{i}.attn.proj]
    blocks.{i}.mlp_norm         RMSNorm                    [blocks.{i}.norm2]
    blocks.{i}.mlp.gate_up_proj nn.Linear [2 * intermediate, hidden] + bias (gate rows, then up)
                                                           [blocks.{i}.mlp.gate_proj + up_proj]
    blocks.{i}.mlp.down_proj    nn.Linear + bias           [blocks.{i}.mlp.down_proj]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import forge_kernels
from forge_kernels.attention import attention
from forge_models.blocks.norm import RMSNorm
from forge_models.init import init_
from forge_models.vlm.inputs import VisualInputs

__all__ = [
    "Qwen2_5VisionConfig",
    "Qwen2_5VisionEncoder",
    "Qwen2_5VisionLayout",
    "qwen2_5_vision_config_from_hf",
    "qwen2_5_vision_config_to_hf",
    "qwen2_5_vision_layout",
]


@dataclass(frozen=True, kw_only=True)
class Qwen2_5VisionConfig:  # noqa: N801 (transformers' family name)
    """Shape of the Qwen2.5-VL vision tower (defaults: the 3B/7B/72B release's).

    ``window_size`` is in pixels: a window is ``window_size // (patch_size * spatial_merge_size)``
    merge units square. ``fullatt_block_indexes``: the blocks that attend over a whole frame.
    """

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        object.__setattr__(self, "fullatt_block_indexes", tuple(self.fullatt_block_indexes))
        for name in (
            "depth",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "in_channels",
            "patch_size",
            "temporal_patch_size",
            "spatial_merge_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"Qwen2_5VisionConfig.{name} must be a positive int, got {value!r}"
                )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"Qwen2_5VisionConfig: hidden_size {self.hidden_size} must be divisible by "
                f"num_heads {self.num_heads}"
            )
        if self.head_dim % 4:
            raise ValueError(
                f"Qwen2_5VisionConfig: head_dim = hidden_size / num_heads = {self.head_dim} must "
                "be a multiple of 4 (the 2-D RoPE gives a quarter of each head to the rows and a "
                "quarter to the columns, each as channel pairs)"
            )
        if self.window_units < 1:
            raise ValueError(
                f"Qwen2_5VisionConfig.window_size {self.window_size} must be at least "
                f"patch_size * spatial_merge_size = {self.patch_size * self.spatial_merge_size} "
                "pixels (one merge unit)"
            )
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(
                f"Qwen2_5VisionConfig.fullatt_block_indexes {list(bad)} are not blocks of a "
                f"depth-{self.depth} encoder; use indices in [0, {self.depth})"
            )
        if self.hidden_act != "silu":
            raise ValueError(
                f"Qwen2_5VisionConfig.hidden_act {self.hidden_act!r} is not supported: the "
                "Qwen2.5-VL vision MLP is SwiGLU ('silu')"
            )
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("Qwen2_5VisionConfig: norm_eps and rope_theta must be > 0")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Width of one row of ``pixel_values``: ``C * T * P * P``."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def window_units(self) -> int:
        """Side of an attention window in merge units."""
        return self.window_size // self.spatial_merge_size // self.patch_size


def _hf_int(hf: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if hf.get(key) is not None:
            value = hf[key]
            if isinstance(value, (list, tuple)):
                if len(set(value)) != 1:
                    raise ValueError(
                        f"vision config {key}={list(value)}: Qwen2.5-VL needs one value "
                        "(square patches)"
                    )
                value = value[0]
            return int(value)
    if default is None:
        raise ValueError(f"the vision config lacks {keys[0]!r}, which Qwen2.5-VL needs")
    return default


def qwen2_5_vision_config_from_hf(hf_vision_config: Mapping[str, Any]) -> Qwen2_5VisionConfig:
    """The encoder config from the ``vision_config`` dict of a Qwen2.5-VL ``config.json``.

    Reads transformers 5.x keys and the release files' legacy ones (``in_chans``,
    ``spatial_patch_size``, ``embed_dim``); ``rope_parameters`` must be axial RoPE (the default).
    """
    hf = hf_vision_config
    params = hf.get("rope_parameters") or {}
    rope_type = params.get("rope_type", "axial")
    if rope_type not in ("axial", "default"):
        raise ValueError(
            f"vision rope_type {rope_type!r} is not supported: the Qwen2.5-VL vision tower uses "
            "axial 2-D RoPE (rope_type 'axial')"
        )
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return Qwen2_5VisionConfig(
        depth=_hf_int(hf, "depth", "num_hidden_layers"),
        hidden_size=_hf_int(hf, "hidden_size", "embed_dim"),
        intermediate_size=_hf_int(hf, "intermediate_size"),
        num_heads=_hf_int(hf, "num_heads", "num_attention_heads"),
        in_channels=_hf_int(hf, "in_channels", "in_chans", default=3),
        patch_size=_hf_int(hf, "patch_size", "spatial_patch_size", default=14),
        temporal_patch_size=_hf_int(hf, "temporal_patch_size", default=2),
        spatial_merge_size=_hf_int(hf, "spatial_merge_size", default=2),
        window_size=_hf_int(hf, "window_size", default=112),
        fullatt_block_indexes=tuple(
            int(i)
            for i in hf.get("fullatt_block_indexes", Qwen2_5VisionConfig.fullatt_block_indexes)
        ),
        hidden_act=hf.get("hidden_act", "silu"),
        rope_theta=float(theta),
        initializer_range=float(hf.get("initializer_range", 0.02)),
    )


def qwen2_5_vision_config_to_hf(config: Qwen2_5VisionConfig) -> dict[str, Any]:
    """The encoder's keys of a transformers ``Qwen2_5_VLVisionConfig`` (the projector's,
    ``out_hidden_size``, come from :func:`~forge_models.vision.qwen2_5_merger.qwen2_5_merger_config_to_hf`)."""
    return {
        "model_type": "qwen2_5_vl_vision",
        "depth": config.depth,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_heads": config.num_heads,
        "in_channels": config.in_channels,
        "patch_size": config.patch_size,
        "temporal_patch_size": config.temporal_patch_size,
        "spatial_merge_size": config.spatial_merge_size,
        "window_size": config.window_size,
        "fullatt_block_indexes": list(config.fullatt_block_indexes),
        "hidden_act": config.hidden_act,
        "rope_parameters": {"rope_type": "axial", "rope_theta": config.rope_theta},
        "initializer_range": config.initializer_range,
    }


# --------------------------------------------------------------------------------------------
# Packed layout: positions, window order, attention segments
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, kw_only=True)
class Qwen2_5VisionLayout:  # noqa: N801 (transformers' family name)
    """Where every patch of a packed batch sits, computed from ``grid_thw`` alone.

    Attributes:
        positions: int64 ``[patches, 2]``: (row, column) of each patch in its frame, in the
            original (``pixel_values``) order.
        window_order: int64 ``[patches]``: the original indices of the patches in window order
            (window after window, frames and items in order; inside a window its merge units
            row-major, each unit's patches together).
        restore_order: int64 ``[patches]``: the inverse permutation (window order -> original).
        cu_frames, max_frame: ``int32 [frames + 1]`` boundaries of the frames (full attention)
            in window order, and the longest.
        cu_windows, max_window: the same for the windows (window attention).
    """

    positions: torch.Tensor
    window_order: torch.Tensor
    restore_order: torch.Tensor
    cu_frames: torch.Tensor
    max_frame: int
    cu_windows: torch.Tensor
    max_window: int


def _check_grid(grid_thw: torch.Tensor, merge: int, who: str) -> list[list[int]]:
    grid = grid_thw.tolist()
    for k, (t, h, w) in enumerate(grid):
        if min(t, h, w) < 1:
            raise ValueError(f"{who}: grid_thw[{k}] = {[t, h, w]} must be positive")
        if h % merge or w % merge:
            raise ValueError(
                f"{who}: grid_thw[{k}] = {[t, h, w]} has a height or width (in patches) not "
                f"divisible by spatial_merge_size {merge}; resize the item so that both sides "
                f"are multiples of patch_size * {merge} pixels (the Qwen2.5-VL processor does)"
            )
    return grid


def qwen2_5_vision_layout(
    grid_thw: torch.Tensor,
    *,
    spatial_merge_size: int,
    window_units: int,
    device: torch.device | str | None = None,
) -> Qwen2_5VisionLayout:
    """The :class:`Qwen2_5VisionLayout` of the items ``grid_thw`` ``[items, 3]`` (in patches).

    Vectorized over all patches (one host read of ``grid_thw``). The window order is that of
    transformers' ``get_vision_window_index``: each frame is tiled from its top-left corner by
    ``window_units``-square windows of merge units, windows row-major.
    """
    m = spatial_merge_size
    win = window_units
    grid = _check_grid(grid_thw, m, "qwen2_5_vision_layout")
    if not grid:
        raise ValueError("qwen2_5_vision_layout: grid_thw lists no item")
    g = torch.tensor(grid, dtype=torch.int64, device=device)
    t, h, w = g.unbind(1)
    lh, lw = h // m, w // m
    n_win_h, n_win_w = -(-lh // win), -(-lw // win)
    counts = t * h * w
    total = int(counts.sum())

    item = torch.repeat_interleave(torch.arange(len(grid), device=device), counts)
    local = torch.arange(total, device=device) - (torch.cumsum(counts, 0) - counts)[item]
    frame_size = (h * w)[item]
    frame, in_frame = local // frame_size, local % frame_size
    unit, sub = in_frame // (m * m), in_frame % (m * m)
    block_row, block_col = unit // lw[item], unit % lw[item]
    positions = torch.stack(
        [block_row * m + sub // m, block_col * m + sub % m], dim=-1
    )  # (row, column)

    # Window of each patch, numbered globally in order; inside it, the unit's rank row-major.
    windows_per_item = t * n_win_h * n_win_w
    first_window = torch.cumsum(windows_per_item, 0) - windows_per_item
    window = (
        first_window[item]
        + (frame * n_win_h[item] + block_row // win) * n_win_w[item]
        + block_col // win
    )
    rank = ((block_row % win) * win + block_col % win) * (m * m) + sub
    window_order = torch.argsort(window * (win * win * m * m) + rank)
    restore_order = torch.empty_like(window_order)
    restore_order[window_order] = torch.arange(total, device=device)

    window_sizes = torch.bincount(window, minlength=int(windows_per_item.sum()))
    frame_sizes = torch.repeat_interleave(h * w, t)
    cu_windows = F.pad(torch.cumsum(window_sizes, 0), (1, 0)).to(torch.int32)
    cu_frames = F.pad(torch.cumsum(frame_sizes, 0), (1, 0)).to(torch.int32)
    return Qwen2_5VisionLayout(
        positions=positions,
        window_order=window_order,
        restore_order=restore_order,
        cu_frames=cu_frames,
        max_frame=int(frame_sizes.max()),
        cu_windows=cu_windows,
        max_window=int(window_sizes.max()),
    )


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class PatchEmbed3d(nn.Module):
    """The Conv3d patch embedding (kernel = stride = patch) as one matmul over flattened patches.

    ``weight`` keeps the checkpoint's Conv3d shape ``[hidden, C, T, P, P]``; a patch row
    ``[C * T * P * P]`` is flattened in the same (C, T, P, P) order, so the convolution is
    ``pixel_values @ weight.flatten(1).T`` (no bias).
    """

    def __init__(self, config: Qwen2_5VisionConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(
                config.hidden_size,
                config.in_channels,
                config.temporal_patch_size,
                config.patch_size,
                config.patch_size,
            )
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.linear(pixel_values.to(self.weight.dtype), self.weight.flatten(1))


class WindowAttention(nn.Module):
    """Bidirectional multi-head attention over packed segments with 2-D RoPE on q and k."""

    def __init__(self, config: Qwen2_5VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).view(tokens, 3, self.num_heads, -1).unbind(1)
        q, k = forge_kernels.apply_rope(q, k, cos, sin)
        out = attention(q, k, v, causal=False, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return self.o_proj(out.reshape(tokens, -1))


class BiasedSwiGLU(nn.Module):
    """``down_proj(silu(x W_gate + b_gate) * (x W_up + b_up)) + b_down``, gate and up fused."""

    def __init__(self, config: Qwen2_5VisionConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=True)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(forge_kernels.swiglu(gate, up))


class VisionBlock(nn.Module):
    """``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: Qwen2_5VisionConfig, *, full_attention: bool) -> None:
        super().__init__()
        self.full_attention = full_attention
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = WindowAttention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = BiasedSwiGLU(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: Qwen2_5VisionLayout
    ) -> torch.Tensor:
        if self.full_attention:
            cu, longest = layout.cu_frames, layout.max_frame
        else:
            cu, longest = layout.cu_windows, layout.max_window
        x = x + self.attn(self.attn_norm(x), cos, sin, cu, longest)
        return x + self.mlp(self.mlp_norm(x))


class Qwen2_5VisionEncoder(nn.Module):  # noqa: N801 (transformers' family name)
    """The Qwen2.5-VL vision tower without its patch merger (see the module docstring).

    ``forward(visual)`` reads ``visual.pixel_values`` ``[patches, C * T * P * P]`` and
    ``visual.grid_thw`` and returns ``[patches, hidden_size]`` in the order of ``pixel_values``.
    The blocks run in window order (one gather after the patch embedding, one at the end).
    """

    def __init__(self, config: Qwen2_5VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.patch_embed = PatchEmbed3d(config)
        full = set(config.fullatt_block_indexes)
        self.blocks = nn.ModuleList(
            VisionBlock(config, full_attention=i in full) for i in range(config.depth)
        )
        if not self.patch_embed.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, *, generator: torch.Generator | None = None) -> None:
        """transformers' init: weights ``normal(0, initializer_range)`` (patch embedding too),
        biases zero, norm weights one. In place, so it runs after ``to_empty``."""
        std = self.config.initializer_range
        init_(self.patch_embed.weight, nn.init.normal_, mean=0.0, std=std, generator=generator)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init_(module.weight, nn.init.normal_, mean=0.0, std=std, generator=generator)
                nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()

    def reset_parameters(self) -> None:
        self.init_weights()

    def rope_cos_sin(
        self, positions: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[patches, head_dim // 2]`` of the 2-D RoPE: the first half of the angles
        from the row, the second from the column, each with the ``head_dim // 4`` frequencies
        ``theta ** (-4i / head_dim)`` (applied with the ``"half"`` layout)."""
        inv_freq = forge_kernels.rope_inv_freq(
            self.config.head_dim // 2, theta=self.config.rope_theta, device=device
        )
        cos, sin = forge_kernels.rope_cos_sin(positions, inv_freq)  # [patches, 2, head_dim // 4]
        return cos.flatten(1), sin.flatten(1)

    def layout(self, grid_thw: torch.Tensor, device: torch.device) -> Qwen2_5VisionLayout:
        return qwen2_5_vision_layout(
            grid_thw,
            spatial_merge_size=self.config.spatial_merge_size,
            window_units=self.config.window_units,
            device=device,
        )

    def forward(self, visual: VisualInputs) -> torch.Tensor:
        visual.require("grid_thw", who="Qwen2_5VisionEncoder")
        pixel_values = visual.pixel_values
        config = self.config
        if pixel_values.dim() != 2 or pixel_values.shape[1] != config.patch_dim:
            raise ValueError(
                "Qwen2_5VisionEncoder: pixel_values must be flattened patches [patches, "
                f"C*T*P*P = {config.in_channels}*{config.temporal_patch_size}*"
                f"{config.patch_size}*{config.patch_size} = {config.patch_dim}], got "
                f"{tuple(pixel_values.shape)}; produce them with the Qwen2.5-VL processor for "
                "this config's patch_size, temporal_patch_size and in_channels"
            )
        layout = self.layout(visual.grid_thw, pixel_values.device)
        if layout.positions.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"Qwen2_5VisionEncoder: grid_thw {visual.grid_thw.tolist()} describes "
                f"{layout.positions.shape[0]} patches (sum of t*h*w) but pixel_values has "
                f"{pixel_values.shape[0]} rows; pass the grid_thw the processor returned with "
                "these pixel_values, items in the same order"
            )
        x = self.patch_embed(pixel_values)[layout.window_order]
        cos, sin = self.rope_cos_sin(layout.positions[layout.window_order], x.device)
        for block in self.blocks:
            x = block(x, cos, sin, layout)
        return x[layout.restore_order]
