"""``apply_ep``: shard a model's experts over the expert-parallel ranks and route tokens to them.

Each experts module matched by :attr:`EPConfig.experts` (see
:class:`~forge_parallel.expert_parallel.ExpertsModule`) keeps the experts its ``ep`` rank owns:
its stacked parameters become DTensors ``Shard(0)`` on ``mesh["ep"]`` (and split over
``mesh["etp"]`` by :attr:`EPConfig.etp_styles` when ``etp > 1``), so ``full_tensor()``,
gradient clipping and distributed checkpoints see the whole expert stack. Its class gains the
expert-parallel forward (:class:`~forge_parallel.expert_parallel.ExpertParallelExperts`).

Gradients: an expert's weight gradient is complete on its owner after the backward all-to-all
(it sums the contributions of every ep rank's tokens). Ranks holding the same experts (the
``edp`` axis) still have to sum theirs, and the sum over all data ranks must be divided by the
number of data ranks (``dp x cp``), as dense gradients are averaged. ``apply_fsdp(...,
experts=...)`` does both by sharding the experts over ``edp`` (torchtitan's layout).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from forge_parallel.expert_parallel.config import EPConfig
from forge_parallel.expert_parallel.experts import EPState, ExpertParallelExperts

__all__ = ["apply_ep", "expert_modules", "valid_ep_degrees", "validate_ep"]

_ETP_PLACEMENT = {
    "colwise": lambda: Shard(1),
    "colwise_packed": lambda: _StridedShard(1, split_factor=2),
    "rowwise": lambda: Shard(2),
}
_ETP_DIM = {"colwise": 1, "colwise_packed": 1, "rowwise": 2}


def valid_ep_degrees(num_experts: int) -> list[int]:
    """The expert-parallel degrees that divide ``num_experts`` evenly."""
    return [d for d in range(1, num_experts + 1) if num_experts % d == 0]


def _match(model: nn.Module, pattern: str, *, missing_ok: bool) -> list[tuple[str, nn.Module]]:
    from forge_parallel.tensor_parallel import match_modules

    found = match_modules(model, pattern)
    if not found and not missing_ok:
        names = [n for n, _ in model.named_modules() if n][:8]
        raise ValueError(
            f"experts pattern {pattern!r} matches no module of {type(model).__name__}; module "
            f"names look like {', '.join(names)} (patterns match segment by segment, '*' "
            "within one)"
        )
    return found


def _forward_problem(module: nn.Module) -> str | None:
    """Why ``module.forward`` cannot be the protocol's ``forward(x_sorted, tokens_per_expert)``
    (two required positional arguments), or ``None``."""
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):  # no signature to read: let the call decide
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return None
    required = [p.name for p in parameters if p.kind in positional and p.default is p.empty]
    if len(required) == 2:
        return None
    return f"its forward takes ({', '.join(required)}), not (x_sorted, tokens_per_expert)"


def _num_experts(name: str, module: nn.Module) -> int:
    params = list(module.named_parameters(recurse=False))
    children = [n for n, _ in module.named_children()]
    problems = [
        problem
        for problem in (
            None if params else "it has no parameters of its own",
            f"it has submodules ({', '.join(children)})" if children else None,
            _forward_problem(module),
        )
        if problem is not None
    ]
    if problems:
        raise ValueError(
            f"{name} ({type(module).__name__}) is not an experts module: {'; '.join(problems)}. "
            "Expert parallelism needs a module whose own parameters are stacked "
            "[num_experts, ...] along dim 0, without submodules, whose forward(x_sorted, "
            "tokens_per_expert) runs rows already grouped by expert (see "
            "forge_parallel.expert_parallel.ExpertsModule; forge-models' MoEExperts is one). "
            "transformers' expert modules (Qwen3MoeExperts, MixtralExperts, ...: routing inside "
            "forward(hidden_states, top_k_index, top_k_weights), an act_fn submodule) are not "
            "supported: run their MoE block under data parallelism or tensor parallelism with "
            "the 'replicate' style instead"
        )
    sizes = {n: p.shape[0] if p.dim() else 0 for n, p in params}
    if len(set(sizes.values())) != 1 or min(sizes.values()) < 1:
        raise ValueError(
            f"{name}: expert parameters must all be stacked along dim 0 over the same number "
            f"of experts, got dim-0 sizes {sizes}"
        )
    return next(iter(sizes.values()))


def validate_ep(
    model: nn.Module, config: EPConfig, ep: int, etp: int = 1
) -> list[tuple[str, nn.Module]]:
    """Check that ``config`` applies to ``model`` at degrees ``ep`` / ``etp`` (no process group).

    Returns the matched ``(name, experts module)`` pairs.
    """
    found = _match(model, config.experts, missing_ok=config.missing_ok)
    for name, module in found:
        if isinstance(module, ExpertParallelExperts):
            raise ValueError(f"{name} already has expert parallelism applied")
        experts = _num_experts(name, module)
        if experts % ep != 0:
            raise ValueError(
                f"ep={ep} does not divide the {experts} experts of {name}; each rank must own "
                f"the same number of experts: choose ep among {valid_ep_degrees(experts)}"
            )
        if etp == 1:
            continue
        for pname, param in module.named_parameters(recurse=False):
            style = config.etp_styles.get(pname)
            if style is None:
                raise ValueError(
                    f"etp={etp} needs a style for every expert parameter, but {name}.{pname} has "
                    f"none in etp_styles={dict(config.etp_styles)}"
                )
            dim = _ETP_DIM[style]
            parts = etp * (2 if style == "colwise_packed" else 1)
            if param.dim() <= dim or param.shape[dim] % parts != 0:
                raise ValueError(
                    f"{name}.{pname} with shape {tuple(param.shape)} cannot be split {style} over "
                    f"etp={etp}: dim {dim} must be divisible by {parts}"
                )
    return found


def apply_ep(model: nn.Module, mesh: DeviceMesh, config: EPConfig) -> dict[str, str]:
    """Shard the experts of ``model`` over ``mesh`` (1-D ``ep``, or 2-D ``(ep, etp)``).

    Every rank must hold the same full expert weights before the call (build the model from the
    same seed, or load the same checkpoint): each keeps its own slice. Returns module name ->
    description for the summary.
    """
    names = mesh.mesh_dim_names or ()
    if mesh.ndim not in (1, 2) or names[0] != "ep" or (mesh.ndim == 2 and names[1] != "etp"):
        raise ValueError(
            f"apply_ep needs mesh['ep'] or mesh['ep', 'etp'], got a mesh with axes {names}"
        )
    ep = mesh.size(0)
    etp = mesh.size(1) if mesh.ndim == 2 else 1
    found = validate_ep(model, config, ep, etp)
    ep_group = mesh.get_group(0)
    etp_group = mesh.get_group(1) if etp > 1 else None
    applied: dict[str, str] = {}
    for name, module in found:
        experts = _num_experts(name, module)
        for pname, param in list(module.named_parameters(recurse=False)):
            placements: Sequence = [Shard(0)]
            if etp > 1:
                placements = [Shard(0), _ETP_PLACEMENT[config.etp_styles[pname]]()]
            sharded = distribute_tensor(param.detach(), mesh, list(placements))
            module.register_parameter(
                pname, nn.Parameter(sharded, requires_grad=param.requires_grad)
            )
        module._forge_ep = EPState(
            ep_group=ep_group,
            etp_group=etp_group,
            num_experts=experts,
            num_chunks=config.num_chunks,
            etp_sequence_parallel=config.sequence_parallel,
        )
        cls = type(module)
        module.__class__ = type(f"ExpertParallel{cls.__name__}", (ExpertParallelExperts, cls), {})
        text = f"expert parallel (ep={ep}: {experts // ep} of {experts} experts"
        if etp > 1:
            text += f", etp={etp}" + (
                ", tokens gathered over etp)" if config.sequence_parallel else ")"
            )
        else:
            text += ")"
        applied[name] = text
    return applied


def expert_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs of ``model`` that :func:`apply_ep` made expert-parallel."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ExpertParallelExperts)]
