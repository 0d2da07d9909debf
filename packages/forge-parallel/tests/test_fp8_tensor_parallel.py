"""FP8 linears (forge_kernels ``Fp8Linear``) under the tensor-parallel styles give one process's
values: column-parallel (plain and packed) and row-parallel layers with sequence parallelism,
per-tensor current and delayed scaling (amaxes all-reduced over tp) and block-wise scaling
(128-wide blocks within each shard).

The weights are built so that each rank's shard has a different amax (the second half of the
column-parallel rows and of the row-parallel columns scaled up): without the amax reduction
the outputs and gradients are wrong, which the job checks too.

The same job checks FP8 linears whose *tokens* are split (context parallelism; a layer run
whole on a sequence shard): each rank runs whole weights on its half of the sequence, with
``token_group`` set, and the second half of the sequence scaled up so each rank's amax differs.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from forge_parallel import TPPlan
from forge_parallel.tensor_parallel import apply_tp

pytestmark = pytest.mark.multiprocess

SEQ, BATCH = 8, 2


class _Mlp(nn.Module):
    """``down(silu(gate) * up + extra(x))``: a packed column-parallel ``gate_up``, a plain
    column-parallel ``extra`` (with a bias) and a row-parallel ``down`` (with a bias)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.extra = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up + self.extra(x))


class _Model(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp = _Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


_PLAN = TPPlan(
    styles={
        "mlp": "block_input",
        "mlp.gate_up": "colwise_packed",
        "mlp.extra": "colwise",
        "mlp.down": "rowwise",
    },
    sequence_parallel=True,
)


def _build(dim: int, hidden: int, recipe: str) -> nn.Module:
    from forge_kernels.fp8 import convert_to_fp8

    torch.manual_seed(0)
    model = _Model(dim, hidden)
    with torch.no_grad():  # each tensor-parallel shard gets its own amax
        for part in model.mlp.gate_up.weight.chunk(2, dim=0):
            part[hidden // 2 :] *= 4  # the second rank's rows of gate and of up
        model.mlp.extra.weight[hidden // 2 :] *= 3
        model.mlp.down.weight[:, hidden // 2 :] *= 5
    return convert_to_fp8(model, recipe=recipe, skip=(), gemm="emulate")


def _step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    y = model(x)
    (y * torch.linspace(-1, 2, y.shape[-1])).square().sum().backward()
    return y.detach(), x.grad


def _full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        for n, p in model.named_parameters()
    }


@contextlib.contextmanager
def _amax_not_reduced():
    """The bug the reduction prevents: each rank scales by its own shard's amax."""
    import forge_kernels.fp8.quantize as quantize

    original = quantize.tensor_amax
    quantize.tensor_amax = lambda x, *, group=None: original(x)
    try:
        yield
    finally:
        quantize.tensor_amax = original


def _errors(recipe: str, dim: int, hidden: int, steps: int) -> dict[str, float]:
    """Largest relative error of outputs, input and weight gradients (and delayed-scaling
    state) of the tensor-parallel layers against one process, over ``steps`` steps."""
    rank, tp = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (tp,))
    reference, sharded = _build(dim, hidden, recipe), _build(dim, hidden, recipe)
    apply_tp(sharded, mesh, _PLAN)
    errors: dict[str, float] = {}

    def note(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
        err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
        errors[name] = max(errors.get(name, 0.0), err)

    shard = slice(rank * SEQ // tp, (rank + 1) * SEQ // tp)
    for step in range(steps):
        torch.manual_seed(100 + step)
        x = torch.randn(BATCH, SEQ, dim) * torch.linspace(0.5, 3, dim)
        for model in (reference, sharded):
            model.zero_grad()
        y_ref, dx_ref = _step(reference, x)
        y, dx = _step(sharded, x[:, shard])  # sequence parallel: this rank's sequence shard
        note("output", y, y_ref[:, shard])
        note("input_grad", dx, dx_ref[:, shard])
        want = _full_grads(reference)
        for name, grad in _full_grads(sharded).items():
            note(f"grad {name}", grad, want[name])
    if recipe == "delayed":
        ref_buffers = dict(reference.named_buffers())
        for name, buffer in sharded.named_buffers():  # some are replicated DTensors
            local = buffer.to_local() if isinstance(buffer, DTensor) else buffer
            note(f"buffer {name}", local, ref_buffers[name])
    return errors


class _TokenMlp(nn.Module):
    """``down(silu(up(x)))``, whole weights, as a layer on a sequence shard runs."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.up(x)))


def _token_split_errors(recipe: str, dim: int, seq: int, steps: int) -> dict[str, float]:
    """Largest relative error of FP8 linears on this rank's half of the sequence (amaxes of
    the input and output gradient reduced over the token group) against one process on the
    whole sequence: outputs, input gradients, summed weight gradients, delayed buffers."""
    from forge_kernels.fp8 import convert_to_fp8, set_token_group

    rank, ranks = dist.get_rank(), dist.get_world_size()
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(
            convert_to_fp8(_TokenMlp(dim, 2 * dim), recipe=recipe, skip=(), gemm="emulate")
        )
    reference, split = models
    assert set_token_group(split, dist.group.WORLD) == ["up", "down"]
    errors: dict[str, float] = {}

    def note(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
        err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
        errors[name] = max(errors.get(name, 0.0), err)

    shard = slice(rank * seq // ranks, (rank + 1) * seq // ranks)
    for step in range(steps):
        torch.manual_seed(200 + step)
        x = torch.randn(1, seq, dim) * torch.linspace(0.5, 3, dim)
        x[:, seq // 2 :] *= 4  # the second rank's tokens: a larger amax
        for model in (reference, split):
            model.zero_grad()
        y_ref, dx_ref = _step(reference, x)
        y, dx = _step(split, x[:, shard])
        note("output", y, y_ref[:, shard])
        note("input_grad", dx, dx_ref[:, shard])
        for (name, p), p_ref in zip(split.named_parameters(), reference.parameters(), strict=True):
            grad = p.grad.clone()
            dist.all_reduce(grad)  # each rank's tokens' share (data parallelism sums them)
            note(f"grad {name}", grad, p_ref.grad)
    if recipe == "delayed":
        ref_buffers = dict(reference.named_buffers())
        for name, buffer in split.named_buffers():
            note(f"buffer {name}", buffer, ref_buffers[name])
    return errors


def _job() -> dict[str, dict[str, float]]:
    out = {
        "tokens_current": _token_split_errors("current", 32, 16, 1),
        "tokens_delayed": _token_split_errors("delayed", 32, 16, 3),
        "tokens_blockwise": _token_split_errors("blockwise", 128, 256, 1),
        "current": _errors("current", 32, 64, 1),
        "delayed": _errors("delayed", 32, 64, 3),
        "blockwise": _errors("blockwise", 256, 256, 1),
    }
    with _amax_not_reduced():
        out["current_unreduced"] = _errors("current", 32, 64, 1)
        out["tokens_unreduced"] = _token_split_errors("current", 32, 16, 1)
    try:  # 128 hidden units over 2 ranks: 64-wide shards of 128-wide blocks
        _errors("blockwise", 128, 128, 1)
    except ValueError as error:
        out["blockwise_misaligned"] = {"message": str(error)}
    try:  # 64 tokens per rank: a 128-token weight-gradient block would span both
        _token_split_errors("blockwise", 128, 128, 1)
    except ValueError as error:
        out["tokens_blockwise_misaligned"] = {"message": str(error)}
    return out


def test_fp8_linears_under_tp2_sp_match_one_process(dist_pool):
    results = dist_pool(2).run(_job)
    for recipe, errors in results[0].items():  # shown with pytest -s
        if not recipe.endswith("_misaligned"):
            print(f"{recipe:18s} max relative error {max(errors.values()):.1e}")
    for rank_result in results:
        for recipe in ("current", "delayed", "blockwise"):
            for case in (recipe, f"tokens_{recipe}"):
                errors = rank_result[case]
                assert max(errors.values()) < 1e-5, (case, errors)
        assert sum(k.startswith("buffer ") for k in rank_result["tokens_delayed"]) == 4
        assert max(rank_result["tokens_unreduced"].values()) > 1e-3
        # Every layer's weight gradient was compared, and the delayed histories.
        assert sum(k.startswith("grad mlp.") for k in rank_result["current"]) == 5
        assert any(k.startswith("buffer ") for k in rank_result["delayed"])
        # Without the amax reduction each rank's scales are its shard's: visibly wrong.
        assert max(rank_result["current_unreduced"].values()) > 1e-3
        message = rank_result["blockwise_misaligned"]["message"]
        assert "gives 64-wide shards, not a multiple of the 128-wide blocks" in message
        message = rank_result["tokens_blockwise_misaligned"]["message"]
        assert "this rank holds 64 tokens, not a multiple of the 128-token blocks" in message


def test_set_token_group_names_the_layers_it_cannot_find():
    from forge_kernels.fp8 import convert_to_fp8, set_token_group

    model = convert_to_fp8(_TokenMlp(32, 64), skip=(), gemm="emulate")
    assert set_token_group(model, None, names=["down"]) == ["down"]
    with pytest.raises(ValueError, match=r"\['nope'\] are not Fp8Linear modules of the model"):
        set_token_group(model, None, names=["down", "nope"])
