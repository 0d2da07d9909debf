"""Every parallel layout trains like a single process (the acceptance test of forge-parallel).

Each layout trains 5 steps (AdamW, 2 micro-batches of gradient accumulation, gradient clipping
that bites) on the gloo worker pool; the single-process reference runs on every rank from the
same initial weights, and each rank compares its losses, gradient norms and gathered final
parameters with it: relative error <= 1e-5 in float32. Layouts are grouped into few pool jobs,
because each job at 4 ranks costs seconds on a small CPU machine.
"""

from __future__ import annotations

from pathlib import Path

import torch

from forge_core.testing import import_path
from forge_parallel import FSDPConfig, RecomputeConfig

TOLERANCE = 1e-5
#: Layouts that are not meant to be exact, with their own bound.
LOOSE = {"fsdp_bf16_compute": 3e-2}
#: Deliberately wrong layouts, with the error they must at least show: the suite would miss the
#: bug they carry if they passed.
MUST_FAIL = {"qk_norm_tp2_plain_replicate": 1e-4}


tm = import_path(Path(__file__).with_name("tiny_models.py"), "forge_parallel_tests_tiny_models")

DDP = {"dims": {"dp_replicate": -1, "dp_shard": 1}, "data_parallel": "ddp"}
FSDP = {"dims": {}, "data_parallel": "fsdp"}
TP2 = {"dims": {"tp": 2, "dp_shard": -1}}


def _tiny_layouts_2() -> dict[str, dict]:
    return {
        "ddp": DDP,
        "zero1": {"dims": {}, "data_parallel": "zero1"},
        "zero2": {"dims": {}, "data_parallel": "zero2"},
        # many small buckets, each padded to a multiple of the ranks
        "zero2_buckets": {"dims": {}, "data_parallel": "zero2", "optimizer": {"bucket_numel": 999}},
        "fsdp": FSDP,
        "fsdp_no_reshard": {**FSDP, "fsdp": FSDPConfig(reshard_after_forward=False)},
        "fsdp_recompute_full": {**FSDP, "recompute": RecomputeConfig(mode="full")},
        "fsdp_recompute_selective": {
            **FSDP,
            "recompute": RecomputeConfig(mode="selective", ops="attention"),
        },
        "tp2": {**TP2, "plan": tm.tiny_plan()},
        "tp2_sp": {**TP2, "plan": tm.tiny_plan(sequence_parallel=True)},
        # bf16 compute with fp32 reduction: not exact, checked against a looser bound below.
        "fsdp_bf16_compute": {**FSDP, "fsdp": FSDPConfig(param_dtype=torch.bfloat16)},
        "tp2_sp_replicated_logits": {
            **TP2,
            "plan": tm.tiny_plan(sequence_parallel=True, loss_parallel=False),
        },
    }


def _tiny_layouts_4() -> dict[str, dict]:
    return {
        "hsdp_2x2": {"dims": {"dp_replicate": 2, "dp_shard": 2}},
        "tp2_fsdp2": {"dims": {"tp": 2, "dp_shard": 2}, "plan": tm.tiny_plan()},
        "tp2_sp_fsdp2_recompute": {
            "dims": {"tp": 2, "dp_shard": 2},
            "plan": tm.tiny_plan(sequence_parallel=True),
            "recompute": RecomputeConfig(mode="selective", ops="pointwise"),
        },
        # module-level: the attention preset's policy inside attn and mlp (their TP
        # collectives kept, never re-issued; checkpointed whole: the HF and CP layouts)
        "tp2_sp_fsdp2_recompute_modules": {
            "dims": {"tp": 2, "dp_shard": 2},
            "plan": tm.tiny_plan(sequence_parallel=True),
            "recompute": RecomputeConfig(
                mode="selective", modules=("attn", "mlp"), ops="attention"
            ),
        },
    }


def _qk_norm_layouts_2() -> dict[str, dict]:
    """Qwen3-style QK-norm: each tensor-parallel rank normalises only its own heads, so the
    replicated ``q_norm``/``k_norm`` weights need their gradients summed over tp."""
    return {
        "qk_norm_tp2": {**TP2, "plan": tm.tiny_plan(qk_norm="replicate_partial")},
        "qk_norm_tp2_sp": {
            **TP2,
            "plan": tm.tiny_plan(sequence_parallel=True, qk_norm="replicate_partial"),
        },
        # Plain replicate without sp keeps each rank's partial gradient: must be caught.
        "qk_norm_tp2_plain_replicate": {**TP2, "plan": tm.tiny_plan(qk_norm="replicate")},
    }


def _qk_norm_layouts_4() -> dict[str, dict]:
    return {
        "qk_norm_tp2_sp_fsdp2": {
            "dims": {"tp": 2, "dp_shard": 2},
            "plan": tm.tiny_plan(sequence_parallel=True, qk_norm="replicate_partial"),
        },
    }


def _hf_layouts_2() -> dict[str, dict]:
    return {
        "ddp": DDP,
        "zero2": {"dims": {}, "data_parallel": "zero2"},
        "fsdp": FSDP,
        "fsdp_recompute_full": {**FSDP, "recompute": RecomputeConfig(mode="full")},
        "tp2": {**TP2, "plan": tm.HF_LLAMA_PLAN},
    }


def _hf_phi3_layouts_2() -> dict[str, dict]:
    # unequal packed parts (grouped-query qkv_proj) with sequence parallelism, the embedding
    # kept whole and the sequence cut at the first layer (README: transformers models)
    return {"phi3_gqa_tp2_sp": {**TP2, "plan": tm.hf_phi3_plan(sequence_parallel=True)}}


def _hf_layouts_4() -> dict[str, dict]:
    return {
        "hsdp_2x2": {"dims": {"dp_replicate": 2, "dp_shard": 2}},
        "tp2_fsdp2": {"dims": {"tp": 2, "dp_shard": 2}, "plan": tm.HF_LLAMA_PLAN},
        # transformers' submodule names; self_attn takes hidden_states as a keyword
        "tp2_fsdp2_recompute_modules": {
            "dims": {"tp": 2, "dp_shard": 2},
            "plan": tm.HF_LLAMA_PLAN,
            "recompute": RecomputeConfig(mode="selective", modules=("self_attn", "mlp")),
        },
    }


def _job(build: str, group: str):
    layouts = {
        "tiny2": _tiny_layouts_2,
        "tiny4": _tiny_layouts_4,
        "qk_norm2": _qk_norm_layouts_2,
        "qk_norm4": _qk_norm_layouts_4,
        "hf2": _hf_layouts_2,
        "hf_phi3_2": _hf_phi3_layouts_2,
        "hf4": _hf_layouts_4,
    }[group]()
    return tm.run_layouts(build, layouts)


def _check(per_rank: list[dict[str, dict[str, float]]]) -> None:
    for layout, errors in per_rank[0].items():  # shown with pytest -s
        print(f"{layout:28s} " + " ".join(f"{k}={v:.1e}" for k, v in errors.items()))
    bad = {
        f"rank{rank} {layout}": errors
        for rank, result in enumerate(per_rank)
        for layout, errors in result.items()
        if layout not in MUST_FAIL and max(errors.values()) > LOOSE.get(layout, TOLERANCE)
    }
    assert not bad, f"relative errors above {TOLERANCE}: {bad}"
    missed = {
        f"rank{rank} {layout}": errors
        for rank, result in enumerate(per_rank)
        for layout, errors in result.items()
        if layout in MUST_FAIL and max(errors.values()) < MUST_FAIL[layout]
    }
    assert not missed, f"deliberately wrong layouts not caught ({MUST_FAIL}): {missed}"


def test_tiny_llama_layouts_on_2_ranks(dist_pool):
    _check(dist_pool(2).run(_job, "tiny", "tiny2"))


def test_qk_norm_layouts(dist_pool):
    _check(dist_pool(2).run(_job, "tiny_qk_norm", "qk_norm2"))
    _check(dist_pool(4).run(_job, "tiny_qk_norm", "qk_norm4"))


def test_transformers_llama_layouts_on_2_ranks(dist_pool):
    _check(dist_pool(2).run(_job, "hf", "hf2"))
    _check(dist_pool(2).run(_job, "hf_phi3_gqa", "hf_phi3_2"))


def test_layouts_on_4_ranks(dist_pool):
    pool = dist_pool(4)
    _check(pool.run(_job, "tiny", "tiny4"))
    _check(pool.run(_job, "hf", "hf4"))
