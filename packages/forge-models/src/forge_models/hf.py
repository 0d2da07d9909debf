"""``from_pretrained`` / ``save_pretrained``: Hugging Face folders <-> forge models.

These combine the model registry (which family, which config) with forge-ckpt (how the tensors
are named and laid out, and the streaming safetensors reader/writer). Loading builds the model
on the meta device, allocates it on the target device without initializing it, checks the
checkpoint's tensor names and shapes from its headers, then fills tensors one at a time as
they are read (peak memory: the model plus about one tensor; a fused tensor's first part waits
for its second, which may sit in the next shard). Fused tensors (q/k/v, gate/up, stacked
experts) are written part by part into the parameter, never joined in a temporary first, and
a part whose place in the parameter is contiguous is read from the file straight into it. On
CPU, :func:`from_pretrained` by default lets a parameter whose checkpoint tensor already has
its dtype and layout keep the file's memory-mapped pages (private, copy-on-write, as
``transformers`` and ``safetensors`` load) instead of copying them: loading then costs what
mapping the file costs, pages are read on first use, and a parameter that training writes
gets its own copy of the pages it writes. Saving streams the model's tensors through the
inverse mapping into shards.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from forge_ckpt import HFCheckpoint, get_mapping, save_hf_checkpoint
from forge_ckpt.mapping import MappingSpec
from forge_models.config import TransformerConfig
from forge_models.families._hf_config import overlay_hf_config
from forge_models.registry import build_model, family_for_hf_config, get_family, materialize
from forge_models.vlm.config import VLMConfig

__all__ = [
    "KEEP_FP32_MODULES",
    "check_not_quantized",
    "from_pretrained",
    "keep_fp32_patterns",
    "load_hf_weights",
    "loading_context",
    "read_generation_config",
    "save_pretrained",
]

#: Safetensors dtype codes (and torch dtype names, for ``.bin``) of quantized weight storage:
#: 8-bit and smaller floats and integers, which forge would otherwise cast as plain numbers.
QUANTIZED_DTYPES = frozenset(
    {
        "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "I8", "U8", "I4", "U4",
        "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
        "int8", "uint8",
    }
)  # fmt: skip

#: transformers' generation defaults file, copied through an export of a loaded model.
GENERATION_CONFIG = "generation_config.json"

#: The tensors transformers keeps in float32 whatever the model's dtype, by ``model_type`` (of
#: ``config.json`` or of one of its sub-configs): ``(strict, fp16_only)`` name patterns, the
#: ``_keep_in_fp32_modules_strict`` (float32 at bfloat16 and float16) and
#: ``_keep_in_fp32_modules`` (float32 at float16 only) of the model classes, as in transformers
#: 5.23 for every family forge exports (llama, qwen2, qwen2_moe, qwen3, qwen3_moe, deepseek_v3,
#: qwen2_5_vl, llava_onevision, internvl and their vision / text sub-models): DeepSeek-V3's
#: router selection bias only (``test_hf_keep_fp32.py`` checks the table against the installed
#: transformers).
KEEP_FP32_MODULES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "deepseek_v3": (("e_score_correction_bias",), ()),
}

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _dtype_from_config(hf_config: Mapping[str, Any]) -> torch.dtype | None:
    name = hf_config.get("dtype") or hf_config.get("torch_dtype")
    if isinstance(name, str):
        dtype = getattr(torch, name.removeprefix("torch."), None)
        if isinstance(dtype, torch.dtype):
            return dtype
    return None


def _mtp_option(
    spec: MappingSpec, hf_config: Mapping[str, Any], config: TransformerConfig
) -> dict[str, int]:
    """The model's multi-token prediction depth, for mappings that map MTP modules."""
    if "mtp_depth" in spec.context(hf_config):
        return {"mtp_depth": config.mtp_depth}
    return {}


def check_not_quantized(ckpt: HFCheckpoint) -> None:
    """Refuse a quantized checkpoint (``quantization_config`` in ``config.json``, or weights
    stored as 8-bit or smaller floats / integers): loading casts each stored number to the
    parameter dtype and would drop the scales, so the model would compute something else."""
    how = (
        "forge trains full-precision weights and does not dequantize; dequantize the checkpoint "
        "to bfloat16 first (e.g. DeepSeek's inference/fp8_cast_bf16.py for its FP8 release, or "
        "transformers' dequantizing load followed by save_pretrained in bfloat16) and load that "
        "folder"
    )
    quant = ckpt.config.get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method", "unknown") if isinstance(quant, Mapping) else quant
        raise ValueError(
            f"{ckpt.path} is a quantized checkpoint (config.json quantization_config with "
            f"quant_method={method!r}); {how}"
        )
    low = {
        name: info.dtype
        for name, info in ckpt.tensor_info().items()
        if info.dtype in QUANTIZED_DTYPES
    }
    if low:
        examples = ", ".join(f"{n} ({d})" for n, d in sorted(low.items())[:3])
        raise ValueError(
            f"{ckpt.path} stores {len(low)} tensors in a quantized dtype ({examples}) without a "
            f"quantization_config; {how}"
        )


def _model_types(hf_config: Mapping[str, Any]) -> list[str]:
    """``model_type`` of ``config.json`` and of each sub-config (``text_config``,
    ``vision_config``, ...): transformers builds each sub-model from its own class, whose
    float32 keep-list joins the whole model's."""
    found = [hf_config.get("model_type")]
    found += [v.get("model_type") for v in hf_config.values() if isinstance(v, Mapping)]
    return list(dict.fromkeys(t for t in found if isinstance(t, str)))


def keep_fp32_patterns(hf_config: Mapping[str, Any], dtype: torch.dtype) -> tuple[str, ...]:
    """Name patterns (``*`` any characters, matched anywhere in a tensor name, as transformers
    matches them) of the tensors transformers keeps in float32 when it builds ``hf_config``'s
    model in ``dtype``: the strict keep-list at bfloat16 / float16, the other one at float16
    too; none at other dtypes. Read from :data:`KEEP_FP32_MODULES` for the config's model types
    (sub-configs included): kept as data, as forge-ckpt keeps its mappings, and checked against
    the installed transformers' classes by the tests.

    :func:`save_pretrained` writes these tensors in float32: transformers loads them as float32
    even from a bfloat16 file, but the bits a bfloat16 cast dropped are gone (DeepSeek-V3's
    ``e_score_correction_bias`` near 1 moves in steps of 2**-7, and the routing it steers
    changes)."""
    if dtype not in _HALF_DTYPES:
        return ()
    strict: set[str] = set()
    fp16: set[str] = set()
    for model_type in _model_types(hf_config):
        table_strict, table_fp16 = KEEP_FP32_MODULES.get(model_type, ((), ()))
        strict.update(table_strict)
        fp16.update(table_fp16)
    return tuple(sorted(strict | (fp16 if dtype == torch.float16 else set())))


def _keep_fp32_matcher(hf_config: Mapping[str, Any], dtype: torch.dtype) -> re.Pattern | None:
    """One regex of :func:`keep_fp32_patterns` (``None`` when there are none)."""
    patterns = keep_fp32_patterns(hf_config, dtype)
    if not patterns:
        return None
    return re.compile("|".join(re.escape(p).replace(r"\*", ".*") for p in patterns))


def read_generation_config(hf_dir: str | os.PathLike) -> str | None:
    """The text of ``hf_dir``'s ``generation_config.json`` (``None`` without one), which
    :func:`save_pretrained` writes back beside the weights as ``model.hf_generation_config``."""
    path = Path(hf_dir) / GENERATION_CONFIG
    return path.read_text() if path.is_file() else None


def from_pretrained(
    hf_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    family: str | None = None,
    vocab_pad_multiple: int = 1,
    allow_bin: bool = True,
    mtp_depth: int | None = None,
    parallelize: Callable[[nn.Module], Any] | None = None,
    mmap: bool = True,
) -> nn.Module:
    """Load a Hugging Face checkpoint folder into a forge model.

    Args:
        hf_dir: folder with ``config.json`` and ``model.safetensors`` (or shards + index).
        dtype: parameter dtype; default the checkpoint's ``dtype`` / ``torch_dtype`` in
            ``config.json``, else float32.
        device: where the parameters live (default CPU).
        family: force a family; default from ``config.json``'s ``model_type``.
        vocab_pad_multiple: pad embedding / output rows to a multiple of this (for tensor
            parallelism); ``save_pretrained`` removes the padding again.
        allow_bin: accept legacy ``pytorch_model*.bin`` (read with ``weights_only=True``).
        mtp_depth: multi-token prediction modules to build (default: as many as the checkpoint
            holds, for families whose mapping maps them); ``0`` loads a DeepSeek-V3 checkpoint
            without its MTP layers.
        parallelize: called with the model while it is still on the meta device, to
            parallelize it in place (``lambda m: forge_parallel.parallelize(m, dims, ...)``);
            then each rank allocates and reads only the shards it holds.
        mmap: on CPU, parameters whose checkpoint tensor has their dtype and layout share the
            file's pages copy-on-write instead of holding a copy (see the module docstring).
            ``False`` copies every tensor into memory of the model's own, e.g. when the files
            will be overwritten in place (not by rename) while the model lives.

    The model keeps the source ``config.json`` as ``model.hf_config`` (and its
    ``generation_config.json`` as ``model.hf_generation_config``) so that
    :func:`save_pretrained` writes them back. A quantized checkpoint is refused
    (:func:`check_not_quantized`). Raises
    :class:`forge_ckpt.CheckpointMismatchError` (missing / unexpected / mis-shaped tensors)
    before reading any tensor data if the checkpoint does not fit the config.
    """
    ckpt = HFCheckpoint(hf_dir, allow_bin=allow_bin)
    hf_config = ckpt.config
    check_not_quantized(ckpt)
    fam = get_family(family) if family is not None else family_for_hf_config(hf_config)
    if mtp_depth is None:  # the MTP layers the checkpoint holds, where the mapping maps them
        spec = get_mapping(fam.ckpt_mapping)
        ctx = spec.context(hf_config, **spec.detect_context(ckpt.names()))
        mtp_depth = ctx.get("mtp_depth")
    overrides = {} if mtp_depth is None else {"mtp_depth": int(mtp_depth)}
    config = fam.config_from_hf(hf_config, vocab_pad_multiple=vocab_pad_multiple, **overrides)
    dtype = dtype or _dtype_from_config(hf_config) or torch.float32
    model = build_model(config, device="meta", dtype=dtype)
    if parallelize is None:
        materialize(model, device, init=False)
    else:
        parallelize(model)
        # to_empty allocates each DTensor's local shard only.
        model.to_empty(device=torch.device("cpu") if device is None else device)
    load_hf_weights(model, ckpt, mmap=mmap and parallelize is None)
    model.hf_config = dict(hf_config)
    model.hf_generation_config = read_generation_config(hf_dir)
    return model


def loading_context(
    spec: MappingSpec, ckpt: HFCheckpoint, config: TransformerConfig | VLMConfig
) -> dict[str, Any]:
    """The mapping context of ``ckpt`` for a model of ``config`` (padding, MTP depth)."""
    return spec.context(
        ckpt.config,
        vocab_pad_multiple=config.vocab_pad_multiple,
        **_mtp_option(spec, ckpt.config, config),
        **spec.detect_context(list(ckpt.tensor_info())),
    )


def _holds_shards(model: nn.Module) -> bool:
    """Whether ``model`` holds only parts of its tensors (DTensor shards)."""
    # Importing torch.distributed.tensor costs seconds; before it is imported, no DTensor exists.
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and any(
        isinstance(t, dtensor.DTensor) for t in model.state_dict().values()
    )


def load_hf_weights(
    model: nn.Module,
    hf_dir: str | os.PathLike | HFCheckpoint,
    *,
    config: TransformerConfig | None = None,
    mmap: bool = False,
) -> nn.Module:
    """Copy a Hugging Face checkpoint into an existing, materialized forge model, in place.

    Every model tensor must come from the checkpoint (strict); tensors are cast to the
    parameter's dtype and device as they are copied. Checkpoint layers of multi-token
    prediction modules beyond the model's ``mtp_depth`` are dropped. With ``mmap``, a CPU
    parameter or buffer whose checkpoint tensor already has its dtype, shape and a contiguous
    layout takes that tensor's storage instead (``param.data = tensor``: the same parameter
    objects, so ties and references stay, but the values live in the file's private,
    copy-on-write mapping; see the module docstring).

    The model may be parallelized: with DTensor parameters (FSDP2, tensor / expert parallel)
    or as a pipeline stage module (pass ``config``, the whole model's config, which a stage
    lacks) each rank reads only the slices it holds (:func:`forge_models.sharded_load.
    load_hf_shards`, which also reports the bytes read); a whole plain model streams the
    checkpoint file by file.
    """
    ckpt = hf_dir if isinstance(hf_dir, HFCheckpoint) else HFCheckpoint(hf_dir)
    check_not_quantized(ckpt)
    if config is not None or not hasattr(model, "config") or _holds_shards(model):
        from forge_models.sharded_load import load_hf_shards

        load_hf_shards(model, ckpt, config=config)
        return model
    config = model.config
    spec = get_mapping(get_family(config.family).ckpt_mapping)
    hf_shapes = {name: info.shape for name, info in ckpt.tensor_info().items()}
    ctx = loading_context(spec, ckpt, config)
    state = model.state_dict()
    spec.check_hf(
        hf_shapes,
        ctx,
        {name: tuple(t.shape) for name, t in state.items()},
    )
    live = _live_tensors(model) if mmap else {}
    with torch.no_grad():
        for rule, parts in spec.hf_to_forge_parts(ckpt.iter_tensors(), ctx):
            target = live.get(rule.forge)
            if target is not None and rule.rule.concat is None:
                tensor = rule.to_forge(parts, ctx)
                if _can_share(tensor, target):
                    target.data = tensor
                    continue
            _fill(ckpt, rule, state[rule.forge], parts, ctx)
    return model


def _fill(ckpt: HFCheckpoint, rule, out: torch.Tensor, parts, ctx) -> None:
    """Write a rule's checkpoint tensors into ``out``: each part read from the file straight
    into its place where that place is contiguous and of the part's dtype
    (:meth:`HFCheckpoint.read_into`), else copied (and cast) from the mapped file."""
    own = parts[: len(rule.own)]
    views = rule.part_views(out, [tuple(p.shape) for p in own], ctx)
    if views is None:  # transforms after the join (e.g. vocabulary padding)
        rule.to_forge_into(out, parts, ctx)
        return
    rule.check_copies(parts)
    for name, view, part in zip(rule.own, views, own, strict=True):
        if view.is_contiguous() and view.dtype == part.dtype and view.device.type == "cpu":
            ckpt.read_into(name, view)
        else:
            view.copy_(part.reshape(view.shape))


def _live_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameter and buffer objects by state-dict name (``state_dict()`` gives
    detached aliases, whose ``.data`` cannot re-point the module's tensors)."""
    live = dict(model.named_buffers(remove_duplicate=False))
    live.update(model.named_parameters(remove_duplicate=False))
    return live


def _can_share(tensor: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether ``target`` can take ``tensor``'s storage as it is (no cast, move or relayout)."""
    return (
        tensor.device.type == "cpu"
        and target.device.type == "cpu"
        and tensor.dtype == target.dtype
        and tensor.shape == target.shape
        and tensor.is_contiguous()
        and type(tensor) is torch.Tensor
        and type(target) in (torch.Tensor, nn.Parameter)
    )


def save_pretrained(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    tensors: Iterable[tuple[str, torch.Tensor]] | None = None,
    extra_files: Mapping[str, str | bytes] | None = None,
) -> Path | None:
    """Save a forge model as a Hugging Face folder (``config.json`` + safetensors shards).

    ``config.json`` is the source config for a model from :func:`from_pretrained` (passed
    through as it is while the model's config is the one it reads as; once the config has
    changed, the source with every key forge writes overlaid:
    :func:`forge_models.families._hf_config.overlay_hf_config`, so token ids and other keys
    forge does not read survive), else generated from the model's config; a source
    ``generation_config.json`` (``model.hf_generation_config``) is written beside it, and so are
    ``model.hf_extra_files`` and ``extra_files`` (file name -> text or bytes, e.g. a VLM's
    ``preprocessor_config.json``), inside the same atomic write: the folder appears with every
    file or not at all, and a failed write leaves what was there before.

    ``dtype`` casts the saved tensors (default: as they are), except that at bfloat16 / float16
    the tensors transformers keeps in float32 at that dtype (:func:`keep_fp32_patterns`, e.g.
    DeepSeek-V3's ``e_score_correction_bias``) are written in float32, as transformers'
    ``save_pretrained`` writes them; :func:`from_pretrained` reads either. Vocabulary padding is
    removed and a tied ``lm_head`` left out, so transformers' ``from_pretrained`` loads the
    folder.

    Tensors stream: each is mapped, cast and handed to the shard writer as it comes, so the
    peak beyond the model is about one shard (``max_shard_size``). A model holding ``DTensor``
    shards (FSDP2, tensor or expert parallel) is gathered one tensor at a time
    (:func:`forge_ckpt.hf.full_tensors.iter_full_tensors`): collective, every rank calls it,
    global rank 0 writes and returns the folder, the others return ``None``.

    ``tensors``: the model's ``(name, tensor)`` pairs in state-dict order, consumed lazily, in
    place of ``model.state_dict()``; ``model`` then only gives the config and the names and
    shapes to check (it may be on the meta device). E.g. a pipeline-parallel model's
    :func:`~forge_ckpt.hf.full_tensors.iter_full_tensors` on the writing rank.
    """
    config = model.config
    fam = get_family(config.family)
    spec = get_mapping(fam.ckpt_mapping)
    hf_config = getattr(model, "hf_config", None)
    if hf_config is None:
        hf_config = fam.config_to_hf(config)
    else:  # the MTP depth comes from the checkpoint's tensors, not config.json (as on load)
        read = fam.config_from_hf(
            hf_config,
            vocab_pad_multiple=config.vocab_pad_multiple,
            **_mtp_option(spec, hf_config, config),
        )
        if read != config:
            hf_config = overlay_hf_config(hf_config, fam.config_to_hf(config))
    hf_config = dict(hf_config)
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        hf_config["dtype"] = name
        if "torch_dtype" in hf_config:
            hf_config["torch_dtype"] = name
    ctx = spec.context(
        hf_config,
        vocab_pad_multiple=config.vocab_pad_multiple,
        **_mtp_option(spec, hf_config, config),
    )
    state = model.state_dict()
    spec.check_forge({n: t.shape for n, t in state.items()}, ctx)

    if tensors is None:
        tensors = state.items()
        if _holds_shards(model):
            import torch.distributed as dist

            from forge_ckpt.hf.full_tensors import iter_full_tensors

            tensors = iter_full_tensors(state, dst=0)
            if dist.get_rank() != 0:
                for _ in tensors:  # the gathers are collective
                    pass
                return None

    keep_fp32 = None if dtype is None else _keep_fp32_matcher(hf_config, dtype)

    def hf_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in spec.forge_to_hf(tensors, ctx):
            if dtype is None:
                yield name, tensor
            elif keep_fp32 is not None and tensor.is_floating_point() and keep_fp32.search(name):
                yield name, tensor.to(torch.float32)
            else:
                yield name, tensor.to(dtype)

    files: dict[str, str | bytes] = {}
    generation = getattr(model, "hf_generation_config", None)
    if generation is not None:
        files[GENERATION_CONFIG] = generation
    files.update(getattr(model, "hf_extra_files", None) or {})
    files.update(extra_files or {})
    return save_hf_checkpoint(
        out_dir,
        hf_tensors(),
        config=hf_config,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        extra_files=files or None,
    )
