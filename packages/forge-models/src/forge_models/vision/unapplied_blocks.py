"""Checkpoint blocks an encoder carries but never runs: the vision blocks after a VLM's
``vision_feature_layer``.

LLaVA-style VLMs (LLaVA: Liu et al. 2023, arXiv:2304.08485, ``vision_feature_layer=-2``;
LLaVA-OneVision: Li et al. 2024, arXiv:2408.03326; InternVL: Chen et al. 2024,
arXiv:2312.14238) take the image features from the hidden state after an inner block of the
vision tower. transformers builds and loads every block of the tower anyway (the later ones
get no gradient and training leaves them as loaded), so its checkpoints hold them. Forge runs
only the blocks the features need and keeps the others in an :class:`UnappliedBlocks`: the
same module tree, with every parameter turned into a buffer, so that

- an imported checkpoint exports tensor for tensor (names, dtypes, bits), and the export
  loads in ``transformers`` with no missing weights;
- no optimizer, FSDP sharding, gradient clipping or parameter count sees them, and no compute
  or FLOP count includes them (``forward`` raises);
- a forge training checkpoint holds them like any buffer, so it resumes as saved.

The same idea as :class:`~forge_models.vision.vit_blocks.UnappliedLayerNorm` (a post-layernorm
loaded but not applied), for whole blocks.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

__all__ = ["UnappliedBlocks", "as_buffers"]


def as_buffers(module: nn.Module) -> nn.Module:
    """``module`` with every parameter (its own and its sub-modules') re-registered under the
    same name as a persistent buffer holding the same tensor (``requires_grad`` off), in place.

    The module tree and state-dict names stay as they were; a module that reads
    ``self.weight`` (e.g. ``reset_parameters``) still finds it.
    """
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            delattr(sub, name)
            sub.register_buffer(name, param.detach())
    return module


class UnappliedBlocks(nn.ModuleList):
    """Encoder blocks kept only for their checkpoint values (see the module docstring).

    Indexed as an ``nn.ModuleList`` (state-dict names ``{i}.<block names>``, ``i`` from 0 for
    the first block after those the encoder runs); every tensor is a buffer. Initialize them
    with the blocks' own ``reset_parameters`` (it writes the buffers in place), so a model
    built from scratch exports a complete checkpoint.
    """

    def __init__(self, blocks: Iterable[nn.Module] = ()) -> None:
        super().__init__(as_buffers(block) for block in blocks)

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            "UnappliedBlocks only carries checkpoint values of the vision blocks after "
            "vision_feature_layer; to run them, build the encoder with a later feature_layer "
            "(-1: every block)"
        )

    def extra_repr(self) -> str:
        return f"{len(self)} blocks, not applied"
