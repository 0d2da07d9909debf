"""The typed run config: one keyword-only dataclass per Hydra group, composed into :class:`RunConfig`.

:func:`run_config_from_dict` turns the composed (plain-dict) Hydra config into these objects.
Every error names the key that is wrong and why, e.g. ``optim.lr: must be > 0, got -1``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "CheckpointSettings",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "LoraConfig",
    "MlflowConfig",
    "ModelSettings",
    "OptimConfig",
    "ParallelSettings",
    "ProfileConfig",
    "RunConfig",
    "TrainSettings",
    "WandbConfig",
    "run_config_from_dict",
]


class ConfigError(ValueError):
    """A config value is missing, unknown or invalid; the message starts with its key."""


def _fail(key: str, why: str, value: Any = dataclasses.MISSING) -> typing.NoReturn:
    got = "" if value is dataclasses.MISSING else f", got {value!r}"
    raise ConfigError(f"{key}: {why}{got}")


def _require(ok: bool, key: str, why: str, value: Any = dataclasses.MISSING) -> None:
    if not ok:
        _fail(key, why, value)


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    """Which model: a forge_models size ``name``, a full ``config`` (``name`` null), or the weights
    of a Hugging Face folder ``hf_path`` (continued pretraining / fine-tuning). ``config`` holds
    :class:`forge_models.TransformerConfig` fields (overrides when ``name`` is set); with
    ``kind: vlm`` it is a vision-language model's plain-data config
    (:func:`forge_models.vlm.vlm_config_from_dict`: ``vision``, ``projector``, ``text``, tokens).
    ``init_device``: ``meta`` builds without memory and materializes after parallelization;
    ``auto`` does so above 1B parameters."""

    kind: Literal["llm", "vlm"] = "llm"
    name: str | None = None
    hf_path: str | None = None
    vocab_size: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    init_device: Literal["auto", "meta", "device"] = "auto"

    def __post_init__(self) -> None:
        if self.kind == "vlm":
            _require(
                self.name is None and self.hf_path is None and bool(self.config),
                "model.config",
                "model.kind=vlm needs a VLM config dict (vision, projector, text, "
                "image_token_id) in model.config, with model.name and model.hf_path null",
            )
        if self.name is None and self.hf_path is None and not self.config:
            _fail("model", "give model.name (a forge_models size), model.config or model.hf_path")
        if self.name is not None and self.hf_path is not None:
            _fail("model.hf_path", "give either model.name or model.hf_path, not both")
        if self.vocab_size is not None:
            _require(self.vocab_size > 0, "model.vocab_size", "must be > 0", self.vocab_size)


@dataclass(frozen=True, kw_only=True)
class ParallelSettings:
    """Degrees of the parallel layout; ``-1`` takes the processes the others leave (one axis at
    most). ``data_parallel``: ``ddp``, ``fsdp``, ``hsdp``, ``zero1``, ``zero2`` or null (none).

    Pipeline parallelism (``pp > 1``) splits the layers into ``pp`` stages, one per pipeline
    rank (``pp_split``: ``layers`` equal layer counts, ``params`` balanced parameter counts), and
    runs each step's micro-batches through them with ``pp_schedule`` (``gpipe``, ``1f1b`` or
    ``zero_bubble``, i.e. ZB-H1); each rank's micro-batches are the pipeline's micro-batches.
    ``pp_virtual_stages > 1`` gives each rank that many stages (``pp x pp_virtual_stages`` in
    all) for ``interleaved_1f1b`` (Narayanan et al. 2021) or ``zbv`` (ZB-V, Qi et al. 2023).
    Each stage is data parallel over the other ranks with any ``data_parallel`` mode (ZeRO-1
    on stages is Megatron-LM's PP x distributed optimizer, HSDP torchtitan's).

    Context parallelism (``cp > 1``) splits every sequence over ``cp`` ranks, which then load
    the same micro-batches: ``cp_style`` ``ring`` (ring attention, Liu et al. 2023) or
    ``ulysses`` (all-to-all head exchange, Jacobs et al. 2023; ``cp`` must divide the head
    counts), ``cp_load_balance`` the zigzag layout (each rank two mirrored chunks, as
    Megatron-Core) or contiguous chunks. Parameters are sharded over ``dp_shard x cp``
    (``data_parallel`` fsdp or hsdp).

    Expert parallelism (``ep > 1``) shards each MoE layer's routed experts over ``ep`` ranks
    taken from ``dp_shard x cp`` (it adds no processes; Megatron-Core's and torchtitan's
    convention); tokens reach their experts by all-to-all, split into ``ep_chunks`` chunks to
    overlap it with the experts' compute.

    ``recompute``: ``full`` checkpoints each block, ``selective`` runs forge-parallel's
    ``pointwise`` policy in each block, or with ``recompute_modules`` (``fnmatch`` patterns of
    submodule paths relative to each block, e.g. ``[attn,mlp]``: Megatron-Core's
    ``--recompute-modules``) checkpoints those submodules whole and nothing else. ``auto``
    runs forge-parallel's automatic policy (``RecomputeConfig(mode="auto")``): each block is
    measured on its first forward and gets the option with the least extra compute (nothing, a
    per-op selective policy, whole direct children such as ``attn`` / ``mlp``, or the whole
    block) whose activations kept for backward fit ``recompute_budget_mib`` (MiB, required
    with ``auto``; ``0`` keeps as little as possible, i.e. full recompute).
    ``recompute_budget_scope``: ``block`` (the budget of each block) or ``total`` (shared by
    the blocks of the model, or of each pipeline stage, in forward order)."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    data_parallel: Literal["ddp", "fsdp", "hsdp", "zero1", "zero2"] | None = None
    sequence_parallel: bool = False
    recompute: Literal["none", "full", "selective", "auto"] = "none"
    recompute_modules: list[str] = field(default_factory=list)
    recompute_budget_mib: float | None = None
    recompute_budget_scope: Literal["block", "total"] = "block"
    pp_schedule: Literal["gpipe", "1f1b", "zero_bubble", "interleaved_1f1b", "zbv"] = "1f1b"
    pp_split: Literal["layers", "params"] = "layers"
    pp_virtual_stages: int = 1
    cp_style: Literal["ring", "ulysses"] = "ring"
    cp_load_balance: bool = True
    ep_chunks: int = 1

    def _degrees(self) -> dict[str, int]:
        return {
            "pp": self.pp,
            "dp_replicate": self.dp_replicate,
            "dp_shard": self.dp_shard,
            "cp": self.cp,
            "tp": self.tp,
        }

    def __post_init__(self) -> None:
        degrees = self._degrees()
        for name, value in degrees.items():
            _require(value == -1 or value >= 1, f"parallel.{name}", "must be >= 1 or -1", value)
        _require(
            sum(v == -1 for v in degrees.values()) <= 1,
            "parallel",
            "at most one of pp, dp_replicate, dp_shard, cp, tp may be -1 (inferred)",
        )
        for name in ("tp", "pp", "cp"):
            _require(
                degrees[name] != -1, f"parallel.{name}", "cannot be inferred (-1); give the degree"
            )
        _require(self.ep >= 1, "parallel.ep", "must be >= 1 (1: no expert parallelism)", self.ep)
        _require(
            isinstance(self.recompute_modules, list | tuple)
            and all(isinstance(m, str) and m for m in self.recompute_modules),
            "parallel.recompute_modules",
            "must be a list of submodule path patterns relative to each block, e.g. "
            "[attn,mlp] (forge models) or [self_attn,mlp] (transformers models)",
            self.recompute_modules,
        )
        self._check_auto_recompute()
        _require(
            not self.recompute_modules or self.recompute == "selective",
            "parallel.recompute_modules",
            "checkpoints the listed submodules of each block under parallel.recompute=selective; "
            f"set parallel.recompute=selective (it is {self.recompute}) or drop the list",
            self.recompute_modules,
        )
        _require(
            not (
                self.pp > 1
                and self.pp_schedule in ("zero_bubble", "zbv")
                and self.recompute == "selective"
                and not self.recompute_modules
            ),
            "parallel.recompute",
            f"selective without recompute_modules runs a per-op policy, which allows one "
            f"backward per block, but pp_schedule={self.pp_schedule} back-propagates through "
            "each block twice (input, then weight gradients); checkpoint whole submodules "
            "(parallel.recompute_modules=[attn,mlp]) or whole blocks (parallel.recompute=full), "
            "or use pp_schedule=1f1b / interleaved_1f1b",
            self.recompute,
        )
        _require(self.ep_chunks >= 1, "parallel.ep_chunks", "must be >= 1", self.ep_chunks)
        if self.cp > 1:
            _require(
                self.data_parallel in ("fsdp", "hsdp"),
                "parallel.data_parallel",
                "context parallelism (cp > 1) needs fsdp or hsdp: its ranks hold partial "
                "gradients of the same sequences, which those reduce over dp_shard x cp",
                self.data_parallel,
            )
        if self.ep > 1:
            _require(
                self.data_parallel in ("fsdp", "hsdp"),
                "parallel.data_parallel",
                "expert parallelism (ep > 1) needs fsdp or hsdp, which reduce the experts' "
                "gradients over their expert-data-parallel ranks",
                self.data_parallel,
            )
        virtual = self.pp_schedule in ("interleaved_1f1b", "zbv")
        _require(
            self.pp_virtual_stages >= 2 if virtual else self.pp_virtual_stages == 1,
            "parallel.pp_virtual_stages",
            f"schedule {self.pp_schedule} runs "
            + (
                "several stages per rank: set pp_virtual_stages >= 2"
                if virtual
                else "one stage per rank: set pp_virtual_stages=1 (or pp_schedule="
                "interleaved_1f1b / zbv)"
            ),
            self.pp_virtual_stages,
        )

    def _check_auto_recompute(self) -> None:
        """``recompute=auto`` and its budget settings, which nothing else takes."""
        budget, scope = self.recompute_budget_mib, self.recompute_budget_scope
        if self.recompute != "auto":
            _require(
                budget is None,
                "parallel.recompute_budget_mib",
                f"is the budget of parallel.recompute=auto (it is {self.recompute}); set "
                "parallel.recompute=auto or drop the budget (recompute_budget_mib=null)",
                budget,
            )
            _require(
                scope == "block",
                "parallel.recompute_budget_scope",
                f"applies to parallel.recompute=auto only (it is {self.recompute}); set "
                "parallel.recompute=auto or leave the scope at block",
                scope,
            )
            return
        _require(
            budget is not None,
            "parallel.recompute_budget_mib",
            "is required with parallel.recompute=auto: the MiB of activations each block "
            "(recompute_budget_scope=block) or all blocks (total) may keep for backward, e.g. "
            "parallel.recompute_budget_mib=64 (0: keep as little as possible)",
        )
        _require(
            math.isfinite(budget) and budget >= 0,
            "parallel.recompute_budget_mib",
            "must be a finite number of MiB >= 0 (0: keep as little as possible, i.e. full "
            "recompute)",
            budget,
        )
        _require(
            not self.recompute_modules,
            "parallel.recompute_modules",
            "parallel.recompute=auto picks the submodules to checkpoint itself (among each "
            "block's direct children); drop the list, or set parallel.recompute=selective to "
            "checkpoint exactly these",
            self.recompute_modules,
        )
        _require(
            not (self.pp > 1 and self.pp_schedule in ("zero_bubble", "zbv")),
            "parallel.recompute",
            f"auto may choose a per-op policy, which allows one backward per block, but "
            f"pp_schedule={self.pp_schedule} back-propagates through each block twice (input, "
            "then weight gradients); checkpoint whole submodules (parallel.recompute=selective "
            "parallel.recompute_modules=[attn,mlp]) or whole blocks (parallel.recompute=full), "
            "or use pp_schedule=1f1b / interleaved_1f1b",
            self.recompute,
        )
        _require(
            not (scope == "total" and self.pp > 1 and self.pp_virtual_stages > 1),
            "parallel.recompute_budget_scope",
            f"total is shared by the blocks of each pipeline stage, but with pp_virtual_stages="
            f"{self.pp_virtual_stages} a rank holds several stages, each of which would get "
            "the whole budget; use recompute_budget_scope=block",
            scope,
        )

    def resolve(self, world_size: int) -> dict[str, int]:
        """The degrees for ``world_size`` processes; ``ConfigError`` if they do not fit."""
        degrees = self._degrees()
        fixed = 1
        for value in degrees.values():
            fixed *= value if value > 0 else 1
        for name, value in degrees.items():
            if value == -1:
                _require(
                    world_size % fixed == 0,
                    f"parallel.{name}",
                    f"cannot be inferred: the world size {world_size} is not a multiple of the "
                    f"other degrees' product {fixed}; launch a multiple of {fixed} processes",
                )
                degrees[name] = world_size // fixed
        product = 1
        for value in degrees.values():
            product *= value
        _require(
            product == world_size,
            "parallel",
            " x ".join(degrees)
            + " = "
            + " x ".join(str(v) for v in degrees.values())
            + f" = {product} processes, but the world size is {world_size}; launch that many "
            "processes (torchrun --nproc-per-node) or pick another preset",
        )
        shard_cp = degrees["dp_shard"] * degrees["cp"]
        _require(
            shard_cp % self.ep == 0,
            "parallel.ep",
            f"the expert-parallel ranks are taken from dp_shard x cp = {shard_cp}, which "
            f"{self.ep} does not divide; choose ep among "
            f"{[d for d in range(1, shard_cp + 1) if shard_cp % d == 0]}",
            self.ep,
        )
        return {**degrees, "ep": self.ep}


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Training data. ``kind``: ``stdlib`` (the Python standard library's source), ``jsonl``
    (raw text jsonl), ``preprocessed`` (``forge-preprocess`` output folders), ``chat``
    (SFT conversations, assistant-only loss), ``skimage_captions`` (captioned scikit-image
    sample images for a ``model.kind=vlm`` model; up to ``max_tiles`` tiles per image) or
    ``vlm_shards`` (the user's webdataset ``.tar`` shards for a ``model.kind=vlm`` model:
    ``paths`` / ``val_paths`` are shard files, globs, brace patterns or folders of ``.tar``
    files; each sample a ``key.json`` conversation ``{"messages": [...]}`` with ``<image>``
    markers, or a caption ``key.txt`` / ``{"text": ...}``, beside its images ``key.jpg`` /
    ``key.0.png`` ... or video, or none: a text-only sample). ``vlm_shards`` streams: each
    data-parallel rank reads its own shards (at least one each), packs ``pack_buffer`` samples
    at a time into rows (memory bound and shuffle window), and its sample order depends on the
    data-parallel size; a bad shard or sample is counted and skipped (``on_bad_data=skip``, the
    counts in the run log) or stops the run (``raise``); :mod:`forge_train.vlm_stream`. Each
    optimizer step takes ``global_batch_rows`` packed rows of ``seq_len`` tokens, as
    micro-batches of ``micro_batch_rows`` rows per rank. ``prefetch_buffers`` (``vlm_shards``):
    packing buffers a background thread decodes ahead of the step (0: decoded in the step when
    a buffer runs out); ``decode_workers`` (``vlm_shards``): processes that decode the samples
    (images, processor, tokenizing) for each rank (0: the rank's own process); the batches are
    the same either way."""

    kind: Literal["stdlib", "jsonl", "preprocessed", "chat", "skimage_captions", "vlm_shards"] = (
        "stdlib"
    )
    paths: list[str] = field(default_factory=list)
    val_paths: list[str] = field(default_factory=list)
    tokenizer: str | None = None
    text_key: str = "text"
    messages_key: str = "messages"
    chat_template: str | None = "chatml"
    stdlib_files: int = 360
    stdlib_val_files: int = 40
    seq_len: int = 128
    global_batch_rows: int = 8
    micro_batch_rows: int = 4
    cache_dir: str | None = None
    max_tiles: int = 2
    pack_buffer: int = 128
    on_bad_data: Literal["skip", "raise"] = "skip"
    prefetch_buffers: int = 1
    decode_workers: int = 0

    def __post_init__(self) -> None:
        names = ("seq_len", "global_batch_rows", "micro_batch_rows", "stdlib_files", "pack_buffer")
        for name in names:
            _require(getattr(self, name) >= 1, f"data.{name}", "must be >= 1", getattr(self, name))
        _require(self.stdlib_val_files >= 0, "data.stdlib_val_files", "must be >= 0")
        _require(
            self.prefetch_buffers >= 0,
            "data.prefetch_buffers",
            "must be >= 0 (0: decode in the training step)",
            self.prefetch_buffers,
        )
        _require(
            self.decode_workers >= 0,
            "data.decode_workers",
            "must be >= 0 (0: decode in the training process; N: N worker processes per rank)",
            self.decode_workers,
        )
        _require(
            self.global_batch_rows % self.micro_batch_rows == 0,
            "data.global_batch_rows",
            f"must be a multiple of data.micro_batch_rows={self.micro_batch_rows}",
            self.global_batch_rows,
        )
        _require(self.max_tiles >= 1, "data.max_tiles", "must be >= 1", self.max_tiles)
        if self.kind == "vlm_shards":
            _require(
                bool(self.paths),
                "data.paths",
                "data.kind=vlm_shards needs the webdataset shards to train on: "
                "data.paths=[/data/train/*.tar] (.tar files, globs, brace patterns or folders)",
            )
        elif self.kind not in ("stdlib", "skimage_captions"):
            _require(bool(self.paths), "data.paths", f"data.kind={self.kind} needs input paths")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with weight-decay groups (no decay on norms, biases and embeddings), gradient
    clipping (``grad_clip`` 0: off) and a learning-rate schedule after ``warmup_steps`` of linear
    warmup: ``cosine`` or ``linear`` decay to ``min_lr_ratio * lr`` (reached at step
    ``train.steps``, one past the last step run, as Hugging Face's schedules), ``wsd``
    (constant, then linear decay over the last ``decay_fraction`` of the steps, its last step
    at exactly ``min_lr_ratio * lr``) or ``constant``; exact values in :mod:`forge_train.optim`."""

    name: Literal["adamw"] = "adamw"
    lr: float = 3e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    schedule: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    fused: Literal["auto", "on", "off"] = "auto"

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optim.lr", "must be > 0", self.lr)
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optim.betas",
            "must be two numbers in [0, 1)",
            self.betas,
        )
        _require(self.eps > 0, "optim.eps", "must be > 0", self.eps)
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0", self.weight_decay)
        _require(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0: off)", self.grad_clip)
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0", self.warmup_steps)
        _require(
            0 <= self.min_lr_ratio <= 1,
            "optim.min_lr_ratio",
            "must be in [0, 1]",
            self.min_lr_ratio,
        )
        _require(
            0 < self.decay_fraction <= 1,
            "optim.decay_fraction",
            "must be in (0, 1]",
            self.decay_fraction,
        )


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """The loop: ``steps`` optimizer steps in ``precision`` (autocast; ``fp16`` with loss
    scaling), non-finite loss / gradient norm handled by ``nan_policy``. ``fp8``: run the
    model's eligible linear layers with FP8 GEMMs (forge_kernels: ``per_tensor`` current scaling
    or DeepSeek-V3 ``blockwise`` 1x128/128x128 scaling), optionally only for the GEMM shapes
    where the calibrated ``fp8_policy`` table (an ``Fp8Policy`` JSON) says FP8 pays off.
    ``freeze``: parts of a ``model.kind=vlm`` model left out of training (``vision``,
    ``projector``, ``language_model``; ``VLMConfig.frozen``). ``compile``: ``torch.compile``
    each block (regional; ``forge_parallel.apply_compile``) with ``compile_backend`` (a
    ``torch._dynamo.list_backends()`` name: ``inductor``, or ``aot_eager`` to trace the same
    graphs without code generation). ``output_dir``: the run folder (null: a new
    ``runs/<date>-<time>``); a run that would start fresh in a folder holding a previous run's
    checkpoints, export or metrics is refused unless ``overwrite_output_dir`` deletes those
    first (:mod:`forge_train.rundir`)."""

    steps: int = 150
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    compile_backend: str = "inductor"
    output_dir: str | None = None
    overwrite_output_dir: bool = False
    eval_every: int = 0
    eval_batches: int = 4
    nan_policy: Literal["skip", "stop"] = "skip"
    max_nan_skips: int = 10
    benchmark: bool = False
    benchmark_warmup: int = 3
    max_minutes: float | None = None
    fp8: Literal["per_tensor", "blockwise"] | None = None
    fp8_policy: str | None = None
    freeze: list[Literal["vision", "projector", "language_model"]] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require(self.steps >= 1, "train.steps", "must be >= 1", self.steps)
        if self.compile:
            import torch._dynamo

            backends = torch._dynamo.list_backends(exclude_tags=())
            _require(
                self.compile_backend in backends,
                "train.compile_backend",
                f"is not a torch.compile backend; choose one of {', '.join(backends)} (inductor "
                "generates kernels, aot_eager traces the same graphs without)",
                self.compile_backend,
            )
        if self.fp8_policy is not None:
            _require(self.fp8 is not None, "train.fp8_policy", "needs train.fp8 to be set")
        for name in ("eval_every", "eval_batches", "max_nan_skips", "benchmark_warmup"):
            _require(getattr(self, name) >= 0, f"train.{name}", "must be >= 0", getattr(self, name))
        # The data order is drawn with numpy's SeedSequence, which takes non-negative seeds only.
        _require(self.seed >= 0, "train.seed", "must be >= 0 (a non-negative integer)", self.seed)
        _require(
            not (self.eval_every > 0 and self.eval_batches == 0),
            "train.eval_every",
            f"evaluates every {self.eval_every} steps but train.eval_batches=0 gives it no "
            "batches to evaluate; set train.eval_batches >= 1, or train.eval_every=0 (no "
            "evaluation during the run)",
            self.eval_every,
        )
        if self.benchmark:
            _require(
                self.steps > self.benchmark_warmup,
                "train.steps",
                f"must exceed train.benchmark_warmup={self.benchmark_warmup} in benchmark mode",
                self.steps,
            )
        if self.max_minutes is not None:
            _require(self.max_minutes > 0, "train.max_minutes", "must be > 0", self.max_minutes)


@dataclass(frozen=True, kw_only=True)
class CheckpointSettings:
    """Training checkpoints (forge_ckpt's ``CheckpointManager``) under ``<output_dir>/checkpoints``
    and the Hugging Face export to ``<output_dir>/hf``."""

    interval: int = 100
    keep_last_n: int | None = 2
    async_save: bool = False
    resume: bool = True
    save_final: bool = True
    export_hf: bool = True
    export_dtype: Literal["float32", "bfloat16", "float16"] | None = None

    def __post_init__(self) -> None:
        _require(self.interval >= 0, "checkpoint.interval", "must be >= 0", self.interval)
        if self.keep_last_n is not None:
            _require(self.keep_last_n >= 1, "checkpoint.keep_last_n", "must be >= 1 or null")


@dataclass(frozen=True, kw_only=True)
class WandbConfig:
    """Weights & Biases: with ``enabled``, metrics go to the run ``name`` of ``project``
    (``entity``: the team); null values leave them to wandb (its ``WANDB_*`` variables)."""

    enabled: bool = False
    project: str | None = None
    entity: str | None = None
    name: str | None = None


@dataclass(frozen=True, kw_only=True)
class MlflowConfig:
    """MLflow: with ``enabled``, metrics go to the run ``run_name`` of ``experiment`` on the
    tracking server ``tracking_uri``; null values leave them to MLflow (``MLFLOW_*`` variables,
    else ``./mlruns``)."""

    enabled: bool = False
    tracking_uri: str | None = None
    experiment: str | None = None
    run_name: str | None = None


@dataclass(frozen=True, kw_only=True)
class ProfileConfig:
    """A ``torch.profiler`` window over the steps ``start_step`` .. ``start_step + num_steps - 1``
    (numbered as in ``metrics.jsonl``, from 1; null: off), written as a Chrome trace (``.json``,
    one per rank) to ``output_dir`` (null: ``<run folder>/profile``)."""

    start_step: int | None = None
    num_steps: int = 3
    output_dir: str | None = None
    record_shapes: bool = False
    profile_memory: bool = False
    with_stack: bool = False

    def __post_init__(self) -> None:
        if self.start_step is not None:
            _require(
                self.start_step >= 1, "logging.profile.start_step", "must be >= 1", self.start_step
            )
        _require(self.num_steps >= 1, "logging.profile.num_steps", "must be >= 1", self.num_steps)


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    """Console (``rich`` live line on a terminal, plain lines otherwise), ``metrics.jsonl``,
    TensorBoard, and the optional W&B / MLflow trackers; a profiler window. ``peak_tflops`` (per
    device) enables MFU where the device is not known."""

    log_every: int = 10
    progress: Literal["auto", "rich", "plain"] = "auto"
    jsonl: bool = True
    tensorboard: Literal["auto", "true", "false"] = "auto"
    peak_tflops: float | None = None
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def __post_init__(self) -> None:
        _require(self.log_every >= 1, "logging.log_every", "must be >= 1", self.log_every)
        if self.peak_tflops is not None:
            _require(self.peak_tflops > 0, "logging.peak_tflops", "must be > 0", self.peak_tflops)


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """LoRA adapters on the linear layers whose names match ``targets`` (fnmatch patterns)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["*.q_proj", "*.v_proj"])

    def __post_init__(self) -> None:
        _require(self.rank >= 1, "lora.rank", "must be >= 1", self.rank)
        _require(self.alpha > 0, "lora.alpha", "must be > 0", self.alpha)
        _require(0 <= self.dropout < 1, "lora.dropout", "must be in [0, 1)", self.dropout)
        _require(bool(self.targets), "lora.targets", "needs at least one module-name pattern")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything one ``forge-train`` run needs."""

    model: ModelSettings
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    lora: LoraConfig | None = None

    def __post_init__(self) -> None:
        vlm = self.model.kind == "vlm"
        if self.train.freeze:
            _require(vlm, "train.freeze", "needs a vision-language model (model.kind=vlm)")
        _require(
            not (
                vlm
                and self.parallel.recompute == "auto"
                and self.parallel.recompute_budget_scope == "total"
            ),
            "parallel.recompute_budget_scope",
            "total is ambiguous for a vision-language model, whose vision encoder and language "
            "model are checkpointed apart (each would get the whole budget); use "
            "recompute_budget_scope=block (the budget of each block of either part)",
            self.parallel.recompute_budget_scope,
        )
        profile = self.logging.profile
        if profile.start_step is not None:
            last = profile.start_step + profile.num_steps - 1
            _require(
                last <= self.train.steps,
                "logging.profile",
                f"the window (steps {profile.start_step}..{last}) ends after "
                f"train.steps={self.train.steps}; lower logging.profile.start_step or num_steps",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- dict -> dataclass, with the key named in every error ----------------------------------------
def _check_type(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (*options,) = (a for a in args if a is not type(None))
        if len(options) == 1:  # X | None: X's own error says what is allowed
            return _check_type(key, value, options[0])
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_type(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        _fail(key, f"expected {_type_name(hint)}", value)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if isinstance(value, bool) and True not in allowed:  # yaml reads true/false as bools
            value = str(value).lower()
        _require(value in allowed, key, f"must be one of {', '.join(map(str, allowed))}", value)
        return value
    if origin is list:
        _require(isinstance(value, list | tuple), key, "expected a list", value)
        (item,) = typing.get_args(hint)
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        _require(isinstance(value, Mapping), key, "expected a mapping", value)
        return dict(value)
    if hint is bool:
        _require(isinstance(value, bool), key, "expected true or false", value)
        return value
    if hint is int:
        _require(
            isinstance(value, int) and not isinstance(value, bool), key, "expected an int", value
        )
        return value
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        _require(ok, key, "expected a number", value)
        return float(value)
    if hint is str:
        _require(isinstance(value, str), key, "expected a string", value)
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    raise AssertionError(f"unhandled config type {hint!r} at {key}")


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("NoneType", "null")


def _build(cls: type, data: Any, prefix: str) -> Any:
    _require(isinstance(data, Mapping), prefix, "expected a mapping of keys", data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        # The nearest valid key (forge_train.compose's aliases and difflib), else all of them:
        # what a misspelled ``+key=value`` override or a hand-written YAML key reaches.
        from forge_train.compose import _did_you_mean

        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        hint = _did_you_mean(where, unknown[0], prefix, list(fields), list_all=True)
        _fail(where, "unknown key; " + hint.removeprefix(f"unknown key {where}; "))
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        _require(value != "???", key, "is required: set it on the command line (key=value)")
        kwargs[name] = _check_type(key, value, hints[name])
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        _fail(f"{prefix}.{missing[0]}" if prefix else missing[0], "is required")
    return cls(**kwargs)


def run_config_from_dict(data: Mapping[str, Any]) -> RunConfig:
    """Validate a plain-dict config (Hydra's composed config, resolved) into a :class:`RunConfig`."""
    return _build(RunConfig, data, "")
