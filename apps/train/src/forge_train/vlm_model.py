"""The model side of a vision-language run (``model.kind=vlm``): a
:class:`forge_models.vlm.VLMConfig` from the model group's plain-data config, with the parts the
run's tokenizer decides (vocabulary size, placeholder token ids) filled in and ``train.freeze``
mapped to ``VLMConfig.frozen``; the model built on the CPU or on the meta device (materialized
after parallelization, as a language model is); and its Hugging Face export.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from forge_train.config import ConfigError, DataConfig, LoraConfig, ModelSettings

__all__ = [
    "build_vlm_model",
    "check_vlm_exportable",
    "export_vlm_hf",
    "language_model_config",
    "language_model_of",
    "vlm_model_config",
    "vlm_text_plan",
]

_log = logging.getLogger(__name__)


def language_model_of(model: nn.Module) -> nn.Module:
    """The language model of a run's model: a vision-language model's ``language_model`` (the
    ``CausalLM`` whose MoE layers record ``moe_stats`` and whose ``mtp`` modules predict
    further tokens), else the model itself."""
    return getattr(model, "language_model", model)


def language_model_config(config):
    """The language model's config of a run's model config: a ``VLMConfig``'s ``text``, else
    the config itself (a ``TransformerConfig``)."""
    return getattr(config, "text", config)


def vlm_model_config(settings: ModelSettings, tokenizer, *, frozen: list[str]):
    """The ``VLMConfig`` of ``model.config``.

    ``text.vocab_size`` null (or absent without a ``text.size``) takes ``model.vocab_size`` or
    the tokenizer's. Null token ids (``image_token_id``, ``video_token_id``,
    ``vision_start_token_id``) take the tokenizer's ids of the placeholder style's tokens (null
    for a token the style lacks, e.g. LLaVA-OneVision's image start: none), and set ones must
    equal them (the data writes the tokenizer's): the style of the model's
    projector (:func:`forge_train.vlm_processing.placeholder_style`), the tokens
    :func:`forge_train.data.load_run_tokenizer` adds.
    """
    from forge_models.vlm import vlm_config_from_dict
    from forge_train.vlm_processing import placeholder_style, style_token_names

    fields: dict[str, Any] = dict(settings.config)
    text = dict(fields.get("text") or {})
    if text.get("vocab_size") is None and ("vocab_size" in text or "size" not in text):
        text["vocab_size"] = settings.vocab_size or tokenizer.vocab_size
    fields["text"] = text
    own = placeholder_style(fields)
    for key, token in style_token_names(own).items():
        if token is None:  # the style has no such token: null means none (VLMConfig's default)
            continue
        token_id = tokenizer.token_to_id(token)
        if key in fields and fields[key] is None:
            if token_id is None:
                raise ConfigError(
                    f"model.config.{key}: null takes the tokenizer's id of the {own.name} "
                    f"placeholder token {token!r}, which it lacks; set the id or use a "
                    "tokenizer that holds it"
                )
            fields[key] = token_id
        elif fields.get(key) is not None and token_id is not None and fields[key] != token_id:
            raise ConfigError(
                f"model.config.{key}={fields[key]} but the data writes {token!r} as token "
                f"{token_id} of the run's tokenizer; set data.tokenizer to the model's own "
                f"tokenizer folder, or {key}=null to take the tokenizer's id"
            )
    if frozen:
        fields["frozen"] = list(frozen)
    try:
        return vlm_config_from_dict(fields)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"model.config: {exc}") from exc


def build_vlm_model(settings: ModelSettings, config, *, seed: int) -> tuple[nn.Module, bool]:
    """``(model, on_meta)`` for ``model.kind=vlm``: built on the meta device for
    ``init_device=meta`` (or ``auto`` above :data:`forge_train.modeling.META_INIT_PARAMS`
    parameters, counted on the meta model), to be materialized after parallelization by
    :func:`forge_models.materialize` (``VisionLanguageModel.init_weights`` initializes every
    part); else materialized on the CPU and initialized with ``seed``."""
    import forge_models
    from forge_models.vlm import build_vlm
    from forge_train.modeling import META_INIT_PARAMS

    model = build_vlm(config, device="meta")
    n_params = sum(p.numel() for p in model.parameters())
    meta = settings.init_device == "meta" or (
        settings.init_device == "auto" and n_params > META_INIT_PARAMS
    )
    if meta:
        return model, True
    torch.manual_seed(seed)
    return forge_models.materialize(model, "cpu"), False


def vlm_text_plan(language_model: nn.Module, *, sequence_parallel: bool, prefix: str = ""):
    """The tensor-parallel plan of a VLM's language model (paths inside it, each after
    ``prefix``: ``"language_model."`` for paths in the whole model).

    Without sequence parallelism: its family's plan. With it (Korthikanti et al. 2022,
    "Reducing Activation Recomputation in Large Transformer Models", arXiv:2205.05198), the
    family's plan except where the sequence gets split: the token embedding's output stays
    replicated (vocabulary-parallel lookup, all-reduced) so the visual features are scattered
    into their placeholder rows over the whole sequence (``embeds_scatter``, in row-major
    order of the placeholders), and the first block splits it into this rank's sequence shard
    (``sequence_scatter``; its backward all-gathers). Sharding the embedding's output instead
    (the language model's plan, a reduce-scatter) would leave each rank a shard of the rows
    with no way to know which features fall in it.

    A mixture-of-experts layer runs whole on every rank (``replicate``), as in a language
    model's plan (:func:`forge_train.components._text_plan`): on the whole sequence without
    sequence parallelism, on the rank's shard with it (its routing statistics then summed over
    the tensor-parallel ranks, :mod:`forge_train.sharded_routing`).
    """
    from forge_parallel import TPPlan

    plan = dict(language_model.parallel_plan(sequence_parallel=sequence_parallel))
    if any(getattr(block, "is_moe", False) for block in getattr(language_model, "layers", ())):
        plan = _moe_layers_whole(language_model, plan)
    if not sequence_parallel:
        return TPPlan(styles={prefix + k: v for k, v in plan.items()})
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import RowwiseParallel

    if "embed_tokens" not in plan or not hasattr(language_model, "layers"):
        raise ConfigError(
            "parallel.sequence_parallel: the language model's plan has no embed_tokens / layers "
            "entries to split the sequence after the visual features; set "
            "parallel.sequence_parallel=false"
        )
    if len(getattr(language_model, "mtp", None) or ()):
        # The embedding's output stays whole here, so an MTP module would get its depth's
        # embeddings whole beside the hidden states' shard (a language model's plan
        # reduce-scatters them: forge_train.components._mtp_sequence_parallel_styles).
        raise ConfigError(
            "parallel.sequence_parallel: a vision-language model's multi-token prediction "
            "modules do not run on sequence shards yet; set parallel.sequence_parallel=false "
            "(tensor parallelism without it works) or model.config.text.mtp_depth=0"
        )
    plan["embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    plan["layers.0"] = "sequence_scatter"
    return TPPlan(styles={prefix + k: v for k, v in plan.items()}, sequence_parallel=True)


def _moe_layers_whole(language_model: nn.Module, plan: dict) -> dict:
    """``plan`` with each decoder layer's feed-forward styled one by one: a MoE block whole on
    every rank (``replicate``: the family's ``layers.*.mlp.*`` entries split a dense MLP or
    place the router inside a ``block_input`` block, which forge-parallel's ``replicate``
    refuses), a dense one split as the family splits it."""
    from forge_train.components import _feed_forward_styles

    plan = {
        k: v for k, v in plan.items() if k != "layers.*.mlp" and not k.startswith("layers.*.mlp.")
    }
    for i, block in enumerate(language_model.layers):
        plan.update(_feed_forward_styles(f"layers.{i}.mlp", is_moe=block.is_moe))
    return plan


def check_vlm_exportable(config) -> None:
    """``ConfigError`` unless ``config.family`` is a Hugging Face family built from the
    model's parts (its ``config.json`` round trip names the same encoder and projector)."""
    import forge_models

    names = (config.vision_name, config.projector_name)
    try:
        family = forge_models.get_family(config.family)
        back = family.config_from_hf(family.config_to_hf(config))
        ok = (back.vision_name, back.projector_name) == names
    except (AttributeError, KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(
            f"checkpoint.export_hf: model family {config.family!r} has no Hugging Face "
            f"counterpart built from {names[0]!r} + {names[1]!r}; set model.config.family to the "
            "one the parts make (qwen2_5_vl: qwen2_5_vit + qwen2_5_vl_merger, llava_onevision: "
            "siglip + llava_onevision, internvl: intern_vit + pixel_shuffle_mlp) or "
            "checkpoint.export_hf=false"
        )


def export_vlm_hf(
    model: nn.Module,
    config,
    out_dir: Path,
    *,
    tokenizer: Any,
    lora: LoraConfig | None,
    dtype: torch.dtype | None,
    is_main: bool,
    pipeline=None,
    data: DataConfig | None = None,
) -> Path | None:
    """Write a trained VLM as a Hugging Face folder of its family (``config.family``:
    ``qwen2_5_vl``, ``llava_onevision`` or ``internvl``) through
    ``forge_models.save_pretrained`` and forge-ckpt's composed mapping, with the tokenizer
    beside it. With ``data`` (the run's data settings), the image processor training used
    (:func:`forge_train.vlm_processing.build_processor`) is written as transformers'
    ``preprocessor_config.json`` / ``processor_config.json``
    (:func:`~forge_train.vlm_processing.hf_processor_files`; InternVL's tokenizer gets the
    ``extra_special_tokens`` its transformers processor reads), or the log says why not. They
    go into the weights' atomic write (``save_pretrained``'s ``hf_extra_files``), so the folder
    never appears, or replaces an earlier export, without them.

    Collective (tensors gathered and written one at a time,
    :func:`forge_train.modeling.export_tensors`); only the main process writes. ``pipeline``:
    the run's :class:`~forge_train.vlm_pipeline.VLMPipelineParts` when ``model`` is one
    pipeline rank's part (its stages send their tensors to the main process). With ``lora``
    the adapters are merged into their layers' weights
    (:func:`forge_train.lora.merge_lora_tensors`): a plain model of the family, as a
    transformers user loads it."""
    from forge_models.vlm import build_vlm
    from forge_train.modeling import write_hf_folder

    check_vlm_exportable(config)
    processor_files: dict[str, str] = {}
    if data is not None:
        from forge_train.vlm_processing import build_processor, hf_processor_files

        processor = build_processor(config, data)
        processor_files, why_not = hf_processor_files(processor)
        if why_not is not None and is_main:
            _log.warning("checkpoint.export_hf: %s", why_not)
        intern_vl = type(processor).__name__ == "InternVLProcessor"
        if processor_files and intern_vl and tokenizer is not None and is_main:
            tokenizer = _with_intern_vl_tokens(tokenizer)
    plain = build_vlm(config, device="meta")  # config, names and shapes: no memory
    plain.hf_extra_files = processor_files  # written with the weights, in one atomic write
    return write_hf_folder(
        model, plain, out_dir, tokenizer=tokenizer, lora=lora, dtype=dtype, is_main=is_main,
        pipeline=pipeline,
    )  # fmt: skip


def _with_intern_vl_tokens(tokenizer: Any) -> Any:
    """``tokenizer`` whose ``tokenizer_config.json`` names InternVL's placeholder tokens in
    ``extra_special_tokens`` (:data:`forge_data.vision.intern_vl.HF_TOKENIZER_TOKENS`), which
    transformers' ``InternVLProcessor`` reads as tokenizer attributes; the names a tokenizer
    already sets are kept. A non-empty list there (extra tokens without names) is left as it
    is and the log says what is missing."""
    from forge_data.vision.intern_vl import HF_TOKENIZER_TOKENS

    named = tokenizer.config.get("extra_special_tokens") or {}
    if not isinstance(named, dict):
        _log.warning(
            "checkpoint.export_hf: the tokenizer's extra_special_tokens is a %s, not the names "
            "transformers' InternVLProcessor reads (%s); AutoProcessor will not load the export "
            "until they are added",
            type(named).__name__,
            sorted(HF_TOKENIZER_TOKENS),
        )
        return tokenizer
    return tokenizer.with_config(extra_special_tokens={**HF_TOKENIZER_TOKENS, **named})
