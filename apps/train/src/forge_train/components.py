"""Everything a run trains with, built in order: tokenizer and data, the model (meta device
when large), LoRA adapters, FP8 linears, parallelization (forge_parallel), materialization,
the data loader of this rank, AdamW and the learning-rate schedule.

A new model kind plugs in here: :func:`forge_train.modeling.build_model` /
:func:`~forge_train.modeling.model_config` build it, :func:`forge_train.data.build_data`
and :func:`~forge_train.data.model_inputs` feed it (the step passes the inputs' keyword
arguments to the model as they are).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from forge_train.config import ConfigError, RunConfig
from forge_train.context_parallel import context_parallel_config
from forge_train.data import (
    VLM_KINDS,
    DataBundle,
    build_data,
    build_loader,
    check_batch_split,
    load_run_tokenizer,
)
from forge_train.expert_parallel import expert_parallel_config
from forge_train.modeling import build_model, model_config
from forge_train.optim import LRSchedule, build_optimizer
from forge_train.throughput import VisualFlops, language_model_flops_options

__all__ = ["Components", "build_components", "check_tensor_parallel_heads", "check_vocab"]


@dataclass
class Components:
    tokenizer: Any
    model_config: Any  # forge_models.TransformerConfig (VLMConfig for model.kind=vlm)
    data: DataBundle
    model: torch.nn.Module
    parallel: Any  # forge_parallel.ParallelizeResult
    dp_group: Any
    dp_rank: int
    dp_size: int
    pad_id: int
    loader: Any  # forge_data.PackedLoader
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    n_params: int
    n_trainable: int
    flops_per_token: float
    lora_targets: list[str] = field(default_factory=list)
    fp8_layers: list[str] = field(default_factory=list)
    #: This rank's pipeline stage and schedule (``parallel.pp > 1``; ``model`` is the stage).
    pipeline: Any = None
    #: A VLM's vision encoder + projector FLOPs of a step's micro-batches, which MFU adds to
    #: ``flops_per_token`` x tokens (:class:`forge_train.throughput.VisualFlops`); ``None``: an LLM.
    visual_flops: Any = None


def _recompute(cfg: RunConfig):
    if cfg.parallel.recompute == "none":
        return None
    from forge_parallel import RecomputeConfig

    if cfg.parallel.recompute == "selective" and cfg.parallel.recompute_modules:
        # Megatron-Core's --recompute-modules: checkpoint these submodules of each block whole,
        # autograd decides what the rest of the block keeps.
        return RecomputeConfig(mode="selective", modules=tuple(cfg.parallel.recompute_modules))
    if cfg.parallel.recompute == "selective":
        # Keep the matmuls' and the attention's outputs, recompute the cheap ops between them
        # (norms, activations, residual adds), as torchtitan's per-op selective policy does.
        # It keeps the least of the per-op policies (a tiny decoder's blocks: 29.1 MiB here,
        # 47.0 MiB with forge-parallel's "attention" preset, 50.1 MiB without recompute).
        return RecomputeConfig(mode="selective", ops="pointwise")
    if cfg.parallel.recompute == "auto":
        # forge-parallel measures each block on its first forward and picks the least extra
        # compute whose kept activations fit the budget (forge_parallel.auto_recompute).
        return RecomputeConfig(
            mode="auto",
            memory_budget=round(cfg.parallel.recompute_budget_mib * 2**20),
            budget_scope=cfg.parallel.recompute_budget_scope,
        )
    return RecomputeConfig(mode=cfg.parallel.recompute)


def recompute_choices(model: torch.nn.Module) -> dict[str, int]:
    """What ``parallel.recompute=auto`` chose for ``model``'s blocks (forge-parallel records it
    as each block's ``_forge_recompute``, e.g. ``auto: modules attn,mlp (1.23 MiB)``), with the
    number of blocks of each choice; blocks not yet run forward with gradients read
    ``auto (<budget>)``."""
    from collections import Counter

    described = (getattr(m, "_forge_recompute", None) for m in model.modules())
    return dict(Counter(d for d in described if isinstance(d, str) and d.startswith("auto")))


def _part_recompute(model, cfg: RunConfig, parts: tuple[str, ...]) -> dict[str, Any]:
    """Each part's recompute (a vision-language model's ``vision`` and ``language_model``, as
    torchtitan checkpoints both the encoder's and the decoder's blocks): with
    ``parallel.recompute_modules`` a part gets the patterns that match a submodule of its blocks
    (none: no recompute), as Megatron-Core skips a ``--recompute-modules`` entry a layer does
    not have; a pattern that matches in no part is an error naming it."""
    recompute = _recompute(cfg)
    if recompute is None or not recompute.modules:
        return dict.fromkeys(parts, recompute)
    from dataclasses import replace

    from forge_parallel import find_blocks
    from forge_parallel.recompute import patterns_in_blocks

    blocks = {part: find_blocks(model.get_submodule(part)) for part in parts}
    mine = {part: patterns_in_blocks(blocks[part], recompute.modules) for part in parts}
    unmatched = [p for p in recompute.modules if not any(p in mine[part] for part in parts)]
    if unmatched:
        paths = {
            part: sorted({path for _, b in blocks[part] for path, _ in b.named_modules() if path})
            for part in parts
        }
        listing = "; ".join(f"{part}: {', '.join(paths[part])}" for part in parts)
        raise ConfigError(
            f"parallel.recompute_modules: {unmatched} match no submodule of any block of "
            f"{' or '.join(parts)}; patterns are relative to each block, whose submodules are "
            f"({listing})"
        )
    return {part: replace(recompute, modules=mine[part]) if mine[part] else None for part in parts}


def _recompute_vision_apart(model, cfg: RunConfig):
    """A vision-language model parallelized whole (no TP / CP / EP): ``parallelize`` finds the
    language model's blocks (the largest ``nn.ModuleList``); checkpoint the vision encoder's
    blocks here with the vision part's recompute and return the language model's."""
    from forge_parallel import apply_recompute, find_blocks

    if not all(name.startswith("language_model.") for name, _ in find_blocks(model)):
        return _recompute(cfg)  # parallelize checkpoints other blocks: as they are
    parts = _part_recompute(model, cfg, ("vision", "language_model"))
    if parts["vision"] is not None:
        vision_blocks = [(f"vision.{n}", b) for n, b in find_blocks(model.vision)]
        apply_recompute(vision_blocks, parts["vision"])
    return parts["language_model"]


def _compile(cfg: RunConfig):
    """forge_parallel's ``CompileConfig`` for ``train.compile`` (``None`` without it)."""
    if not cfg.train.compile:
        return None
    from forge_parallel import CompileConfig

    return CompileConfig(backend=cfg.train.compile_backend)


def _parallelize_vlm(
    model,
    cfg: RunConfig,
    degrees: dict[str, int],
    *,
    context_parallel=None,
    expert_parallel=None,
    plan=None,
):
    """A vision-language model with a layout per part (heterogeneous parallelism,
    ``forge_parallel.parallelize_submodules``): the language model tensor-parallel over
    ``parallel.tp`` (context-parallel over ``parallel.cp`` with ``context_parallel``, its MoE
    experts sharded over ``parallel.ep`` ranks with ``expert_parallel``) and data-parallel
    over the rest, the vision encoder and the projector without tensor or
    context parallelism, data-parallel over all ranks. The ranks of a tensor- or
    context-parallel group load the same batch (``batch_boundary=False``; under context
    parallelism each runs the encoder on all of its items, and keeps the features of its
    sequence shard), so the encoder's average over all ranks is the data-parallel average.
    With ``parallel.sequence_parallel`` see :func:`forge_train.vlm_model.vlm_text_plan`;
    ``plan``: the language model's (:func:`_vlm_text_plan`), under tensor parallelism."""
    from forge_parallel import SubmoduleParallel, parallelize_submodules

    recompute = _part_recompute(model, cfg, ("vision", "language_model"))
    compile = _compile(cfg) or False
    mode = cfg.parallel.data_parallel
    replicate = degrees["dp_replicate"]
    return parallelize_submodules(
        model,
        {
            "vision": SubmoduleParallel(
                dp_replicate=replicate,
                data_parallel=mode or "auto",
                recompute=recompute["vision"],
                compile=compile,
            ),
            "projector": SubmoduleParallel(dp_replicate=replicate, data_parallel=mode or "auto"),
            "language_model": SubmoduleParallel(
                tp=degrees["tp"],
                cp=degrees["cp"],
                context_parallel=context_parallel,
                ep=degrees["ep"],
                expert_parallel=expert_parallel,
                plan=plan if degrees["tp"] > 1 else None,
                dp_replicate=replicate,
                data_parallel=mode,
                recompute=recompute["language_model"],
                compile=compile,
                batch_boundary=False,
            ),
        },
    )


def check_vocab(cfg: RunConfig, tokenizer_vocab: int, model_vocab: int) -> None:
    """``ConfigError`` when the tokenizer has more ids than the model has embedding rows (the
    ids past them would fail the lookup mid-step, or a device-side assert on a GPU); the
    setting to blame is the pretrained folder when there is one."""
    if tokenizer_vocab <= model_vocab:
        return
    source = (
        f"data.tokenizer={cfg.data.tokenizer}"
        if cfg.data.tokenizer is not None
        else "the folder's own tokenizer"
        if cfg.model.hf_path is not None
        else "forge's default tokenizer"
    )
    if cfg.model.hf_path is not None:
        raise ConfigError(
            f"model.hf_path: the tokenizer ({source}) has {tokenizer_vocab} ids but the model "
            f"of {cfg.model.hf_path} has only {model_vocab} (config.json vocab_size): it was not "
            "trained with this tokenizer; set data.tokenizer to the model's own tokenizer folder"
        )
    raise ConfigError(
        f"model.vocab_size: the tokenizer ({source}) has {tokenizer_vocab} tokens but the model "
        f"only {model_vocab}; set data.tokenizer to the model's own tokenizer folder, or raise "
        "the model's vocab_size"
    )


def check_tensor_parallel_heads(text_config, tp: int) -> None:
    """``ConfigError`` unless ``tp`` divides the attention's query and key/value head counts.

    The tensor-parallel plan splits ``q_proj`` / ``k_proj`` / ``v_proj`` column-wise and the
    attention reads its local head counts from their output widths, so forge-parallel's shape
    check passes whenever ``tp`` divides ``heads x head_dim``, even when the split cuts a head
    in two; the run then fails at its first forward inside torch (``shape '[1, 512, -1, 32]' is
    invalid``). Key/value heads are not replicated when ``tp`` exceeds their count (vLLM does
    that for inference; forge's plan, like Megatron-Core's, needs ``tp`` to divide them)."""
    if tp <= 1:
        return
    heads, kv_heads = text_config.num_heads, text_config.num_kv_heads or text_config.num_heads
    common = math.gcd(heads, kv_heads)
    valid = ", ".join(str(d) for d in range(1, common + 1) if common % d == 0)
    if heads % tp:
        raise ConfigError(
            f"parallel.tp={tp} does not divide the model's num_heads={heads}: each "
            f"tensor-parallel rank computes whole attention heads; valid tp degrees for "
            f"num_heads={heads}, num_kv_heads={kv_heads}: {valid} (or change "
            "model.config.num_heads)"
        )
    if kv_heads % tp:
        kind = "exceeds" if kv_heads < tp else "does not divide"
        raise ConfigError(
            f"parallel.tp={tp} {kind} the model's num_kv_heads={kv_heads}: forge's "
            "tensor-parallel plan splits the key/value heads whole over the ranks and does not "
            f"replicate them; valid tp degrees for num_heads={heads}, num_kv_heads={kv_heads}: "
            f"{valid} (or change model.config.num_kv_heads)"
        )


def build_components(
    cfg: RunConfig, *, world_size: int, degrees: dict[str, int], device: torch.device
) -> Components:
    """Build the run's parts on this rank (collective under ``torchrun``)."""
    import forge_models
    from forge_core import ParallelDims
    from forge_parallel import parallelize

    if (cfg.model.kind == "vlm") != (cfg.data.kind in VLM_KINDS):
        raise ConfigError(
            f"data.kind: a vision-language model (model.kind=vlm) trains on image data "
            f"(data=skimage-captions or data=vlm-shards) and image data needs one; got "
            f"model.kind={cfg.model.kind}, data.kind={cfg.data.kind} (try recipe=vlm)"
        )
    # Checks that need only the config and the layout, before any tokenizer, data or weights.
    check_batch_split(cfg.data, degrees["dp_replicate"] * degrees["dp_shard"])
    tokenizer = load_run_tokenizer(cfg.data, cfg.model)
    if cfg.model.kind == "vlm":
        from forge_train.vlm_model import vlm_model_config

        config = vlm_model_config(cfg.model, tokenizer, frozen=cfg.train.freeze)
        if cfg.checkpoint.export_hf:  # fail now, not after training
            from forge_train.vlm_model import check_vlm_exportable

            check_vlm_exportable(config)
    else:
        config = model_config(cfg.model, tokenizer.vocab_size)
    text_config = getattr(config, "text", config)  # a VLM's language model
    check_vocab(cfg, tokenizer.vocab_size, text_config.vocab_size)
    check_tensor_parallel_heads(text_config, degrees["tp"])
    if cfg.train.fp8 is not None:  # before any data or weights are loaded
        from forge_train.fp8 import check_fp8_support

        check_fp8_support(cfg.train.fp8, device)
    data = build_data(cfg.data, tokenizer, model_config=config)
    model, on_meta = build_model(cfg.model, config, seed=cfg.train.seed)
    if cfg.lora is not None and cfg.model.kind == "llm" and cfg.model.hf_path and not on_meta:
        # The adapters of a loaded model are drawn from the seed, as _materialize draws them.
        torch.manual_seed(cfg.train.seed)
    vlm = cfg.model.kind == "vlm"
    lora_targets = _apply_lora(model, cfg, vlm=vlm)
    fp8_layers: list[str] = []
    if cfg.train.fp8 is not None:
        from forge_train.fp8 import convert_model_to_fp8

        # A VLM's language model only: see forge_train.fp8 (FP8 on vision-language models).
        fp8_layers = convert_model_to_fp8(
            model.language_model if vlm else model,
            cfg.train.fp8,
            policy_path=cfg.train.fp8_policy,
            prefix="language_model." if vlm else "",
        )
    if not on_meta:
        model.to(device)
    dims = None
    if world_size > 1:
        dims = ParallelDims(world_size=world_size, **degrees)
    plan = None
    vlm_plan = None  # a VLM language model's plan (components._parallelize_vlm, FP8 checks)
    fp8_on_sequence_shards: list[torch.nn.Module] = []  # FP8 linears run whole on SP shards
    if degrees["tp"] > 1 and not vlm:
        plan = _text_plan(model, config, cfg)
    elif degrees["tp"] > 1 and (degrees["pp"] == 1 or fp8_layers):
        # With pp > 1 the same plan splits the stages (forge_train.vlm_pipeline): built here
        # for FP8's checks only.
        vlm_plan = _vlm_text_plan(model, cfg)
    if fp8_layers and (plan is not None or vlm_plan is not None):
        from forge_train.fp8 import check_fp8_tensor_parallel

        fp8_on_sequence_shards = check_fp8_tensor_parallel(
            model if plan is not None else model.language_model,
            plan if plan is not None else vlm_plan,
            degrees["tp"],
            cfg.train.fp8,
        )
    if fp8_layers:
        from forge_train.fp8 import check_fp8_token_split

        check_fp8_token_split(
            cfg.train.fp8,
            tokens=cfg.data.seq_len * cfg.data.micro_batch_rows,
            chunks=degrees["cp"] * (2 if cfg.parallel.cp_load_balance else 1),
            cp=degrees["cp"],
            tp=degrees["tp"],
            on_sequence_shards=bool(fp8_on_sequence_shards),
        )
    stage_parallel = {
        "plan": plan,
        "data_parallel": cfg.parallel.data_parallel if dims is not None else None,
        "recompute": _recompute(cfg),
        "compile": _compile(cfg),
    }
    sequence_and_experts = {
        "context_parallel": context_parallel_config(cfg, config, degrees),
        "expert_parallel": expert_parallel_config(cfg, config, degrees),
    }
    pipeline = None
    if degrees["pp"] > 1:
        mesh = dims.build_mesh()
        for name, value in sequence_and_experts.items():  # each stage shards its own part
            if value is not None:
                stage_parallel[name] = value
        pipeline = _pipeline(model, config, cfg, mesh, stage_parallel)
        parallel, model = pipeline.stage_parallel, pipeline.stage
    elif vlm and (degrees["tp"] > 1 or degrees["cp"] > 1 or degrees["ep"] > 1):
        parallel = _parallelize_vlm(model, cfg, degrees, **sequence_and_experts, plan=vlm_plan)
        model, mesh = parallel.model, parallel.parts["language_model"].mesh
    else:
        if vlm and stage_parallel["recompute"] is not None:
            stage_parallel["recompute"] = _recompute_vision_apart(model, cfg)
        parallel = parallelize(model, dims, **stage_parallel, **sequence_and_experts)
        model, mesh = parallel.model, parallel.mesh
    if on_meta:
        _materialize(model, device, cfg, config, pipeline=pipeline)
    if fp8_layers and mesh is not None:  # tokens split over cp (and tp on SP shards)
        from forge_train.fp8 import set_fp8_token_groups

        set_fp8_token_groups(
            model, mesh, cp=degrees["cp"], on_sequence_shards=fp8_on_sequence_shards
        )
    dp_group = mesh.group("dp") if mesh is not None else None
    dp_rank = mesh.local_rank("dp") if mesh is not None else 0
    dp_size = mesh.size("dp") if mesh is not None else 1
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    from forge_train.vlm_stream import log_bad_data_here

    loader = build_loader(
        data.train,
        cfg.data,
        seed=cfg.train.seed,
        dp_rank=dp_rank,
        dp_size=dp_size,
        pad_id=pad_id,
        log_bad_data=log_bad_data_here(mesh),
    )
    if _keyed_lora_dropout(cfg):
        loader = _key_lora_dropout(model, loader, plan, cfg, mesh, pipeline=pipeline)
    # On pipeline stages ZeRO shards the stage's parameters; the pipeline reduces the tied ones
    # at the step, after summing their copies' gradients.
    build = pipeline.pipe.build_optimizer if pipeline is not None else parallel.build_optimizer
    optimizer = build_optimizer(
        model, cfg.optim, device_type=device.type, build=build, allow_empty=pipeline is not None
    )
    return Components(
        tokenizer=tokenizer,
        model_config=config,
        data=data,
        model=model,
        parallel=parallel,
        dp_group=dp_group,
        dp_rank=dp_rank,
        dp_size=dp_size,
        pad_id=pad_id,
        loader=loader,
        optimizer=optimizer,
        schedule=LRSchedule(optimizer, cfg.optim, cfg.train.steps),
        n_params=_count(model, pipeline),
        n_trainable=_count(model, pipeline, trainable=True),
        # A VLM's language model per token; its encoder and projector per batch (visual_flops).
        # Only what trains: LoRA adapters, frozen weights without their gradients.
        flops_per_token=forge_models.flops_per_token(
            text_config,
            cfg.data.seq_len,
            causal=True,
            **language_model_flops_options(cfg, text_config),
        ),
        lora_targets=lora_targets,
        fp8_layers=fp8_layers,
        pipeline=pipeline,
        visual_flops=VisualFlops(config) if vlm else None,
    )


def _text_plan(model, config, cfg: RunConfig):
    """The language model's tensor-parallel plan, with sequence parallelism as configured.

    A mixture-of-experts layer runs whole on every tensor-parallel rank (``replicate``: its
    router, experts and shared expert are not split; Megatron-Core instead shards experts over
    an expert-parallel group): without sequence parallelism on the full sequence, so its
    routing statistics (balance loss, expert-bias load) are the single process's; with it on
    each rank's sequence shard (weight gradients summed over the ranks, as Megatron-LM runs
    MoE layers under sequence parallelism), allowed only without those statistics. Dense
    layers keep the family's plan."""
    from forge_parallel import TPPlan
    from forge_parallel.tensor_parallel import match_modules

    sp = cfg.parallel.sequence_parallel
    styles = model.parallel_plan(sequence_parallel=sp)
    # The multi-token prediction modules: without sequence parallelism they run unsplit on the
    # whole sequence (each rank the same), their logits through the tensor-parallel head
    # (forge_train.step: output_mtp_logits); with it, split like a decoder layer (added below).
    styles = {k: v for k, v in styles.items() if not k.startswith("mtp.")}
    block_styles = {
        k.removeprefix("layers.*."): v for k, v in styles.items() if k.startswith("layers.*.")
    }
    moe = getattr(config, "moe", None)
    if moe is not None:
        # With sequence parallelism each rank runs the MoE layers on its sequence shard: the
        # balance losses' sums and the expert-bias load are summed over the tensor-parallel
        # ranks (forge_train.sharded_routing; on pipeline stages forge_train.pipeline_moe).
        styles = {
            k: v
            for k, v in styles.items()
            if k != "layers.*.mlp" and not k.startswith(("layers.*.mlp.", "mtp."))
        }
        for i, block in enumerate(model.layers):
            if block.is_moe and cfg.parallel.ep > 1:
                # Expert parallelism splits the experts over ep x etp (etp = tp: Megatron-Core's
                # expert tensor parallelism); router and shared expert stay plain, replicated,
                # and under sequence parallelism run on the rank's shard (gradients summed).
                if sp:
                    for part in ("router", "shared_expert", "shared_expert_gate"):
                        styles[f"layers.{i}.mlp.{part}"] = "replicate"
                continue
            styles.update(_feed_forward_styles(f"layers.{i}.mlp", is_moe=block.is_moe))
    if sp:
        styles.update(_mtp_sequence_parallel_styles(model, block_styles))
    # A family plan lists every variant's modules (MLA with and without a query latent).
    styles = {k: v for k, v in styles.items() if match_modules(model, k)}
    from forge_train.lora import lora_tp_plan

    # adapted layers split with their adapters
    return lora_tp_plan(model, TPPlan(styles=styles, sequence_parallel=sp))


def _vlm_text_plan(model, cfg: RunConfig):
    """The tensor-parallel plan of a VLM's language model
    (:func:`forge_train.vlm_model.vlm_text_plan`), its LoRA-adapted layers split with their
    adapters (:func:`forge_train.lora.lora_tp_plan`)."""
    from forge_train.lora import lora_tp_plan
    from forge_train.vlm_model import vlm_text_plan

    plan = vlm_text_plan(model.language_model, sequence_parallel=cfg.parallel.sequence_parallel)
    return lora_tp_plan(model.language_model, plan)


def _apply_lora(model, cfg: RunConfig, *, vlm: bool) -> list[str]:
    """LoRA adapters per ``cfg.lora`` (none without it): on a language model by
    :func:`forge_train.lora.apply_lora`, on a vision-language model by
    :func:`~forge_train.lora.apply_vlm_lora` (the parts without adapters trained per
    ``train.freeze``). Returns the adapted layers' names."""
    if cfg.lora is None:
        return []
    from forge_train.lora import apply_lora, apply_vlm_lora

    lora = {
        "targets": cfg.lora.targets,
        "rank": cfg.lora.rank,
        "alpha": cfg.lora.alpha,
        "dropout": cfg.lora.dropout,
    }
    if not vlm:
        return apply_lora(model, **lora)
    try:
        return apply_vlm_lora(model, **lora, frozen=cfg.train.freeze)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _mtp_sequence_parallel_styles(model, block_styles: dict[str, str]) -> dict[str, str]:
    """Under sequence parallelism the multi-token prediction modules (DeepSeek-V3 §2.2) get the
    rank's sequence shard of the last hidden states and of the shared embedding's output, as
    Megatron-Core runs them: their norms run on the shard, ``eh_proj`` is replicated (its
    gradient summed over tp), the block is split like a decoder layer (``block_styles``: the
    ``layers.*`` attention entries; a dense feed-forward split as a dense layer's, a MoE one
    run whole on the shard, ``replicate``), and the head gathers the sequence as for the main
    logits."""
    styles: dict[str, str] = {}
    for k, module in enumerate(getattr(model, "mtp", None) or ()):
        prefix = f"mtp.{k}"
        for norm in ("enorm", "hnorm", "norm"):
            styles[f"{prefix}.{norm}"] = "sequence_parallel"
        styles[f"{prefix}.eh_proj"] = "replicate"
        for name, style in block_styles.items():
            if name != "mlp" and not name.startswith("mlp."):
                styles[f"{prefix}.block.{name}"] = style
        styles.update(_feed_forward_styles(f"{prefix}.block.mlp", is_moe=module.block.is_moe))
    return styles


def _feed_forward_styles(path: str, *, is_moe: bool) -> dict[str, str]:
    """A decoder block's feed-forward at ``path`` under tensor parallelism: a MoE block whole
    on every rank (``replicate``), a dense one split (``gate_up_proj`` column-, ``down_proj``
    row-parallel, its input gathered once)."""
    if is_moe:
        return {path: "replicate"}
    return {
        path: "block_input",
        f"{path}.gate_up_proj": "colwise_packed",
        f"{path}.down_proj": "rowwise",
    }


def _count(model, pipeline, *, trainable: bool = False) -> int:
    """Parameters of the whole model (summed over the pipeline stages, a parameter several
    stages hold, such as a tied embedding, once)."""
    params = model.parameters() if pipeline is None else pipeline.norm_parameters()
    n = sum(p.numel() for p in params if p.requires_grad or not trainable)
    if pipeline is None:
        return n
    import torch.distributed as dist

    total = torch.tensor(n, dtype=torch.float64)
    dist.all_reduce(total, group=pipeline.group)
    return int(total.item())


def _pipeline(model, config, cfg: RunConfig, mesh, stage_parallel: dict):
    """This rank's pipeline stage of ``model`` (``parallel.pp > 1``)."""
    from forge_train.pipeline_model import build_pipeline, check_pipeline_model

    pp = mesh.size("pp")
    vlm = cfg.model.kind == "vlm"
    if vlm:  # the encoder runs ahead of the decoder's pipeline (forge_train.vlm_pipeline)
        from forge_train.vlm_pipeline import build_vlm_pipeline, check_vlm_pipeline

        check_vlm_pipeline(config, cfg.parallel)
    else:
        check_pipeline_model(
            model,
            config,
            pp=pp,
            virtual_stages=cfg.parallel.pp_virtual_stages,
            schedule=cfg.parallel.pp_schedule,
            tp=mesh.size("tp"),
        )
    dp = mesh.size("dp")
    microbatches = cfg.data.global_batch_rows // (dp * cfg.data.micro_batch_rows)
    if microbatches < pp:
        raise ConfigError(
            f"parallel.pp: each rank's {microbatches} micro-batch(es) per step (global_batch_rows "
            f"{cfg.data.global_batch_rows} / (data-parallel {dp} x micro_batch_rows "
            f"{cfg.data.micro_batch_rows})) cannot fill {pp} pipeline stages; use at least "
            f"{pp} micro-batches per rank (raise data.global_batch_rows or lower "
            "data.micro_batch_rows)"
        )
    plan = stage_parallel["plan"]
    # A VLM's loss takes whole logits; a language model's last stage keeps them vocab-sharded
    # for the vocabulary-parallel loss (forge_train.pipeline_model).
    if plan is not None and vlm:
        plan = {
            k: ("colwise_output_replicated" if v == "loss_parallel" else v) for k, v in plan.items()
        }
    vlm_extra = {}
    if vlm:
        parts = _part_recompute(model, cfg, ("vision", "language_model"))
        stage_parallel = {**stage_parallel, "recompute": parts["language_model"]}
        vlm_extra = {
            "sequence_parallel": cfg.parallel.sequence_parallel,
            "encoder_recompute": parts["vision"],
        }
    return (build_vlm_pipeline if vlm else build_pipeline)(
        model,
        config,
        mesh,
        microbatches=microbatches,
        schedule=cfg.parallel.pp_schedule,
        split=cfg.parallel.pp_split,
        stage_parallel={**stage_parallel, "plan": plan},
        virtual_stages=cfg.parallel.pp_virtual_stages,
        **vlm_extra,
    )


def _keyed_lora_dropout(cfg: RunConfig) -> bool:
    """Whether the LoRA dropout masks are keyed by the data (:mod:`forge_train.lora_dropout`):
    whenever there is LoRA dropout, a language model's and a vision-language model's (its
    loaders give every micro-batch its samples' identities, ``pieces`` and
    ``visual_pieces``), under any layout."""
    return cfg.lora is not None and cfg.lora.dropout > 0


def _key_lora_dropout(model, loader, plan, cfg: RunConfig, mesh, *, pipeline=None):
    """Key the LoRA layers' dropout masks by the data (row-parallel layers: this rank's
    features' part of the mask; context-parallel ranks: their shard's tokens' keys, cut as the
    step cuts the tokens; pipeline stages: the keys of the micro-batch each forward runs; a
    vision-language model's encoder and projector: their rows' pixel blocks, the decoupled
    encoder of a pipeline those of the micro-batch it encodes); returns the loader that queues
    the micro-batches' keys."""
    from forge_parallel.tensor_parallel import match_modules
    from forge_train.lora import LoRALinear
    from forge_train.lora_dropout import (
        DropoutKeys,
        KeyedDropoutLoader,
        attach_keyed_dropout,
        attach_visual_keys,
    )

    vlm = cfg.model.kind == "vlm"
    if vlm and mesh is not None and mesh.size("tp") > 1:
        # The language model's plan under the whole model's names (a pipeline's stages hold
        # plain containers there: its meta copy of the language model has the plan).
        from forge_train.vlm_model import vlm_text_plan

        language_model = pipeline.inputs_model if pipeline is not None else model.language_model
        plan = vlm_text_plan(
            language_model,
            sequence_parallel=cfg.parallel.sequence_parallel,
            prefix="language_model.",
        )
    row_parallel = {}
    if plan is not None:  # (a pipeline stage holds only some of the plan's modules)
        tp, rank = mesh.size("tp"), mesh.local_rank("tp")
        for pattern, style in plan.styles.items():
            if style in ("rowwise", "adapter:rowwise"):
                for _, layer in match_modules(model, pattern):
                    if isinstance(layer, LoRALinear):
                        row_parallel[layer] = rank * (layer.base.in_features // tp)
    shard = None
    if cfg.parallel.cp > 1:
        from functools import partial

        from forge_train.context_parallel import shard_tokens

        shard = partial(
            shard_tokens,
            cp_size=mesh.size("cp"),
            cp_rank=mesh.local_rank("cp"),
            load_balance=cfg.parallel.cp_load_balance,
        )
    keys = DropoutKeys(seed=cfg.train.seed)
    replay = cfg.parallel.recompute != "none"
    attach_keyed_dropout(
        model,
        keys,
        row_parallel=row_parallel,
        stages=pipeline.pipe.modules if pipeline is not None else None,
        replay=replay,
    )
    if vlm:
        encoder = getattr(pipeline, "encoder", None)  # every pipeline rank's (a replica too)
        attach_visual_keys([model] if encoder is None else [model, encoder], keys)
        if pipeline is not None:
            pipeline.dropout_keys, pipeline.dropout_replay = keys, replay
    return KeyedDropoutLoader(loader, keys, seq_len=cfg.data.seq_len, shard=shard)


def _materialize(model, device, cfg: RunConfig, config, *, pipeline=None) -> None:
    """Allocate and initialize a meta-device model after parallelization (each rank its own
    shards); LoRA adapters, which ``init_weights`` does not know, after it, in the order a
    model built on the device draws them. Every layout draws the single process's values
    (:mod:`forge_models.init`). With ``model.hf_path`` each rank then reads its own slices of
    the checkpoint. A pipeline stage is initialized through its whole model's ``init_weights``
    (the other stages' parameters stay on the meta device)."""
    import forge_models

    torch.manual_seed(cfg.train.seed)
    hf_path = cfg.model.hf_path if cfg.model.kind == "llm" else None
    if pipeline is not None:
        pipeline.materialize(device, init=hf_path is None)
    else:
        forge_models.materialize(model, device, init=hf_path is None)
    from forge_train.lora import LoRALinear

    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.reset_parameters()
    if hf_path is not None:  # last: the adapters' initialization above would overwrite it
        from forge_train.lora import lora_bases
        from forge_train.modeling import load_hf_into

        with lora_bases(model):  # the checkpoint's names: LoRA layers as their base linears
            load_hf_into(model, hf_path, config, pipeline=pipeline, overrides=cfg.model.config)
