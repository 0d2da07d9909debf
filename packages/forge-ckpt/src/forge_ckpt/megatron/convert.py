"""Whole-checkpoint conversion between Hugging Face folders and Megatron-Core checkpoints.

::

    from forge_ckpt.megatron import hf_to_megatron, megatron_to_hf

    hf_to_megatron("Qwen3-8B", "mcore", tensor_parallel=2, pipeline_parallel=2, format="torch_dist")
    megatron_to_hf("mcore", "Qwen3-8B-again")    # reads any split, either format

Writing reads the Hugging Face tensors of one pipeline stage at a time (peak memory: about one
stage). The Hugging Face ``config.json`` is kept next to the Megatron checkpoint as
``hf_config.json`` so the way back needs nothing else; ``hf_config=`` gives it otherwise.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from forge_ckpt.errors import CheckpointMismatchError
from forge_ckpt.hf.io import HFCheckpoint, read_hf_config, save_hf_checkpoint
from forge_ckpt.mapping.composed import ComposedMapping
from forge_ckpt.mapping.spec import BoundRule
from forge_ckpt.megatron.dist import DistCheckpoint, is_dist_checkpoint, save_dist
from forge_ckpt.megatron.expert_parallel import expert_index
from forge_ckpt.megatron.families import MegatronFamily, get_megatron_family
from forge_ckpt.megatron.layout import (
    iteration_dir,
    layer_of,
    on_first_stage,
    read_latest_iteration,
)
from forge_ckpt.megatron.legacy import LegacyCheckpoint, save_legacy
from forge_ckpt.megatron.virtual_pipeline import parse_pipeline_layout, pipeline_chunks
from forge_ckpt.megatron.vlm_families import vision_args

__all__ = [
    "FORMATS",
    "HF_CONFIG_FILE",
    "hf_to_megatron",
    "megatron_args",
    "megatron_context",
    "megatron_to_hf",
    "mtp_options",
    "open_megatron",
]

FORMATS = ("torch_dist", "legacy")
HF_CONFIG_FILE = "hf_config.json"


def _family(family: str | MegatronFamily | None, config: Mapping[str, Any]) -> MegatronFamily:
    if isinstance(family, MegatronFamily):
        return family
    return get_megatron_family(family if family is not None else config)


def _language_model(
    family: MegatronFamily, config: Mapping[str, Any], ctx: Mapping[str, Any]
) -> tuple[Mapping[str, Any], Mapping[str, Any], str]:
    """``(config view, context, name prefix)`` of the (language) model: the whole model's for a
    text family, the language model part's for a vision-language family (``language_model.``)."""
    if isinstance(family.mapping, ComposedMapping):
        text = family.mapping.parts[-1]
        return text.config(config), ctx["parts"][text.name], "language_model."
    return config, ctx, ""


def megatron_context(
    family: MegatronFamily,
    config: Mapping[str, Any],
    *,
    tensor_parallel: int = 1,
    make_vocab_size_divisible_by: int = 128,
    **options: Any,
) -> dict[str, Any]:
    """The mapping context: vocabulary padded to a multiple of
    ``make_vocab_size_divisible_by * tensor_parallel`` (Megatron-LM's ``padded_vocab_size``)."""
    if make_vocab_size_divisible_by < 1:
        raise ValueError(
            f"make_vocab_size_divisible_by must be >= 1, got {make_vocab_size_divisible_by}"
        )
    options.setdefault("vocab_pad_multiple", make_vocab_size_divisible_by * tensor_parallel)
    return family.mapping.context(config, **options)


def megatron_args(
    config: Mapping[str, Any], ctx: Mapping[str, Any], padded_vocab: int
) -> dict[str, Any]:
    """The Megatron-LM arguments that describe the model (stored as ``args``)."""
    args: dict[str, Any] = {
        "num_layers": int(ctx["num_layers"]),
        "hidden_size": int(ctx["hidden_size"]),
        "num_attention_heads": int(ctx["num_attention_heads"]),
        "ffn_hidden_size": config.get("intermediate_size"),
        "padded_vocab_size": padded_vocab,
        "vocab_size": int(ctx["vocab_size"]),
        "max_position_embeddings": config.get("max_position_embeddings"),
        "normalization": "RMSNorm",
        "norm_epsilon": config.get("rms_norm_eps"),
        "swiglu": True,
        "position_embedding_type": "rope",
        "rotary_base": config.get(
            "rope_theta", (config.get("rope_parameters") or {}).get("rope_theta")
        ),
        "untie_embeddings_and_output_weights": not ctx["tie_word_embeddings"],
        "add_bias_linear": False,
        "transformer_impl": "transformer_engine" if ctx["te_spec"] else "local",
        "moe_grouped_gemm": bool(ctx.get("grouped_gemm")),
        "hf_model_type": config.get("model_type"),
    }
    heads, groups = int(ctx["num_attention_heads"]), ctx.get("num_key_value_heads")
    if groups is not None:
        args.update(
            group_query_attention=int(groups) != heads,
            num_query_groups=int(groups),
            kv_channels=int(ctx["head_dim"]),
        )
    if ctx.get("mtp_depth"):
        args["mtp_num_layers"] = int(ctx["mtp_depth"])
    if ctx.get("num_experts"):
        args.update(
            num_experts=int(ctx["num_experts"]),
            moe_ffn_hidden_size=config.get("moe_intermediate_size"),
            moe_router_topk=config.get("num_experts_per_tok"),
        )
    return {k: v for k, v in args.items() if v is not None}  # fmt: skip


def mtp_options(args: Mapping[str, Any]) -> dict[str, Any]:
    """Context options for the multi-token prediction layers a checkpoint's args announce
    (Megatron-LM's ``mtp_num_layers``; none: the checkpoint has no MTP layers)."""
    depth = int(args.get("mtp_num_layers") or 0)
    return {"mtp_depth": depth, "mtp_in_checkpoint": depth > 0}


def _stage_rules(bound: list[BoundRule], layers: range, first: bool, last: bool) -> list[BoundRule]:
    out = []
    for b in bound:
        layer = layer_of(b.forge)
        if layer is None:
            if (on_first_stage(b.forge) and first) or (not on_first_stage(b.forge) and last):
                out.append(b)
        elif layer in layers:
            out.append(b)
    return out


def _convert(
    ckpt: HFCheckpoint, rules: list[BoundRule], ctx: Mapping[str, Any]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The Megatron tensors of ``rules`` from the Hugging Face tensors they need."""
    slots = {n: (b, k) for b in rules for k, n in enumerate(b.hf)}
    waiting: dict[str, list[torch.Tensor | None]] = {}
    for name, tensor in ckpt.iter_tensors(list(slots)):
        b, k = slots[name]
        parts = waiting.setdefault(b.forge, [None] * len(b.hf))
        parts[k] = tensor
        if all(p is not None for p in parts):
            del waiting[b.forge]
            yield b.forge, b.to_forge(parts, ctx)


def _check_attention_heads(args: Mapping[str, Any], tensor_parallel: int) -> None:
    """Megatron-Core gives each tensor-parallel rank whole attention heads and whole query
    groups (``TransformerConfig``: ``num_attention_heads`` and ``num_query_groups`` must be
    multiples of ``tensor_model_parallel_size``; multi-latent attention has no query groups and
    splits its heads the same way). A split that breaks a head or a group apart is refused."""
    if tensor_parallel < 1:
        raise ValueError(f"tensor_parallel must be >= 1, got {tensor_parallel}")
    heads = int(args["num_attention_heads"])
    groups = int(args.get("num_query_groups") or heads)
    if heads % tensor_parallel or groups % tensor_parallel:
        common = math.gcd(heads, groups)
        allowed = [d for d in range(1, common + 1) if common % d == 0]
        raise ValueError(
            f"tensor_parallel={tensor_parallel} does not divide the model's attention: "
            f"num_attention_heads={heads} and num_query_groups (num_key_value_heads)={groups} "
            f"must both be multiples of it (Megatron-Core gives each tensor-parallel rank whole "
            f"heads and query groups); pick tensor_parallel from {allowed}"
        )


def hf_to_megatron(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    expert_parallel: int = 1,
    first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
    virtual_pipeline: int = 1,
    pipeline_layout: str | None = None,
    format: str = "torch_dist",
    family: str | MegatronFamily | None = None,
    te_spec: bool = True,
    grouped_gemm: bool = False,
    make_vocab_size_divisible_by: int = 128,
    iteration: int = 0,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Convert a Hugging Face folder into a Megatron-Core checkpoint (``torch_dist`` or
    ``legacy``) split ``tensor_parallel`` x ``pipeline_parallel`` x ``expert_parallel`` ways
    (the routed experts of MoE families over ``expert_parallel`` ranks); ``first_stage_layers``
    / ``last_stage_layers`` give the first / last pipeline stage its own layer count (Megatron's
    ``--decoder-first/last-pipeline-num-layers``); ``virtual_pipeline`` splits each stage into
    that many interleaved model chunks (``--num-virtual-stages-per-pipeline-rank``) and
    ``pipeline_layout`` places every layer by a Megatron-Core layout string
    (``--pipeline-model-parallel-layout``, e.g. ``"Et|tt|tt|tL"``); see
    :mod:`~forge_ckpt.megatron.virtual_pipeline`. See the module doc."""
    if format not in FORMATS:
        raise ValueError(f"unknown Megatron format {format!r}; choose one of {FORMATS}")
    ckpt = HFCheckpoint(hf_dir)
    config = ckpt.config
    fam = _family(family, config)
    hf_options = fam.mapping.detect_context(ckpt.names())
    ctx = megatron_context(
        fam, config, tensor_parallel=tensor_parallel, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        te_spec=te_spec, grouped_gemm=grouped_gemm, **hf_options,
    )  # fmt: skip
    spec = fam.mapping
    shapes = {n: i.shape for n, i in ckpt.tensor_info().items()}
    spec.check_hf(shapes, ctx)
    bound = spec.bind(ctx)
    lm_config, lm, prefix = _language_model(fam, config, ctx)
    num_layers = int(lm["num_layers"])
    embedding = next(b for b in bound if b.forge == f"{prefix}embedding.word_embeddings.weight")
    padded = int(embedding.forge_shape([shapes[n] for n in embedding.hf], ctx)[0])
    args = megatron_args(lm_config, lm, padded)
    _check_attention_heads(args, tensor_parallel)
    if prefix:  # a LLaVAModel: its encoder, and the checkpoint layout the way back restores
        args.update(
            vision_args(fam.name, config, ctx), hf_model_type=config.get("model_type"),
            hf_options=hf_options,
        )  # fmt: skip
    moe_layers = {
        layer_of(b.forge)
        for b in bound
        if layer_of(b.forge) is not None
        and (".mlp.router." in b.forge or expert_index(b.forge) is not None)
    }
    # Megatron-Core keys the layers of a model that mixes dense and MoE layers one by one
    # (TransformerBlock.sharded_state_dict's non_homogeneous_layers, set by a moe_layer_freq
    # list): args carry the pattern and torch_dist writes per-layer keys.
    mixed = bool(moe_layers) and len(moe_layers) < num_layers
    if moe_layers:
        args["moe_layer_freq"] = [int(i in moe_layers) for i in range(num_layers)] if mixed else 1
    chunks = pipeline_chunks(
        num_layers, pipeline_parallel, virtual=virtual_pipeline, first=first_stage_layers,
        last=last_stage_layers, layout=pipeline_layout,
    )  # fmt: skip
    if pipeline_layout is not None:
        mtp = "".join(parse_pipeline_layout(pipeline_layout, pipeline_parallel)).count("m")
        if mtp != int(lm.get("mtp_depth") or 0):
            raise ValueError(
                f"pipeline layout {pipeline_layout!r} places {mtp} multi-token prediction "
                f"layer(s) ('m'); the checkpoint has {int(lm.get('mtp_depth') or 0)}"
            )

    def stage_tensors(stage: int, layers: range) -> Iterable[tuple[str, torch.Tensor]]:
        rules = _stage_rules(bound, layers, stage == 0, stage == len(chunks) - 1)
        return _convert(ckpt, rules, ctx)

    experts = int(lm.get("num_experts") or 0) if lm.get("moe_layer") else 0
    common = {
        "num_layers": num_layers, "tensor_parallel": tensor_parallel, "pipeline_parallel": pipeline_parallel,
        "expert_parallel": expert_parallel, "num_experts": experts, "first_stage_layers": first_stage_layers,
        "last_stage_layers": last_stage_layers, "virtual_pipeline": virtual_pipeline,
        "pipeline_layout": pipeline_layout, "args": args, "iteration": iteration, "te_spec": te_spec,
        "overwrite": overwrite, "progress": progress,
    }  # fmt: skip
    if format == "legacy":
        out = save_legacy(
            out_dir, stage_tensors, tied_embeddings=bool(lm["tie_word_embeddings"]), **common
        )
    else:
        vision_layers = int(ctx["parts"]["vision"]["num_layers"]) if prefix else 0
        out = save_dist(
            out_dir,
            stage_tensors,
            renames=fam.local_dist_renames,
            per_layer_keys=mixed,
            vision_layers=vision_layers,
            **common,
        )
    (out / HF_CONFIG_FILE).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    return out


def open_megatron(
    path: str | os.PathLike,
    *,
    iteration: int | str | None = None,
    trusted_globals: tuple[str, ...] = (),
) -> LegacyCheckpoint | DistCheckpoint:
    """The legacy or distributed checkpoint in ``path`` (a save folder or an iteration folder)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Megatron checkpoint folder {path} does not exist")
    folder = path
    if not is_dist_checkpoint(path) and not any(
        p.name.startswith("mp_rank_") for p in path.iterdir()
    ):
        folder = iteration_dir(
            path, iteration if iteration is not None else read_latest_iteration(path)
        )
    if is_dist_checkpoint(folder):
        return DistCheckpoint(folder, trusted_globals=trusted_globals)
    return LegacyCheckpoint(folder, trusted_globals=trusted_globals)


def _megatron_items(
    ckpt: LegacyCheckpoint | DistCheckpoint,
    family: MegatronFamily,
    ctx: Mapping[str, Any],
    prefix: str = "",
) -> Iterator[tuple[str, torch.Tensor]]:
    """Full Megatron tensors of ``ckpt`` under the layer spec of ``ctx`` (the language model's:
    ``te_spec``, ``grouped_gemm``); the last stage's copy of tied embeddings (``prefix`` +
    ``output_layer.weight``) is dropped."""
    te_spec, grouped = bool(ctx["te_spec"]), bool(ctx["grouped_gemm"])
    if isinstance(ckpt, LegacyCheckpoint):
        tied = bool(ctx["tie_word_embeddings"])
        skip = (lambda n: n == f"{prefix}output_layer.weight") if tied else None
        return ckpt.iter_tensors(te_spec=te_spec, skip=skip)
    renames = () if te_spec else family.local_dist_renames
    return ckpt.iter_tensors(renames=renames, grouped_gemm=grouped)


def _hf_config(path: Path, hf_config: str | os.PathLike | Mapping[str, Any] | None) -> dict:
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hf_config is not None:
        p = Path(hf_config)
        return read_hf_config(p) if p.is_dir() else json.loads(p.read_text())
    for folder in (path, path.parent):
        if (folder / HF_CONFIG_FILE).is_file():
            return json.loads((folder / HF_CONFIG_FILE).read_text())
    raise FileNotFoundError(
        f"{path} has no {HF_CONFIG_FILE}: pass the Hugging Face config of the model "
        "(hf_config=<config.json or model folder>; forge-convert: --hf-config)"
    )


def iter_megatron_as_hf(
    path: str | os.PathLike,
    *,
    hf_config: str | os.PathLike | Mapping[str, Any] | None = None,
    family: str | MegatronFamily | None = None,
    iteration: int | str | None = None,
    trusted_globals: tuple[str, ...] = (),
) -> tuple[dict, Iterator[tuple[str, torch.Tensor]]]:
    """``(config, Hugging Face (name, tensor) stream)`` of a Megatron checkpoint."""
    path = Path(path)
    config = _hf_config(path, hf_config)
    fam = _family(family, config)
    ckpt = open_megatron(path, iteration=iteration, trusted_globals=trusted_globals)
    args = ckpt.args
    te_spec = args.get("transformer_impl", "transformer_engine") != "local"
    grouped = bool(args.get("moe_grouped_gemm", False))
    layout = {"te_spec": te_spec, "grouped_gemm": grouped, **mtp_options(args)}
    layout.update(args.get("hf_options") or {})  # a VLM's checkpoint layout, as it was read
    ctx0 = fam.mapping.context(config, **layout)
    _, lm0, prefix = _language_model(fam, config, ctx0)
    items = iter(_megatron_items(ckpt, fam, lm0, prefix))
    # The padded vocabulary comes from the embedding itself: the first tensors are read lazily.
    buffered: list[tuple[str, torch.Tensor]] = []
    padded = args.get("padded_vocab_size")
    if padded is None:
        for name, t in items:
            buffered.append((name, t))
            if name == f"{prefix}embedding.word_embeddings.weight":
                padded = t.shape[0]
                break
    ctx = fam.mapping.context(config, **layout, vocab_pad_multiple=int(padded or 1))
    expected = set(fam.mapping.forge_names(ctx))

    def source() -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in itertools.chain(buffered, items):
            if name not in expected:
                raise CheckpointMismatchError(
                    unexpected=[name],
                    context=f"the Megatron checkpoint does not match the {fam.name} config",
                )
            yield name, t

    return config, fam.mapping.forge_to_hf(source(), ctx)


def megatron_to_hf(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    hf_config: str | os.PathLike | Mapping[str, Any] | None = None,
    family: str | MegatronFamily | None = None,
    iteration: int | str | None = None,
    trusted_globals: tuple[str, ...] = (),
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Convert a Megatron checkpoint (any split, either format) into a Hugging Face folder."""
    config, items = iter_megatron_as_hf(
        path,
        hf_config=hf_config,
        family=family,
        iteration=iteration,
        trusted_globals=trusted_globals,
    )

    def counted() -> Iterator[tuple[str, torch.Tensor]]:
        for item in items:
            if progress is not None:
                progress(1)
            yield item

    return save_hf_checkpoint(
        out_dir, counted(), config=config, max_shard_size=max_shard_size, overwrite=overwrite
    )
