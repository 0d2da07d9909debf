"""Expert parallelism in forge-train: which modules are the experts, and what the run allows.

Each MoE layer's routed experts are sharded over ``parallel.ep`` ranks taken from
``dp_shard x cp`` (``forge_parallel.parallelize(..., expert_parallel=EPConfig(...))``, as in
Megatron-Core and torchtitan: expert parallelism adds no processes). The router, the token
permutation and the shared experts stay on every rank; tokens reach the experts holding them by
all-to-all (GShard, Lepikhin et al. 2020). FSDP then shards the experts over the remaining
expert-data-parallel ranks and everything else over ``dp_shard x cp``. Under pipeline
parallelism each stage shards the experts of the MoE layers it holds.

A vision-language model's experts are its language model's (a Qwen3-VL-MoE style model): the
language model is the part of ``forge_parallel.parallelize_submodules`` given
``expert_parallel`` (the pattern relative to it), the vision encoder and projector stay
data-parallel over all ranks (``forge_train.components._parallelize_vlm``). Expert
parallelism splits no tokens, so the balance statistics need nothing beyond what data
parallelism (and context parallelism, ``forge_train.sharded_routing``) does with them.
"""

from __future__ import annotations

from forge_train.config import ConfigError
from forge_train.vlm_model import language_model_config

__all__ = ["EXPERTS_PATTERN", "expert_parallel_config"]

#: The routed experts of a forge_models MoE block (``MoEExperts``: stacked ``[E, ...]`` weights).
EXPERTS_PATTERN = "layers.*.mlp.experts"


def expert_parallel_config(cfg, model_config, degrees: dict[str, int]):
    """forge_parallel's ``EPConfig`` for ``parallel.ep > 1`` (``None`` at ``ep == 1``), after
    checking the model and layout; ``ConfigError`` naming the setting if they do not fit."""
    ep = degrees["ep"]
    if ep == 1:
        return None
    if cfg.model.kind == "vlm":
        _check_vlm_layout(ep, degrees)
        model_config = language_model_config(model_config)
    moe = getattr(model_config, "moe", None)
    if moe is None:
        raise ConfigError(
            f"parallel.ep={ep}: model {cfg.model.name or cfg.model.hf_path!r} has no "
            "mixture-of-experts layers to shard; set parallel.ep=1 or pick a MoE model "
            "(e.g. model=tiny-moe)"
        )
    if moe.num_experts % ep:
        valid = [d for d in range(1, moe.num_experts + 1) if moe.num_experts % d == 0]
        raise ConfigError(
            f"parallel.ep={ep} does not divide the model's {moe.num_experts} experts (every "
            f"rank must hold as many); choose ep among {valid}"
        )
    from forge_parallel.expert_parallel import EPConfig

    # Under sequence parallelism each tensor-parallel rank routes its own sequence shard: the
    # experts (split over ep x etp, etp = tp) gather the dispatched rows over etp.
    return EPConfig(
        experts=EXPERTS_PATTERN,
        num_chunks=cfg.parallel.ep_chunks,
        sequence_parallel=degrees["tp"] > 1 and cfg.parallel.sequence_parallel,
    )


def _check_vlm_layout(ep: int, degrees: dict[str, int]) -> None:
    """A VLM's experts are sharded with its language model data- or context-parallel; the
    pipeline (the encoder ahead of the decoder's stages, ``forge_train.vlm_pipeline``) and
    tensor parallelism (its MoE blocks styled whole, ``forge_train.vlm_model.vlm_text_plan``)
    do not shard them yet."""
    for name, what in (("pp", "pipeline"), ("tp", "tensor")):
        if degrees[name] > 1:
            raise ConfigError(
                f"parallel.ep={ep} with parallel.{name}={degrees[name]}: expert parallelism "
                f"does not shard a vision-language model's experts under {what} parallelism "
                f"yet; set parallel.{name}=1 (EP with FSDP or CP) or parallel.ep=1"
            )
