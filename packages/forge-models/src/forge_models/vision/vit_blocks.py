"""The pre-LayerNorm Vision Transformer encoder, shared by the ViT-style vision towers.

- Vision Transformer (ViT): Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words",
  arXiv:2010.11929: images cut into patches, linearly embedded, plus learned position
  embeddings, through a bidirectional transformer encoder.
- Pre-LayerNorm residual blocks: Xiong et al. 2020, "On Layer Normalization in the Transformer
  Architecture", arXiv:2002.04745.
- LayerNorm: Ba et al. 2016, arXiv:1607.06450; GELU: Hendrycks & Gimpel 2016, arXiv:1606.08415.
- The initialization of :meth:`VitBlock.reset_parameters` is SigLIP's (Zhai et al. 2023,
  arXiv:2303.15343; big_vision): Xavier-uniform weights, zero attention biases, tiny MLP biases.

One block (``x + attn(norm1(x))``, then ``+ mlp(norm2(.))``) has the module tree::

    norm1.{weight,bias}                      LayerNorm [hidden]
    attn.{q,k,v,out}_proj.{weight,bias}      [hidden, hidden], [hidden]
    norm2.{weight,bias}                      LayerNorm [hidden]
    mlp.fc1.{weight,bias}                    [intermediate, hidden], [intermediate]
    mlp.fc2.{weight,bias}                    [hidden, intermediate], [hidden]

:class:`PreNormVitEncoder` stacks them as ``blocks.{i}`` with a ``post_layernorm``: applied
when the encoder outputs the standalone tower's ``last_hidden_state``, else only carried (an
:class:`UnappliedLayerNorm`, as transformers' VLMs load SigLIP's but never apply it). The
checkpoint's blocks after ``feature_layer`` are carried the same way, never run, as
``unapplied_blocks.{k}`` (:class:`~forge_models.vision.unapplied_blocks.UnappliedBlocks`).
Attention goes through ``forge_kernels.attention.attention`` (bidirectional; variable-size items
packed with ``cu_seqlens``), norms through ``forge_kernels.layer_norm`` (the second norm of each
block fused with the residual add).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import forge_kernels
from forge_kernels.attention import attention
from forge_models.init import init_
from forge_models.vision.unapplied_blocks import UnappliedBlocks

__all__ = [
    "ACTIVATIONS",
    "ConvPatchEmbed",
    "LayerNorm",
    "PreNormVitEncoder",
    "UnappliedLayerNorm",
    "VitAttention",
    "VitBlock",
    "VitConfig",
    "VitMLP",
    "activation",
    "feature_layer_depth",
    "lecun_normal_",
    "square_size",
    "vit_config_kwargs_from_hf",
    "vit_config_to_hf",
]


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


#: Activation by its transformers ``hidden_act`` name.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_new": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "silu": F.silu,
    "relu": F.relu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation a config names (``ValueError`` listing the supported names)."""
    if name not in ACTIVATIONS:
        raise ValueError(
            f"activation {name!r} is not supported; use one of {sorted(ACTIVATIONS)} "
            "(or add it to forge_models.vision.vit_blocks.ACTIVATIONS)"
        )
    return ACTIVATIONS[name]


def lecun_normal_(weight: torch.Tensor, *, generator: torch.Generator | None = None) -> None:
    """LeCun normal init (truncated at two std, as jax/big_vision's ``lecun_normal``)."""
    fan_in = math.prod(weight.shape[1:])
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # std of a unit normal cut at +-2
    init_(weight, nn.init.trunc_normal_, std=std, a=-2 * std, b=2 * std, generator=generator)


def feature_layer_depth(num_layers: int, feature_layer: int | None) -> int:
    """How many blocks an encoder runs to output hidden state ``feature_layer``.

    ``feature_layer`` indexes transformers' ``hidden_states`` tuple (``0``: the embeddings,
    ``k``: after block ``k``, ``-1``: after the last block); ``None`` means the last block
    followed by the post-layernorm (the standalone tower's ``last_hidden_state``).
    """
    if feature_layer is None:
        return num_layers
    if isinstance(feature_layer, bool) or not isinstance(feature_layer, int):
        raise ValueError(f"feature_layer must be an int or None, got {feature_layer!r}")
    if not -(num_layers + 1) <= feature_layer <= num_layers:
        raise ValueError(
            f"feature_layer={feature_layer} is out of range for {num_layers} layers: use "
            f"-{num_layers + 1}..{num_layers} (hidden_states index) or None"
        )
    return feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class VitConfig:
    """Hyperparameters every pre-LayerNorm ViT tower shares.

    Attributes:
        hidden_size: feature width (the encoder's output width).
        intermediate_size: MLP hidden width.
        num_layers: blocks in the checkpoint (the encoder runs ``depth`` of them and carries
            the rest, unapplied).
        num_heads: attention heads (``hidden_size % num_heads == 0``).
        num_channels: input channels.
        patch_size: square patch side in pixels.
        hidden_act: MLP activation (a key of :data:`ACTIVATIONS`).
        layer_norm_eps: LayerNorm epsilon.
        feature_layer: which hidden state the encoder outputs (see
            :func:`feature_layer_depth`): ``-1`` (default) the last block's output without
            the post-layernorm, as LLaVA-style VLMs read ``hidden_states[-1]``; ``None`` the
            standalone tower's ``last_hidden_state`` (with the post-layernorm).
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_channels: int = 3
    patch_size: int
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    feature_layer: int | None = -1

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_channels",
            "patch_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"{owner}: hidden_size={self.hidden_size} is not divisible by "
                f"num_heads={self.num_heads}; pick a head count that divides it"
            )
        if not self.layer_norm_eps > 0:
            raise ValueError(f"{owner}.layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        activation(self.hidden_act)
        feature_layer_depth(self.num_layers, self.feature_layer)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def depth(self) -> int:
        """Blocks the encoder runs (see :func:`feature_layer_depth`)."""
        return feature_layer_depth(self.num_layers, self.feature_layer)


def square_size(hf: Mapping[str, Any], key: str, owner: str) -> int:
    """``hf[key]`` as one int: an int, or a ``[n, n]`` pair (non-square raises ``ValueError``)."""
    value = hf[key]
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{owner}: non-square {key}={list(value)} is not supported")
        value = value[0]
    return int(value)


def vit_config_kwargs_from_hf(
    hf: Mapping[str, Any], *, owner: str, feature_layer: int | None
) -> dict[str, Any]:
    """The :class:`VitConfig` fields from a transformers vision ``config.json`` (sub-)dict.

    Raises ``ValueError`` for what forge does not implement (attention dropout).
    """
    dropout = hf.get("attention_dropout", 0.0) or 0.0
    if dropout:
        raise ValueError(
            f"{owner}: attention_dropout={dropout} is not supported by forge's ViT blocks; "
            "set it to 0.0 in the config"
        )
    return {
        "hidden_size": int(hf["hidden_size"]),
        "intermediate_size": int(hf["intermediate_size"]),
        "num_layers": int(hf["num_hidden_layers"]),
        "num_heads": int(hf["num_attention_heads"]),
        "num_channels": int(hf.get("num_channels", 3)),
        "patch_size": square_size(hf, "patch_size", owner),
        "hidden_act": hf.get("hidden_act", "gelu_pytorch_tanh"),
        "layer_norm_eps": float(hf.get("layer_norm_eps", 1e-6)),
        "feature_layer": feature_layer,
    }


def vit_config_to_hf(config: VitConfig) -> dict[str, Any]:
    """The transformers keys of the :class:`VitConfig` fields (``feature_layer`` is the VLM's)."""
    return {
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_channels": config.num_channels,
        "patch_size": config.patch_size,
        "hidden_act": config.hidden_act,
        "layer_norm_eps": config.layer_norm_eps,
        "attention_dropout": 0.0,
    }


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class LayerNorm(nn.Module):
    """LayerNorm over the last dim through :func:`forge_kernels.layer_norm` (``weight``, ``bias``)."""

    def __init__(self, dim: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``norm(x)``; with ``residual``: ``(norm(x + residual), x + residual)`` in one pass."""
        return forge_kernels.layer_norm(x, self.weight, self.bias, eps=self.eps, residual=residual)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class UnappliedLayerNorm(nn.Module):
    """A checkpoint LayerNorm the encoder's output does not go through, kept so that the
    checkpoint round-trips bit for bit.

    transformers' ``SiglipVisionModel`` always holds ``post_layernorm``, and a VLM that reads
    ``hidden_states[vision_feature_layer]`` (LLaVA-OneVision) loads it but never applies it, so
    no gradient reaches it and training leaves it as loaded. Forge keeps its ``weight`` and
    ``bias`` as buffers, not parameters: they are read from and written to checkpoints like any
    tensor, and no optimizer, FSDP or gradient clipping sees them (the same values as
    transformers' untouched parameters). ``forward`` raises: nothing may apply it.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            "UnappliedLayerNorm only carries checkpoint values; build the encoder with "
            "feature_layer=None to apply the post-layernorm"
        )

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, not applied"


class ConvPatchEmbed(nn.Module):
    """A ``Conv2d(kernel=stride=patch)`` patch embedding computed as one matmul.

    ``weight`` keeps the convolution's ``[hidden, channels, patch, patch]`` layout (the
    checkpoint's), ``bias`` is ``[hidden]``. Like a ``"valid"`` convolution, pixels beyond the
    last whole patch are dropped (SigLIP so400m: 384 px with patch 14 gives 27 x 27 patches).
    """

    def __init__(self, num_channels: int, patch_size: int, hidden_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.weight = nn.Parameter(torch.empty(hidden_size, num_channels, patch_size, patch_size))
        self.bias = nn.Parameter(torch.empty(hidden_size))
        self.reset_parameters()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` -> ``[N, (H // P) * (W // P), hidden]``, patches in row-major order."""
        n, c, h, w = pixels.shape
        p = self.patch_size
        gh, gw = h // p, w // p
        x = pixels[:, :, : gh * p, : gw * p].reshape(n, c, gh, p, gw, p)
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * p * p)
        return F.linear(x.to(self.weight.dtype), self.weight.flatten(1), self.bias)

    def reset_parameters(self, *, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            lecun_normal_(self.weight, generator=generator)
            nn.init.zeros_(self.bias)


class VitAttention(nn.Module):
    """Bidirectional multi-head self-attention with q/k/v/out biases (Vaswani et al. 2017).

    The head count is read from the projection width, so a tensor-parallel shard holding a
    subset of the heads runs unchanged.
    """

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(
        self,
        x: torch.Tensor,
        *,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """``x``: ``[B, S, hidden]`` (equal-size items), or packed ``[T, hidden]`` with
        ``cu_seqlens`` (``int32 [items + 1]``; attention stays within each item)."""
        shape = (*x.shape[:-1], -1, self.head_dim)
        q, k, v = (proj(x).view(shape) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if x.dim() == 2:
            if cu_seqlens is None:
                raise ValueError("packed [tokens, hidden] input needs cu_seqlens")
            out = attention(q, k, v, causal=False, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        else:
            out = attention(q, k, v, causal=False)
        return self.out_proj(out.flatten(-2))


class VitMLP(nn.Module):
    """``fc2(act(fc1(x)))``."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str) -> None:
        super().__init__()
        self.hidden_act = hidden_act
        self.act = activation(hidden_act)
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def extra_repr(self) -> str:
        return f"act={self.hidden_act}"


class VitBlock(nn.Module):
    """``h = x + attn(norm1(x))``, ``out = h + mlp(norm2(h))`` (see the module docstring)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        *,
        eps: float = 1e-6,
        hidden_act: str = "gelu_pytorch_tanh",
    ) -> None:
        super().__init__()
        self.norm1 = LayerNorm(hidden_size, eps=eps)
        self.attn = VitAttention(hidden_size, num_heads)
        self.norm2 = LayerNorm(hidden_size, eps=eps)
        self.mlp = VitMLP(hidden_size, intermediate_size, hidden_act)

    def forward(
        self,
        x: torch.Tensor,
        *,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        a = self.attn(self.norm1(x), cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        y, h = self.norm2(a, residual=x)  # h = x + a, y = norm2(h): one fused pass
        return h + self.mlp(y)

    def reset_parameters(self, *, generator: torch.Generator | None = None) -> None:
        """SigLIP's init: Xavier-uniform weights, zero attention biases, N(0, 1e-6) MLP biases."""
        with torch.no_grad():
            for proj in (self.attn.q_proj, self.attn.k_proj, self.attn.v_proj, self.attn.out_proj):
                init_(proj.weight, nn.init.xavier_uniform_, generator=generator)
                nn.init.zeros_(proj.bias)
            for fc in (self.mlp.fc1, self.mlp.fc2):
                init_(fc.weight, nn.init.xavier_uniform_, generator=generator)
                init_(fc.bias, nn.init.normal_, std=1e-6, generator=generator)
            self.norm1.reset_parameters()
            self.norm2.reset_parameters()


class PreNormVitEncoder(nn.Module):
    """``config.depth`` :class:`VitBlock` s as ``blocks.{i}``, the checkpoint's
    ``num_layers - depth`` later blocks as ``unapplied_blocks.{k}`` (buffers, never run; see
    :class:`~forge_models.vision.unapplied_blocks.UnappliedBlocks`), plus ``post_layernorm``:
    a :class:`LayerNorm` applied to the output when ``config.feature_layer is None``, else an
    :class:`UnappliedLayerNorm` that only carries the checkpoint's values. Subclasses add the
    patch and position embeddings."""

    def __init__(self, config: VitConfig) -> None:
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.blocks = nn.ModuleList(self._block() for _ in range(config.depth))
        self.unapplied_blocks = UnappliedBlocks(
            self._block() for _ in range(config.num_layers - config.depth)
        )
        self.applies_post_layernorm = config.feature_layer is None
        self.post_layernorm = (
            LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            if self.applies_post_layernorm
            else UnappliedLayerNorm(config.hidden_size)
        )

    def _block(self) -> VitBlock:
        c = self.config
        return VitBlock(
            c.hidden_size,
            c.num_heads,
            c.intermediate_size,
            eps=c.layer_norm_eps,
            hidden_act=c.hidden_act,
        )

    def encode(
        self,
        x: torch.Tensor,
        *,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """The blocks (and the post-layernorm) over embedded patches ``x``."""
        for block in self.blocks:
            x = block(x, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return self.post_layernorm(x) if self.applies_post_layernorm else x

    def reset_blocks(self, *, generator: torch.Generator | None = None) -> None:
        """Initialize ``blocks``, ``unapplied_blocks`` and ``post_layernorm`` in place (works
        after ``to_empty``)."""
        for block in (*self.blocks, *self.unapplied_blocks):
            block.reset_parameters(generator=generator)
        self.post_layernorm.reset_parameters()
