"""Expert parallelism for mixture-of-experts layers (dropless, variable all-to-all).

- :mod:`.config`: :class:`EPConfig` (which modules, overlap chunks, expert-tensor styles).
- :mod:`.dispatch`: token dispatch / combine between the ranks of an ``ep`` group.
- :mod:`.overlap`: the chunked, software-pipelined dispatch -> experts -> combine.
- :mod:`.experts`: the :class:`ExpertsModule` protocol and the expert-parallel forward.
- :mod:`.apply`: :func:`apply_ep` (shard the experts, swap in the forward) and its validation.

References: GShard (Lepikhin et al. 2020, arXiv:2006.16668), Megatron-Core's all-to-all token
dispatcher and its expert-tensor / expert-data parallel groups.
"""

from forge_parallel.expert_parallel.apply import (
    apply_ep,
    expert_modules,
    valid_ep_degrees,
    validate_ep,
)
from forge_parallel.expert_parallel.config import ETP_STYLES, EPConfig
from forge_parallel.expert_parallel.dispatch import (
    DispatchPlan,
    combine,
    dispatch,
    exchange_counts,
    plan_dispatch,
    plan_from_counts,
)
from forge_parallel.expert_parallel.experts import ExpertParallelExperts, ExpertsModule
from forge_parallel.expert_parallel.overlap import chunked_expert_forward

__all__ = [
    "ETP_STYLES",
    "DispatchPlan",
    "EPConfig",
    "ExpertParallelExperts",
    "ExpertsModule",
    "apply_ep",
    "chunked_expert_forward",
    "combine",
    "dispatch",
    "exchange_counts",
    "expert_modules",
    "plan_dispatch",
    "plan_from_counts",
    "valid_ep_degrees",
    "validate_ep",
]
