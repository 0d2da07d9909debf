"""How Megatron-Core splits routed experts across expert-parallel ranks, as name arithmetic.

With expert parallelism (Lepikhin et al. 2020, GShard, arXiv:2006.16668; Megatron-Core's
``--expert-model-parallel-size``) the ``num_experts`` routed experts of every MoE layer are
split into ``ep`` equal, contiguous groups: expert rank ``e`` holds global experts
``e * E/ep ... (e + 1) * E/ep - 1`` and numbers them locally from 0 in its state dict
(``mlp.experts.local_experts.{j}.*`` for ``SequentialMLP``, ``mlp.experts.linear_fc1.weight{j}``
for ``TEGroupedMLP``). Everything else (attention, router, shared experts, norms, embeddings) is
replicated across expert ranks. Expert tensors are split across tensor-parallel ranks as the
dense MLP is (expert tensor parallelism equal to tensor parallelism, Megatron's default).
"""

from __future__ import annotations

import re

__all__ = ["expert_index", "experts_per_rank", "with_expert_index"]

_EXPERT = re.compile(
    r"^((?:decoder\.layers\.\d+|mtp\.layers\.\d+\.transformer_layer)\.mlp\.experts\.)(?:local_experts\.(\d+)\.(.*)|(linear_fc[12]\.(?:weight|bias))(\d+))$"
)


def expert_index(name: str) -> int | None:
    """The expert number in a routed expert's tensor name (``None`` for other tensors)."""
    match = _EXPERT.match(name)
    if match is None:
        return None
    return int(match.group(2) if match.group(2) is not None else match.group(5))


def with_expert_index(name: str, index: int) -> str:
    """``name`` (a routed expert's tensor) with its expert number replaced by ``index``."""
    match = _EXPERT.match(name)
    if match is None:
        raise ValueError(f"{name} is not a routed expert's tensor")
    head, _, rest, grouped, _ = match.groups()
    if grouped is not None:
        return f"{head}{grouped}{index}"
    return f"{head}local_experts.{index}.{rest}"


def experts_per_rank(num_experts: int, ep: int) -> int:
    """Experts each of ``ep`` expert-parallel ranks holds (they must split evenly)."""
    if ep < 1:
        raise ValueError(f"expert_parallel must be >= 1, got {ep}")
    if ep > 1 and num_experts < 1:
        raise ValueError(
            f"expert_parallel={ep} needs a mixture-of-experts model; this one has no routed "
            "experts (use expert_parallel=1)"
        )
    if ep > 1 and num_experts % ep:
        raise ValueError(
            f"{num_experts} experts do not split evenly into {ep} expert-parallel ranks; pick "
            "an expert_parallel that divides the number of experts"
        )
    return num_experts // ep if ep > 1 else max(num_experts, 0)
