"""Per-tensor FP8 under TP2 + SP scales every operand as one process would, layer by layer.

The end-to-end comparisons (test_fp8_tp.py) check losses and gradient norms, which on a deeper
model cannot tell a wrong scale from FP8 rounding: on a 4-layer tiny Llama (and a 4-layer
Qwen2.5-VL tiny) TP2 + SP gives step 1's gradient norm ~4e-4 off one process's, because the
shards' summation order (row-parallel partial sums, GEMMs on narrower shards) changes fp32
activations and gradients in their last bits and now and then one lands on an E4M3 / E5M2
rounding midpoint (``layers.2.attn.q_proj``'s input: scaled
-0.9062494 in one process, -0.9062554 under TP, codes -0.875 and -0.9375), and each flipped
gradient code spreads through the FP8 backward. Jittering one process's quantizer inputs by
+-1 ulp moves its gradient norm as far. A real scaling bug (a rank's shard amax) is off by as
much, so this test checks the scaling itself: every quantization a tensor-parallel rank makes
(inputs, weights and output gradients of all 24 FP8 linears) uses the scale of the whole
operand, gathered over the tensor-parallel ranks, and gives that operand's one-process FP8
codes (Micikevicius et al. 2022, arXiv:2209.05433: per-tensor scale = fp8_max / amax).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from forge_core.testing import import_path

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")

_ROLES = ("input", "weight", "output gradient")


@contextlib.contextmanager
def _recording(records: list[dict]):
    """Record each per-tensor quantization of an Fp8Linear with a DTensor weight: its role,
    the local operand, scale and codes, how the weight is split and over which ranks."""
    import forge_kernels.fp8.linear as linear
    from forge_kernels.fp8.tensor_parallel import weight_split

    current: dict = {"layer": None}
    function = linear._Fp8LinearFunction
    saved = (linear.Fp8Linear.forward, function.forward, function.backward)
    quantize_operand = linear._quantize_operand
    layer_forward, fn_forward, fn_backward = saved

    def forward(self, x):
        weight = self.weight
        current["layer"] = None
        if hasattr(weight, "device_mesh"):  # the layout the tensor-parallel style gave it
            current["layer"] = {
                "split": weight_split(weight.placements[0]),
                "ranks": tuple(weight.device_mesh.mesh.flatten().tolist()),
            }
        return layer_forward(self, x)

    def fn_fwd(ctx, *args):
        ctx.recorded_layer = current["layer"]
        return fn_forward(ctx, *args)

    def fn_bwd(ctx, dy):
        current["layer"] = ctx.recorded_layer
        return fn_backward(ctx, dy)

    def record(x, role, recipe, state, fp8_dtype, block, groups, *args, **kwargs):
        out = quantize_operand(x, role, recipe, state, fp8_dtype, block, groups, *args, **kwargs)
        if current["layer"] is not None:
            records.append(
                {
                    **current["layer"],
                    "role": role,
                    "dtype": fp8_dtype,
                    "x": x.detach().float().clone(),
                    "scale_inv": out.scale_inv.detach().clone(),
                    "codes": out.data.float().clone(),
                }
            )
        return out

    linear.Fp8Linear.forward = forward
    function.forward, function.backward = staticmethod(fn_fwd), staticmethod(fn_bwd)
    linear._quantize_operand = record
    try:
        yield
    finally:
        linear.Fp8Linear.forward = layer_forward
        function.forward, function.backward = staticmethod(fn_forward), staticmethod(fn_backward)
        linear._quantize_operand = quantize_operand


def _quantizations(output_dir: str, *overrides: str, reduce_amax: bool = True) -> list[dict]:
    """A pool job: one step of a 4-layer tiny Llama with per-tensor FP8; this rank's records.
    ``reduce_amax=False`` scales each shard by its own amax (the bug the check must catch)."""
    import forge_kernels.fp8.quantize as quantize

    records: list[dict] = []
    original_amax = quantize.tensor_amax
    if not reduce_amax:
        quantize.tensor_amax = lambda x, *, group=None: original_amax(x)
    try:
        with _recording(records):
            tiny.train_losses_and_norms(
                *tiny.TINY_MODEL,
                *tiny.TINY_RUN,
                "model.config.num_layers=4",
                "train.steps=1",
                "train.eval_batches=0",
                "checkpoint.export_hf=false",
                "train.fp8=per_tensor",
                f"train.output_dir={output_dir}",
                *overrides,
            )
    finally:
        quantize.tensor_amax = original_amax
    return records


def _whole(local: list[torch.Tensor], split: str, role: int) -> torch.Tensor:
    """One process's operand from the tensor-parallel ranks' (order within a dim does not
    change a per-tensor scale or an element's code)."""
    dim = {
        ("out", 1): 0,  # column-parallel weight rows
        ("out", 2): -1,  # column-parallel output gradient columns
        ("in", 0): -1,  # row-parallel input columns
        ("in", 1): -1,  # row-parallel weight columns
    }.get((split, role))
    if dim is None:  # a replicated operand: the same on every rank
        for other in local[1:]:
            torch.testing.assert_close(other, local[0], rtol=0, atol=0)
        return local[0]
    return torch.cat(local, dim)


def _scaling_mismatches(by_rank: list[list[dict]]) -> list[str]:
    """Each tensor-parallel group's quantizations against one process's quantizer on the
    gathered whole operands: the operands whose scale or codes differ."""
    from forge_kernels.fp8.quantize import quantize_tensorwise

    groups = {records[0]["ranks"] for records in by_rank}
    mismatches, checked = [], 0
    for ranks in groups:
        members = [by_rank[r] for r in ranks]
        assert len({len(m) for m in members}) == 1, "the ranks quantized different operands"
        for i, parts in enumerate(zip(*members, strict=True)):
            first = parts[0]
            split, role = first["split"], first["role"]
            whole = _whole([p["x"] for p in parts], split, role)
            codes = _whole([p["codes"] for p in parts], split, role)
            want = quantize_tensorwise(whole, first["dtype"])
            checked += 1
            scales_ok = all(torch.equal(p["scale_inv"], want.scale_inv) for p in parts)
            if not (scales_ok and torch.equal(codes, want.data.float())):
                mismatches.append(f"ranks {ranks} #{i}: {split}-split layer, {_ROLES[role]}")
    # 4 layers x 6 linears x (input, weight, output gradient) per tensor-parallel group
    assert checked == len(groups) * 4 * 6 * 3, checked
    return mismatches


def test_fp8_scales_under_tp2_sp_are_those_of_the_whole_operands(tmp_path, dist_pool):
    pool = dist_pool(4)
    layout = "parallel=tp2-fsdp"  # TP2 + SP x FSDP2
    assert _scaling_mismatches(pool.run(_quantizations, f"{tmp_path}/tp2", layout)) == []
    # The check bites: each rank scaling its shards by their own amax is caught.
    wrong = pool.run(_quantizations, f"{tmp_path}/shard_amax", layout, reduce_amax=False)
    mismatches = _scaling_mismatches(wrong)
    assert any("in-split layer, input" in m for m in mismatches), mismatches
    assert any("out-split layer, weight" in m for m in mismatches), mismatches
