"""The model of a run: a forge_models ``CausalLM`` from a size name, a config or an HF folder,
and its Hugging Face export.

Large models are built on the meta device (no memory) and materialized after parallelization,
so each process allocates and initializes only its own shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from forge_train.config import ConfigError, LoraConfig, ModelSettings

__all__ = [
    "META_INIT_PARAMS",
    "build_model",
    "export_hf",
    "export_tensors",
    "model_config",
    "write_hf_folder",
]

#: ``init_device=auto`` builds on the meta device above this many parameters.
META_INIT_PARAMS = 1_000_000_000


def model_config(settings: ModelSettings, tokenizer_vocab: int):
    """The ``TransformerConfig`` of ``model.*`` (for ``hf_path``: the folder's)."""
    import forge_models

    try:
        if settings.hf_path is not None:
            from forge_ckpt import HFCheckpoint

            hf = HFCheckpoint(settings.hf_path).config
            family = forge_models.family_for_hf_config(hf)
            config = family.config_from_hf(hf)
            return config.replace(**settings.config) if settings.config else config
        if settings.name is not None:
            return forge_models.get_config(settings.name, **settings.config)
        fields = dict(settings.config)
        fields.setdefault("vocab_size", settings.vocab_size or tokenizer_vocab)
        return forge_models.TransformerConfig(**fields)
    except (KeyError, TypeError, ValueError, OSError) as exc:  # OSError: no folder / files
        key = (
            "model.hf_path"
            if settings.hf_path
            else "model.name"
            if settings.name
            else "model.config"
        )
        raise ConfigError(f"{key}: {exc}") from exc


def build_model(settings: ModelSettings, config, *, seed: int) -> tuple[nn.Module, bool]:
    """``(model, on_meta)``: materialized on the CPU and initialized with ``seed`` (or loaded
    from ``hf_path``), or left on the meta device for :func:`forge_models.materialize` after
    parallelization."""
    import forge_models

    if settings.kind == "vlm":
        from forge_train.vlm_model import build_vlm_model

        return build_vlm_model(settings, config, seed=seed)
    meta = settings.init_device == "meta" or (
        settings.init_device == "auto" and forge_models.count_params(config) > META_INIT_PARAMS
    )
    if settings.hf_path is not None:
        from forge_ckpt import HFCheckpoint
        from forge_models.hf import read_generation_config

        model = forge_models.build_model(config, device="meta", dtype=torch.float32)
        model.hf_config = dict(HFCheckpoint(settings.hf_path).config)
        # written back beside the export's config.json (forge_models.save_pretrained)
        model.hf_generation_config = read_generation_config(settings.hf_path)
        if meta:  # each rank reads its own shards after parallelization (load_hf_into)
            return model, True
        forge_models.materialize(model, "cpu", init=False)
        with _hf_weights_error(settings.hf_path, settings.config):
            forge_models.load_hf_weights(model, settings.hf_path)
        return model, False
    if meta:
        return forge_models.build_model(config, device="meta"), True
    torch.manual_seed(seed)
    return forge_models.build_model(config, device="cpu"), False


@contextmanager
def _hf_weights_error(hf_path: str, overrides: dict[str, Any]) -> Iterator[None]:
    """Report a checkpoint that does not fit the model built from its own ``config.json``
    (forge_ckpt's ``CheckpointMismatchError``: tensors missing, unexpected or mis-shaped) as a
    ``ConfigError`` of ``model.hf_path``: the folder's weights belong to another model, or
    ``model.config`` overrides changed the shapes."""
    from forge_ckpt.errors import CheckpointMismatchError

    try:
        yield
    except CheckpointMismatchError as exc:
        changed = (
            f" or the model.config overrides {overrides} changed the model's shapes"
            if overrides
            else ""
        )
        raise ConfigError(
            f"model.hf_path: the weights in {hf_path} do not fit the model that its config.json "
            f"describes (the config.json is another model's{changed}); use a folder whose "
            f"config.json matches its weights:\n{exc}"
        ) from exc


def load_hf_into(
    model: nn.Module,
    hf_path: str,
    config,
    *,
    pipeline=None,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Read ``hf_path`` into a materialized, parallelized meta-built model (or pipeline
    stage): each rank reads only the slices it holds (``forge_models.load_hf_weights`` with
    the whole model's ``config``). ``overrides``: the run's ``model.config``, named in the
    error when the weights do not fit."""
    import forge_models

    with _hf_weights_error(hf_path, overrides or {}):
        forge_models.load_hf_weights(model, hf_path, config=config)
    if pipeline is not None:
        pipeline.pipe.sync_tied_weights()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on the CPU (collective: every rank calls it). The whole model
    on every rank: the Hugging Face export streams instead (:func:`export_tensors`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def _plain_name(name: str) -> str:
    """The unsplit plain model's name of a trained model's tensor (LoRA parts -> the merged
    weight: ``q.lora_A`` / ``q.lora_B`` / ``q.base.weight`` -> ``q.weight``)."""
    for suffix in (".lora_A", ".lora_B"):
        if name.endswith(suffix):
            return name.removesuffix(suffix) + ".weight"
    prefix, base, leaf = name.rpartition(".base.")
    return f"{prefix}.{leaf}" if base else name


def export_tensors(
    model: nn.Module,
    plain: nn.Module,
    *,
    lora: LoraConfig | None,
    is_main: bool,
    pipeline=None,
) -> Iterator[tuple[str, torch.Tensor]] | None:
    """The trained model's tensors for ``forge_models.save_pretrained(plain, ...,
    tensors=...)``: gathered whole one at a time
    (:func:`forge_ckpt.hf.full_tensors.iter_full_tensors`; a pipeline's stages sent to the main
    process one tensor at a time), in ``plain``'s state-dict order (so the shards hold what a
    one-process export's hold), LoRA adapters merged per layer, cast to ``plain``'s dtypes.
    Collective: on the main process the stream (consume it to the end); elsewhere the gathers
    are run here and ``None`` is returned. ``plain``: the unsplit model on the meta device."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from forge_ckpt.hf.full_tensors import iter_full_tensors

    dtypes = {name: t.dtype for name, t in plain.state_dict().items()}
    index = {name: i for i, name in enumerate(dtypes)}
    # Names the plain model's state dict leaves out (a tied head: the last pipeline stage's
    # copy of the embedding) are neither gathered nor written.
    dropped = set(dict(plain.named_parameters(remove_duplicate=False))) - set(dtypes)

    def sort_key(name: str) -> int:
        return index.get(_plain_name(name), len(index))

    def check(names: list[str]) -> None:
        got = {_plain_name(name) for name in names}
        missing, unexpected = sorted(set(index) - got), sorted(got - set(index))
        if missing or unexpected:
            raise ValueError(
                f"export: the trained model's tensors do not match a plain {type(plain).__name__} "
                f"of its config: missing {missing[:8]}, unexpected {unexpected[:8]}"
            )

    stage = model if pipeline is None else pipeline.stage
    state = {  # this rank's shards under whole-model names
        name: t for name, t in get_model_state_dict(stage).items() if name not in dropped
    }
    group = None if pipeline is None else pipeline.group
    stream = iter_full_tensors(state, pipeline_group=group, dst=0, sort_key=sort_key, check=check)
    if not is_main:
        for _ in stream:  # the gathers and sends are collective
            pass
        return None
    if lora is not None:
        from forge_train.lora import merge_lora_tensors

        stream = merge_lora_tensors(stream, scaling=lora.alpha / lora.rank)
    return (
        (name, t if dtypes.get(name, t.dtype) == t.dtype else t.to(dtypes[name]))
        for name, t in stream
    )


def export_hf(
    model: nn.Module,
    config,
    out_dir: Path,
    *,
    tokenizer: Any,
    lora: LoraConfig | None,
    dtype: torch.dtype | None,
    is_main: bool,
    pipeline=None,
    data=None,
) -> Path | None:
    """Write ``out_dir`` as a Hugging Face folder (weights, ``config.json``, tokenizer) with
    ``forge_models.save_pretrained``; LoRA adapters are merged into the weights. Tensors are
    gathered, merged and written one at a time (:func:`export_tensors`): the main process's
    peak is about one shard, not the model. Collective; only the main process writes.
    ``pipeline``: the run's :class:`~forge_train.pipeline_model.PipelineParts` when ``model``
    is one stage of it. ``data``: the run's ``DataConfig``; a VLM export writes the image
    processor it builds (:func:`forge_train.vlm_model.export_vlm_hf`)."""
    from forge_models.vlm import VLMConfig

    if isinstance(config, VLMConfig):
        from forge_train.vlm_model import export_vlm_hf

        return export_vlm_hf(
            model,
            config,
            out_dir,
            tokenizer=tokenizer,
            lora=lora,
            dtype=dtype,
            is_main=is_main,
            pipeline=pipeline,
            data=data,
        )
    import forge_models

    plain = forge_models.build_model(config, device="meta")  # config, names, shapes: no memory
    hf_config = getattr(model, "hf_config", None)
    if hf_config is not None:
        plain.hf_config = hf_config
        plain.hf_generation_config = getattr(model, "hf_generation_config", None)
    return write_hf_folder(
        model, plain, out_dir, tokenizer=tokenizer, lora=lora, dtype=dtype, is_main=is_main,
        pipeline=pipeline,
    )  # fmt: skip


def write_hf_folder(
    model: nn.Module,
    plain: nn.Module,
    out_dir: Path,
    *,
    tokenizer: Any,
    lora: LoraConfig | None,
    dtype: torch.dtype | None,
    is_main: bool,
    pipeline=None,
) -> Path | None:
    """The trained ``model``'s tensors (:func:`export_tensors`) written by
    ``forge_models.save_pretrained(plain, ...)`` as a Hugging Face folder, with the tokenizer's
    files inside the same atomic write (the folder never appears without them). Collective; the
    folder on the main process, ``None`` elsewhere.

    If the writer fails (a full disk, a bad folder), the rest of the stream is still consumed
    before the error is raised: its gathers are collective, and the other ranks would
    otherwise wait in them until the process-group timeout."""
    import forge_models

    tensors = export_tensors(model, plain, lora=lora, is_main=is_main, pipeline=pipeline)
    if tensors is None:
        return None
    try:
        return forge_models.save_pretrained(
            plain,
            out_dir,
            dtype=dtype,
            overwrite=True,
            tensors=tensors,
            extra_files=None if tokenizer is None else tokenizer.files(),
        )
    except BaseException:
        for _ in tensors:
            pass
        raise
