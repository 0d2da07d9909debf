"""``train.fp8``: FP8 GEMMs in the model's eligible linear layers, with forge_kernels.

``per_tensor``: per-tensor current scaling (E4M3 forward, E5M2 gradients; Micikevicius et al.
2022, "FP8 Formats for Deep Learning", arXiv:2209.05433); ``blockwise``: DeepSeek-V3's 1x128
activation and 128x128 weight blocks (arXiv:2412.19437 section 3.3). forge_kernels'
``convert_to_fp8`` swaps each ``nn.Linear`` whose features suit FP8 GEMMs (multiples of 16, of
128 for block-wise) for an ``Fp8Linear`` sharing its parameters, leaving the output head and
MoE routers in high precision. On FP8 GPUs (sm89+, block-wise: sm90) the GEMMs are real FP8;
elsewhere (the CPU) forge_kernels emulates them exactly (FP8 casts, fp32 GEMMs), which is slow
and meant for tests and debugging. ``train.fp8_policy`` (a calibrated ``Fp8Policy`` JSON) keeps
the GEMM shapes where FP8 was measured slower in high precision.

The conversion runs before parallelization (FSDP then shards the shared parameters). Under
tensor parallelism the plan's column-, packed-column- and row-parallel styles split the FP8
linears like ``nn.Linear`` (``Fp8Linear`` subclasses it); each then computes on its shards with
per-tensor amaxes all-reduced over the tensor-parallel ranks, which gives one process's scales
(forge_kernels.fp8.tensor_parallel). The base of a LoRA layer (forge-parallel's ``adapter:``
styles) runs the same way: the style hands an ``nn.Linear`` subclass its DTensor input and
parameters (:mod:`forge_parallel.tp_adapter`), so its amaxes are reduced over tp as well.
:func:`check_fp8_tensor_parallel` refuses, naming the layer, block-wise blocks that would
straddle two ranks.

Where a layer's *tokens* are split over ranks, :func:`set_fp8_token_groups` gives it the group
that splits them (forge_kernels.fp8.token_split), over which the amaxes of its input and output
gradient are all-reduced, so the scales are again one process's: under context parallelism
every FP8 linear (the ``cp`` group), under sequence parallelism the FP8 linears run whole on
each rank's sequence shard (a ``replicate`` style: a MoE block's shared expert, multi-token
prediction's ``eh_proj``; the ``tp`` group, and ``cp`` x ``tp`` with both). Block-wise scaling
needs no reduction there, but its 128-token weight-gradient blocks must not straddle two
ranks: :func:`check_fp8_token_split` refuses sequence shards that are not runs of multiples of
128 tokens.

On a vision-language model only the language model's linears run in FP8 (forge-train passes
``model.language_model``); the vision encoder and projector stay in high precision. Their
token counts follow the images (a batch's patches, no fixed multiple), they are a small
share of a big VLM's GEMM FLOPs (Qwen2.5-VL-72B: a 0.7B encoder beside a 72B decoder), and
keeping them out keeps the token groups simple: under context parallelism every FP8 linear
is the language model's, on the rank's sequence shard (the encoder runs whole on every
context-parallel rank's images).
"""

from __future__ import annotations

import torch
from torch import nn

from forge_train.config import ConfigError

__all__ = [
    "RECIPES",
    "check_fp8_support",
    "check_fp8_tensor_parallel",
    "check_fp8_token_split",
    "convert_model_to_fp8",
    "set_fp8_token_groups",
]

#: ``train.fp8`` -> forge_kernels recipe name.
RECIPES = {"per_tensor": "current", "blockwise": "blockwise"}


def check_fp8_support(mode: str, device: torch.device) -> None:
    """Run one small FP8 linear forward and backward on ``device`` with the recipe of ``mode``;
    ``ConfigError`` saying why when forge_kernels can neither run nor emulate it there."""
    from forge_kernels.fp8 import fp8_linear

    size = 128  # one block of the block-wise recipe, a multiple of 16 for per-tensor
    try:
        x = torch.randn(size, size, device=device, requires_grad=True)
        w = torch.randn(size, size, device=device, requires_grad=True)
        fp8_linear(x, w, recipe=RECIPES[mode]).sum().backward()
    except Exception as exc:  # any failure means: not usable here
        raise ConfigError(
            f"train.fp8={mode}: forge_kernels cannot run or emulate FP8 linears on "
            f"{device.type} ({type(exc).__name__}: {exc}); set train.fp8=null"
        ) from exc


def convert_model_to_fp8(
    model: nn.Module, mode: str, *, policy_path: str | None = None, prefix: str = ""
) -> list[str]:
    """Swap the eligible linears of ``model`` for ``Fp8Linear`` (in place); returns their
    names, each after ``prefix`` (``"language_model."`` when ``model`` is a VLM's language
    model). ``ConfigError`` when none is eligible (FP8 would silently do nothing)."""
    from forge_kernels.fp8 import Fp8Linear, convert_to_fp8

    policy = None if policy_path is None else _load_policy(policy_path, mode)

    def fp8_names() -> list[str]:
        return [name for name, m in model.named_modules() if isinstance(m, Fp8Linear)]

    before = set(fp8_names())
    convert_to_fp8(model, recipe=RECIPES[mode], policy=policy)
    converted = [prefix + name for name in fp8_names() if name not in before]
    if not converted:
        multiple = 128 if mode == "blockwise" else 16
        raise ConfigError(
            f"train.fp8={mode}: no linear layer of the model is eligible (in/out features must "
            f"be multiples of {multiple}; the output head and routers stay in high precision); "
            "use a wider model or train.fp8=null"
        )
    return converted


def _load_policy(path: str, mode: str):
    """``train.fp8_policy`` as an ``Fp8Policy``; ``ConfigError`` saying how to fix it when the
    table was timed with another recipe or on another GPU model (FP8 speed-ups differ)."""
    from forge_kernels.fp8 import Fp8Policy, Fp8PolicyDeviceMismatchError

    recipe = RECIPES[mode]
    recalibrate = (
        f"recalibrate it on this GPU with recipe {recipe!r} (python packages/forge-kernels/"
        f"benchmarks/bench_fp8.py --write-policy PATH --policy-recipe {recipe}, or "
        f"forge_kernels.fp8.calibrate_fp8_policy(recipe={recipe!r})), or set "
        "train.fp8_policy=null to run every eligible linear in FP8"
    )
    try:
        # Read once, unchecked, so the recipe and device errors below can say how to fix it
        # in forge-train's terms; then the same object's device is checked.
        policy = Fp8Policy.load(path, force=True)
        if policy.recipe != recipe:
            raise ConfigError(
                f"train.fp8_policy: {path!r} was calibrated for the {policy.recipe!r} recipe, "
                f"but train.fp8={mode} trains with {recipe!r} (the recipes' FP8 speed-ups "
                f"differ); {recalibrate}"
            )
        policy.check_device(source=path)
    except ConfigError:
        raise
    except Fp8PolicyDeviceMismatchError as exc:
        raise ConfigError(
            f"train.fp8_policy: {path!r} was calibrated on {policy.device_name!r}, not on this "
            f"GPU (FP8 speed-ups differ between GPUs); {recalibrate}"
        ) from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"train.fp8_policy: cannot use {path!r}: {exc}") from exc
    return policy


def check_fp8_tensor_parallel(model: nn.Module, plan, tp: int, mode: str) -> list[nn.Module]:
    """``ConfigError`` naming the first FP8 linear of ``model`` that the tensor-parallel ``plan``
    (a forge_parallel ``TPPlan``) at degree ``tp`` would split in a way that does not give one
    process's FP8 numerics (see the module docstring). Returns the FP8 linears that run whole
    on each rank's sequence shard (for :func:`set_fp8_token_groups`)."""
    from forge_kernels.fp8 import Fp8Linear
    from forge_parallel.tensor_parallel import resolve_plan

    styles = resolve_plan(model, plan)
    block = 128 if mode == "blockwise" else None
    on_sequence_shards: list[nn.Module] = []
    for name, module in model.named_modules():
        if not isinstance(module, Fp8Linear):
            continue
        covering = [n for n in styles if name == n or name.startswith(n + ".")]
        nearest = max(covering, key=len) if covering else None
        style = styles[nearest] if nearest is not None else None
        if not isinstance(style, str):
            continue
        base, _, chunks = style.partition(":")
        if base == "adapter" and name == f"{nearest}.base":  # a LoRA layer's base
            base, _, chunks = chunks.partition(":")
            nearest = name
        if base == "colwise_packed" and "," in chunks:
            raise ConfigError(
                f"train.fp8={mode}: {name} has packed parts of unequal sizes (style "
                f"{style!r} of {nearest}), whose weight stays whole on every rank while each "
                "rank computes its slice of every part, so its FP8 scales would not be those "
                "of the rank's operands; keep the layer out of FP8 or set train.fp8=null"
            )
        if nearest == name and block is not None:
            _check_blocks(name, module, base, int(chunks or 2), tp, block)
        # Independent of the block check: a layer's own ``replicate`` style (multi-token
        # prediction's eh_proj) runs it on the sequence shard as much as an ancestor's does.
        if plan.sequence_parallel and base == "replicate":
            on_sequence_shards.append(module)
        elif base == "replicate_partial":
            raise ConfigError(
                f"train.fp8={mode}: {name} runs replicated on each rank's part of the heads "
                f"(style {style!r} of {nearest}), so its FP8 scales would come from those heads "
                "only; keep the layer out of FP8 or set train.fp8=null"
            )
    return on_sequence_shards


def check_fp8_token_split(
    mode: str, *, tokens: int, chunks: int, cp: int, tp: int, on_sequence_shards: bool
) -> None:
    """``ConfigError`` when block-wise FP8 linears would see sequence shards that are not runs
    of whole 128-token blocks: the context-parallel chunks (``tokens`` of a micro-batch's
    packed row cut into ``chunks``) and, for layers run on sequence shards under sequence
    parallelism, the ``tokens / cp / tp`` each rank holds. Per-tensor scaling has no such
    constraint (its amaxes are reduced over the token group)."""
    if mode != "blockwise":
        return
    block = 128
    runs = {}
    if cp > 1:
        runs["context-parallel chunk"] = tokens // chunks
    if on_sequence_shards and tp > 1:
        runs["sequence-parallel shard"] = tokens // cp // tp
    for what, size in runs.items():
        if size % block:
            raise ConfigError(
                f"train.fp8=blockwise: each {what} holds {size} tokens (a micro-batch's packed "
                f"row of {tokens} tokens, parallel.cp={cp}, parallel.tp={tp}), not a multiple of "
                f"the {block}-token blocks of the weight-gradient GEMM, so a block would mix two "
                f"ranks' tokens; choose data.seq_len x data.micro_batch_rows so that it is, or "
                "use train.fp8=per_tensor"
            )


def set_fp8_token_groups(
    model: nn.Module, mesh, *, cp: int, on_sequence_shards: list[nn.Module]
) -> int:
    """After parallelization, tell each FP8 linear of ``model`` which groups of the forge_core
    ``ParallelMesh`` split its tokens: ``cp`` for all under context parallelism, and ``tp`` for
    those in ``on_sequence_shards`` (from :func:`check_fp8_tensor_parallel`). Returns how many
    were given a group."""
    from forge_kernels.fp8 import Fp8Linear

    shard_ids = {id(module) for module in on_sequence_shards}
    count = 0
    for module in model.modules():
        if not isinstance(module, Fp8Linear):
            continue
        groups = (mesh.group("cp"),) if cp > 1 else ()
        if id(module) in shard_ids:
            groups += (mesh.group("tp"),)
        if groups:
            module.token_group = groups if len(groups) > 1 else groups[0]
            count += 1
    return count


def _check_blocks(
    name: str, module: nn.Module, style: str, chunks: int, tp: int, block: int
) -> None:
    """Every 128-wide scaling block of a sharded dimension must lie within one rank's shard."""
    if style in ("colwise", "colwise_output_replicated", "loss_parallel", "colwise_packed"):
        what, size = "out_features", module.out_features
        parts = chunks if style == "colwise_packed" else 1
    elif style == "rowwise":
        what, size, parts = "in_features", module.in_features, 1
    else:
        return
    local = size // (parts * tp)
    if local % block:
        packed = f" ({parts} packed parts)" if parts > 1 else ""
        raise ConfigError(
            f"train.fp8=blockwise: {name} ({style}) splits {what}={size}{packed} over "
            f"parallel.tp={tp} into {local}-wide shards, not multiples of the {block}-wide "
            "scaling blocks (a block would straddle two ranks); use train.fp8=per_tensor, a "
            f"parallel.tp that leaves multiples of {block} per rank, or wider layers"
        )
