"""Expert parallelism is exact: dispatch/combine, and 5-step training of a tiny MoE decoder.

The dispatch test checks outputs and gradients (inputs and expert weights) of
``combine(experts(dispatch(x)))`` at ep=2 against running all experts in one process, with
skewed routing so that one rank receives no token for one of its experts and another expert
gets no token at all; blocking and chunked (overlapped) exchanges, through the raw functions
and through ``apply_ep``. The training test is the acceptance test of ``tests/test_exactness.py``
for EP2, EP2 with chunked overlap, EP2 x FSDP2 (experts sharded over edp), HSDP with EP and EP2
with TP2 (attention over tp, experts over ep and etp), also with sequence parallelism (each tp
rank routes its own sequence shard; the dispatched rows are gathered over etp), and EP2 under
full, per-op (``pointwise``) and automatic recompute.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from forge_core import ParallelDims
from forge_core.testing import import_path
from forge_parallel import CPConfig, RecomputeConfig, TPPlan, parallelize
from forge_parallel.expert_parallel import (
    EPConfig,
    apply_ep,
    chunked_expert_forward,
    combine,
    dispatch,
    plan_dispatch,
    valid_ep_degrees,
    validate_ep,
)

TOLERANCE = 1e-5


moe = import_path(Path(__file__).with_name("tiny_moe.py"), "forge_parallel_tests_tiny_moe")
EP = EPConfig(experts="layers.*.mlp.experts")


# -- validation (no process group) ------------------------------------------------------


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="num_chunks must be >= 1"):
        EPConfig(num_chunks=0)
    with pytest.raises(ValueError, match="unknown expert-tensor-parallel styles"):
        EPConfig(etp_styles={"gate_up_proj": "diagonal", "down_proj": "rowwise"})
    with pytest.raises(ValueError, match="needs one 'rowwise'"):
        EPConfig(etp_styles={"gate_up_proj": "colwise"})


class _RoutingExperts(torch.nn.Module):
    """The shape of transformers' ``Qwen3MoeExperts`` / ``MixtralExperts`` (5.x): stacked
    weights, but an ``act_fn`` submodule and routing inside its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(torch.zeros(4, 16, 8))
        self.down_proj = torch.nn.Parameter(torch.zeros(4, 8, 8))
        self.act_fn = torch.nn.SiLU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        raise AssertionError("not called")


def test_transformers_style_experts_are_refused_with_the_reason():
    model = moe.build_tiny_moe(num_experts=4)
    for layer in model.layers:
        layer.mlp.experts = _RoutingExperts()
    with pytest.raises(
        ValueError,
        match=r"layers\.0\.mlp\.experts \(_RoutingExperts\) is not an experts module: it has "
        r"submodules \(act_fn\); its forward takes \(hidden_states, top_k_index, "
        r"top_k_weights\), not \(x_sorted, tokens_per_expert\).*transformers' expert modules "
        r".*are not supported.*'replicate' style",
    ):
        validate_ep(model, EP, ep=2)


def test_validation_names_the_numbers():
    model = moe.build_tiny_moe(num_experts=6)
    assert valid_ep_degrees(6) == [1, 2, 3, 6]
    with pytest.raises(ValueError, match=r"ep=4 does not divide the 6 experts.*\[1, 2, 3, 6\]"):
        validate_ep(model, EP, ep=4)
    with pytest.raises(ValueError, match="matches no module"):
        validate_ep(model, EPConfig(experts="layers.*.moe.experts"), ep=2)
    with pytest.raises(ValueError, match="is not an experts module"):
        validate_ep(model, EPConfig(experts="layers.*.mlp"), ep=2)
    with pytest.raises(
        ValueError,
        match=r"\(6, 32, 32\) cannot be split colwise_packed over etp=3: dim 1 must be divisible by 6",
    ):
        validate_ep(model, EP, ep=2, etp=3)
    with pytest.raises(ValueError, match="ep=2 needs expert_parallel=EPConfig"):
        parallelize(model, ParallelDims(world_size=2, ep=2))
    with pytest.raises(ValueError, match=r"ep=4 does not divide the 6 experts"):
        parallelize(model, ParallelDims(world_size=4, ep=4), expert_parallel=EP)
    with pytest.raises(ValueError, match=r"etp=1 and tp=2.*not supported"):
        parallelize(
            model,
            ParallelDims(world_size=4, tp=2, ep=2, etp=1),
            plan=moe.moe_plan(),
            expert_parallel=EP,
        )
    # Sequence parallelism with the MoE blocks left out of the plan: they would run on
    # sequence shards with plain weights whose gradients nobody sums over tp.
    sp_plan = moe.moe_plan(sequence_parallel=True)
    unstyled = {k: v for k, v in sp_plan.styles.items() if k != "layers.*.mlp"}
    with pytest.raises(ValueError, match=r"parameter layers\.0\.mlp\.router\.weight belongs"):
        parallelize(
            model,
            ParallelDims(world_size=2, tp=2),
            plan=TPPlan(styles=unstyled, sequence_parallel=True),
        )
    with pytest.raises(ValueError, match="data_parallel=None"):
        parallelize(model, ParallelDims(world_size=2, ep=2), data_parallel=None, expert_parallel=EP)


# -- dispatch / combine on 2 ranks ------------------------------------------------------

E, DIM, FFN = 4, 8, 6


def _rank_inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows sorted by expert, their counts and an output weighting; skewed on purpose:
    rank 1 sends nothing to expert 3 (so rank 1 receives nothing from itself for expert 3)
    and nobody sends anything to expert 2 (rank 1 runs an expert on zero rows)."""
    counts = torch.tensor([[3, 5, 0, 2], [4, 1, 0, 0]][rank])
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(int(counts.sum()), DIM, generator=gen)
    w = torch.randn(int(counts.sum()), DIM, generator=gen)
    return x, counts, w


def _dispatch_job() -> dict[str, float]:
    with moe.eager_kernels():
        return _dispatch_checks()


def _dispatch_checks() -> dict[str, float]:
    rank, size = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    torch.manual_seed(0)
    full = moe.Experts(E, DIM, FFN)
    # Reference: every rank's rows through all experts in one process; L = sum_r <y_r, w_r>.
    ref_weights = {n: p.detach().clone().requires_grad_() for n, p in full.named_parameters()}
    ref = moe.Experts(E, DIM, FFN)
    ref.gate_up_proj, ref.down_proj = (
        torch.nn.Parameter(ref_weights["gate_up_proj"]),
        torch.nn.Parameter(ref_weights["down_proj"]),
    )
    inputs = [_rank_inputs(r) for r in range(size)]
    xs = [x.clone().requires_grad_() for x, _, _ in inputs]
    total = sum((ref(x, c) * w).sum() for x, (_, c, w) in zip(xs, inputs, strict=True))
    total.backward()
    ref_out = ref(inputs[rank][0], inputs[rank][1]).detach()

    local = E // size
    errors: dict[str, float] = {}

    def check(name: str, y: torch.Tensor, x: torch.Tensor, grads: dict[str, torch.Tensor]):
        errors[f"{name}_out"] = moe.tm.rel_err(y.detach(), ref_out)
        errors[f"{name}_dx"] = moe.tm.rel_err(x.grad, xs[rank].grad)
        for pname, g in grads.items():
            errors[f"{name}_d{pname}"] = moe.tm.rel_err(g, ref.get_parameter(pname).grad)

    x0, counts, w = _rank_inputs(rank)
    own = slice(rank * local, (rank + 1) * local)
    for chunks in (1, 3):
        experts = moe.Experts(local, DIM, FFN)
        with torch.no_grad():
            experts.gate_up_proj.copy_(full.gate_up_proj[own])
            experts.down_proj.copy_(full.down_proj[own])
        x = x0.clone().requires_grad_()
        if chunks == 1:
            plan = plan_dispatch(counts, x.shape[0], group)
            assert plan.local_tokens_per_expert.tolist() == [[7, 6], [0, 2]][rank], (
                plan.local_tokens_per_expert
            )
            y = combine(experts(dispatch(x, plan), plan.local_tokens_per_expert), plan)
        else:
            y = chunked_expert_forward(x, counts, experts, group=group, num_chunks=chunks)
        (y * w).sum().backward()
        grads = {}
        for pname, p in experts.named_parameters():
            gathered = [torch.empty_like(p.grad) for _ in range(size)]
            dist.all_gather(gathered, p.grad)
            grads[pname] = torch.cat(gathered)
        check(f"chunks{chunks}", y, x, grads)

    # The same through apply_ep: DTensor expert weights and the swapped-in forward.
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (size,), mesh_dim_names=("ep",))
    for chunks in (2,):  # the unchunked path through apply_ep runs in the training tests
        model = torch.nn.Module()
        model.experts = moe.Experts(E, DIM, FFN)
        model.experts.load_state_dict(full.state_dict())
        apply_ep(model, mesh, EPConfig(experts="experts", num_chunks=chunks))
        x = x0.clone().requires_grad_()
        y = model.experts(x, counts)
        (y * w).sum().backward()
        grads = {n: p.grad.full_tensor() for n, p in model.experts.named_parameters()}
        check(f"apply_ep{chunks}", y, x, grads)
    return errors


class _Mark(torch.autograd.Function):
    """Identity that logs ``label`` when its backward runs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, events: list, label: str) -> torch.Tensor:
        ctx.events, ctx.label = events, label
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.events.append(ctx.label)
        return grad, None, None


def _backward_overlap_job(chunks: int) -> list[str]:
    """The order in which the chunked backward starts and waits for its exchanges and runs
    each chunk's expert backward."""
    from forge_parallel.expert_parallel import overlap

    rank = dist.get_rank()
    events: list[str] = []
    start = overlap.all_to_all_async

    def recording_start(*args, **kwargs):
        pending, index = start(*args, **kwargs), len([e for e in events if e[0] == "s"])
        events.append(f"s{index}")
        wait = pending.wait

        def recording_wait():
            events.append(f"w{index}")
            return wait()

        pending.wait = recording_wait
        return pending

    torch.manual_seed(0)
    experts = moe.Experts(E // 2, DIM, FFN)
    calls = iter(range(chunks))

    def compute(x_local, counts):
        c = next(calls)  # forward order: chunk 0 first
        y = experts(_Mark.apply(x_local, events, f"end{c}"), counts)
        return _Mark.apply(y, events, f"begin{c}")

    x, counts, w = _rank_inputs(rank)
    x.requires_grad_()
    with moe.eager_kernels():
        y = chunked_expert_forward(x, counts, compute, group=dist.group.WORLD, num_chunks=chunks)
        overlap.all_to_all_async = recording_start
        try:
            (y * w).sum().backward()
        finally:
            overlap.all_to_all_async = start
    return events


def _check(per_rank: list[dict[str, dict[str, float]]] | list[dict[str, float]]) -> None:
    bad = {}
    for rank, result in enumerate(per_rank):
        for name, value in result.items():
            worst = max(value.values()) if isinstance(value, dict) else value
            if not worst <= TOLERANCE:
                bad[f"rank{rank} {name}"] = value
    print(per_rank[0])  # shown with pytest -s
    assert not bad, f"relative errors above {TOLERANCE}: {bad}"


def test_dispatch_combine_matches_one_process(dist_pool):
    _check(dist_pool(2).run(_dispatch_job))


def test_chunked_backward_overlaps_the_reverse_exchanges(dist_pool):
    events = dist_pool(2).run(_backward_overlap_job, 3)
    assert events[0] == events[1]
    # s0-s2: the reverse combines of chunks 2, 1, 0 start together, before any expert backward;
    # each reverse dispatch (s3: chunk 2, s4: chunk 1, s5: chunk 0) starts after its chunk's
    # expert backward and is waited for only after the next chunk's expert backward.
    assert events[0] == [
        *("s0", "s1", "s2"),
        *("w0", "begin2", "end2", "s3"),
        *("w1", "begin1", "end1", "s4", "w3"),
        *("w2", "begin0", "end0", "s5", "w4", "w5"),
    ], events[0]


# -- training exactness -----------------------------------------------------------------


def _layouts_2() -> dict[str, dict]:
    return {
        "ep2": {"dims": {"ep": 2}, "expert_parallel": EP},
        "ep2_overlap": {"dims": {"ep": 2}, "expert_parallel": EPConfig(num_chunks=2)},
        "ep2_overlap_recompute": {  # the recomputed forward starts exchanges inside backward
            "dims": {"ep": 2},
            "expert_parallel": EPConfig(experts=EP.experts, num_chunks=2),
            "recompute": RecomputeConfig(mode="full"),
        },
        # the checkpointed blocks re-run their dispatch/combine in the backward
        "ep2_recompute": {
            "dims": {"ep": 2},
            "expert_parallel": EP,
            "recompute": RecomputeConfig(mode="full"),
        },
        # A per-op policy over the whole block, the experts' all-to-alls included (their
        # buffers recomputed, so the exchanges run again in backward); the experts are a
        # nested FSDP unit whose hooks run outside the policy.
        "ep2_pointwise": {
            "dims": {"ep": 2},
            "expert_parallel": EP,
            "recompute": RecomputeConfig(mode="selective", ops="pointwise"),
        },
        # 20,000 bytes of the ~54,000 each block keeps: auto picks a selective policy
        "ep2_overlap_auto": {
            "dims": {"ep": 2},
            "expert_parallel": EPConfig(experts=EP.experts, num_chunks=2),
            "recompute": RecomputeConfig(mode="auto", memory_budget=20_000),
        },
        # The MoE model without expert parallelism: the dense layouts must stay exact too.
        "ddp": {"dims": {"dp_replicate": -1, "dp_shard": 1}, "data_parallel": "ddp"},
        "zero1": {"dims": {}, "data_parallel": "zero1"},
        "zero2": {"dims": {}, "data_parallel": "zero2"},
        "fsdp": {"dims": {}, "data_parallel": "fsdp"},
        "tp2": {"dims": {"tp": 2, "dp_shard": -1}, "plan": moe.moe_plan()},
        # each rank routes its sequence shard; the MoE weights' gradients are summed over tp
        "tp2_sp": {
            "dims": {"tp": 2, "dp_shard": -1},
            "plan": moe.moe_plan(sequence_parallel=True),
        },
        "cp2_ring": {"dims": {"cp": 2, "dp_shard": -1}, "context_parallel": CPConfig()},
        "cp2_ulysses": {
            "dims": {"cp": 2, "dp_shard": -1},
            "context_parallel": CPConfig(style="ulysses"),
        },
        # recomputed blocks replay their forward in backward under the attention router
        "cp2_ring_recompute": {
            "dims": {"cp": 2, "dp_shard": -1},
            "context_parallel": CPConfig(),
            "recompute": RecomputeConfig(mode="full"),
        },
        "cp2_ulysses_recompute": {
            "dims": {"cp": 2, "dp_shard": -1},
            "context_parallel": CPConfig(style="ulysses"),
            "recompute": RecomputeConfig(mode="full"),
        },
    }


def _layouts_4() -> dict[str, dict]:
    return {
        "ep2_tp2": {"dims": {"tp": 2, "ep": 2}, "plan": moe.moe_plan(), "expert_parallel": EP},
        # each tp rank routes its sequence shard; the rows are gathered over etp after dispatch
        "ep2_tp2_sp": {
            "dims": {"tp": 2, "ep": 2},
            "plan": moe.moe_plan(sequence_parallel=True, expert_parallel=True),
            "expert_parallel": EPConfig(experts=EP.experts, sequence_parallel=True),
        },
        "ep2_tp2_sp_overlap": {
            "dims": {"tp": 2, "ep": 2},
            "plan": moe.moe_plan(sequence_parallel=True, expert_parallel=True),
            "expert_parallel": EPConfig(experts=EP.experts, sequence_parallel=True, num_chunks=2),
        },
        "ep2_fsdp4_edp2": {"dims": {"ep": 2}, "expert_parallel": EP},
        "tp2_fsdp2": {"dims": {"tp": 2, "dp_shard": 2}, "plan": moe.moe_plan()},
        # FSDP reduce-scatters over dp the MoE gradients that are partial sums over tp
        "tp2_sp_fsdp2": {
            "dims": {"tp": 2, "dp_shard": 2},
            "plan": moe.moe_plan(sequence_parallel=True),
        },
        "hsdp_2x2": {"dims": {"dp_replicate": 2, "dp_shard": 2}},
        "cp2_fsdp2": {"dims": {"cp": 2, "dp_shard": 2}, "context_parallel": CPConfig()},
        "ep2_hsdp_2x2": {
            "dims": {"dp_replicate": 2, "dp_shard": 2, "ep": 2},
            "expert_parallel": EP,
        },
    }


def _train_job(group: str) -> dict[str, dict[str, float]]:
    return moe.run_moe_layouts({"2": _layouts_2, "4": _layouts_4}[group]())


def test_moe_training_on_2_ranks(dist_pool):
    _check(dist_pool(2).run(_train_job, "2"))


def test_moe_training_on_4_ranks(dist_pool):
    _check(dist_pool(4).run(_train_job, "4"))
