"""Expert parallelism in forge-train: which modules are the experts, and what the run allows.

Each MoE layer's routed experts are sharded over ``parallel.ep`` ranks taken from
``dp_shard x cp`` (``forge_parallel.parallelize(..., expert_parallel=EPConfig(...))``, as in
Megatron-Core and torchtitan: expert parallelism adds no processes). The router, the token
permutation and the shared experts stay on every rank; tokens reach the experts holding them by
all-to-all (GShard, Lepikhin et al. 2020). FSDP then shards the experts over the remaining
expert-data-parallel ranks and everything else over ``dp_shard x cp``. Under pipeline
parallelism each stage shards the experts of the MoE layers it holds.
"""

from __future__ import annotations

from forge_train.config import ConfigError

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
        raise ConfigError(
            f"parallel.ep={ep}: expert parallelism does not shard a vision-language model's "
            "experts yet (its MoE language model trains with FSDP, TP, CP or PP); set "
            "parallel.ep=1"
        )
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
