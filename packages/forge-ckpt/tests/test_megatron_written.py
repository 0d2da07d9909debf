"""Optional: checkpoints written by megatron-core itself convert to Hugging Face with forge and
give, in transformers, the logits of the Megatron model that wrote them.

Skipped unless megatron-core and psutil are installed (neither is in the workspace lock;
megatron-core's ``torch_dist`` writer imports psutil without declaring it); run with
``uv run --with 'megatron-core==0.16.*' --with psutil pytest
packages/forge-ckpt/tests/test_megatron_written.py``.

Four gloo processes (forked in a subprocess; CPU set-up of :mod:`megatron_core_cpu`) hold
megatron-core GPTModels with random weights split over Megatron's parallel state: a Llama (GQA,
SwiGLU, untied embeddings) at tensor parallel 2 x pipeline parallel 2 and a Qwen3-MoE (QK norm,
dense and MoE layers mixed, 4 experts) at tensor parallel 2 x expert parallel 2. Each rank
computes the model's logits as Megatron runs it (tensor-parallel layers; the pipeline stage's
hidden states sent to the next stage, ``GPTModel.set_input_tensor``) and saves the checkpoint
the way Megatron-LM's ``megatron/training/checkpointing.py`` (``save_checkpoint``,
``generate_state_dict``) does:

- ``torch_dist``: ``dist_checkpointing.save`` of ``{"args", "checkpoint_version": 3.0,
  "iteration", "model": model.sharded_state_dict(metadata), "rng_state": ShardedObject,
  "rerun_state_machine", "num_floating_point_operations_so_far"}`` into ``iter_0000010/`` with
  the content metadata Megatron-LM passes, then ``latest_checkpointed_iteration.txt``;
- legacy: ``torch.save`` of the same dict with ``model.state_dict_for_save_checkpoint()`` and
  the per-rank RNG list into ``iter_0000010/mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/
  model_optim_rng.pt``.

Megatron-LM's training package is not on PyPI (``megatron-lm`` does not resolve; the
``megatron-core`` wheel ships ``megatron.core`` only), so the test rebuilds those dicts as its
checkpointing.py does, with an ``args`` Namespace holding the model's Megatron-LM arguments and,
as Megatron-LM's ``parse_args`` leaves them, ``attention_backend=AttnBackend.auto`` (an enum of
megatron.core) and ``params_dtype=torch.float32``; the RNG state holds NumPy's generator state
(an ndarray) as ``np.random.get_state()`` returns it. No optimizer is saved (``no_save_optim``;
megatron-core's optimizers need its CUDA DistributedDataParallel buffers). ``cuda_rng_state`` is
the CPU generator's state (no CUDA here).

``forge-convert megatron-to-hf`` reads either folder (the Hugging Face config given with
``--hf-config``: Megatron-LM's args name no model family and no unpadded vocabulary) and
transformers' logits match Megatron's in float32 (relative error below 1e-5); both formats give
the same Hugging Face tensors bit for bit.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ITERATION = 10
_COMMON = {
    "vocab_size": 61, "hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 4,
    "num_key_value_heads": 2,
}  # fmt: skip
# name -> (transformers class prefix, config overrides, (tp, pp, ep)) on 4 processes
CASES = {
    "llama": ("Llama", {"num_hidden_layers": 4}, (2, 2, 1)),
    "qwen3_moe": ("Qwen3Moe", {
        "num_hidden_layers": 2, "head_dim": 8, "moe_intermediate_size": 4, "num_experts": 4,
        "num_experts_per_tok": 2, "mlp_only_layers": [0],
    }, (2, 1, 2)),
}  # fmt: skip
WORLD = 4
TOLERANCE = 1e-5  # relative error of float32 logits


def test_megatron_written_checkpoints_give_megatron_logits(tmp_path):
    pytest.importorskip("megatron.core")
    pytest.importorskip("transformers")
    pytest.importorskip("psutil", reason="megatron-core's torch_dist writer needs psutil")
    try:
        run = subprocess.run(
            [sys.executable, __file__, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=560,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:  # show how far it got
        pytest.fail(f"timed out; its output so far:\n{exc.stdout}\n{exc.stderr}"[-6000:])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for name in CASES:
        for fmt in ("torch_dist", "legacy"):
            assert f"{name} {fmt}: transformers logits match Megatron's" in run.stdout, run.stdout


def _megatron_lm_args(hcfg, *, tp: int, pp: int, ep: int, fmt: str):
    """The ``args`` Megatron-LM stores: its argument names for the model's shape and split."""
    import argparse

    import torch
    from megatron.core.transformer.enums import AttnBackend

    args = {
        "num_layers": hcfg.num_hidden_layers, "hidden_size": hcfg.hidden_size,
        "ffn_hidden_size": hcfg.intermediate_size, "num_attention_heads": hcfg.num_attention_heads,
        "group_query_attention": hcfg.num_key_value_heads != hcfg.num_attention_heads,
        "num_query_groups": hcfg.num_key_value_heads, "kv_channels": hcfg.head_dim,
        "qk_layernorm": hasattr(hcfg, "num_experts"), "padded_vocab_size": 128,
        "make_vocab_size_divisible_by": 64, "max_position_embeddings": 32, "seq_length": 32,
        "normalization": "RMSNorm", "norm_epsilon": hcfg.rms_norm_eps, "swiglu": True,
        "position_embedding_type": "rope", "rotary_base": 10000, "rotary_percent": 1.0,
        "untie_embeddings_and_output_weights": not hcfg.tie_word_embeddings,
        "add_bias_linear": False, "add_qkv_bias": False, "transformer_impl": "local",
        "spec": None, "attention_backend": AttnBackend.auto, "params_dtype": torch.float32,
        "bf16": False, "fp16": False, "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp, "expert_model_parallel_size": ep,
        "expert_tensor_parallel_size": tp, "virtual_pipeline_model_parallel_size": None,
        "context_parallel_size": 1, "world_size": WORLD, "data_parallel_size": WORLD // (tp * pp),
        "ckpt_format": fmt, "use_dist_ckpt": fmt != "torch", "no_save_optim": True,
        "no_save_rng": False, "iteration": ITERATION, "tokenizer_type": "NullTokenizer",
        "vocab_size": hcfg.vocab_size,
    }  # fmt: skip
    if getattr(hcfg, "num_experts", None):
        dense = set(hcfg.mlp_only_layers)
        args.update(
            num_experts=hcfg.num_experts, moe_ffn_hidden_size=hcfg.moe_intermediate_size,
            moe_router_topk=hcfg.num_experts_per_tok, moe_grouped_gemm=False,
            moe_layer_freq=[int(i not in dense) for i in range(hcfg.num_hidden_layers)],
        )  # fmt: skip
    return argparse.Namespace(**args)


def _rng_state() -> dict:
    """Megatron-LM's ``get_rng_state`` entry (``cuda_rng_state``: the CPU generator's here)."""
    import random

    import numpy as np
    import torch
    from megatron.core import tensor_parallel

    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.get_rng_state(),
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _write(rank: int, root: Path, name: str, ids) -> None:
    """One rank: build its part of the model, run the forward, save both formats."""
    import torch
    import torch.distributed as dist
    import transformers
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.serialization import (
        get_default_save_sharded_strategy,
    )
    from megatron.core.rerun_state_machine import get_rerun_state_machine
    from megatron_core_cpu import init_megatron_on_cpu, megatron_gpt

    torch.set_num_threads(1)
    prefix, extra, (tp, pp, ep) = CASES[name]
    hcfg = getattr(transformers, f"{prefix}Config")(**_COMMON, **extra)
    store = dist.FileStore(str(root / f"{name}.store"), WORLD)
    init_megatron_on_cpu(
        rank=rank, world_size=WORLD, store=store, tensor_parallel=tp, pipeline_parallel=pp,
        expert_parallel=ep,
    )  # fmt: skip
    stage, tp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    ep_rank, dp_rank = ps.get_expert_model_parallel_rank(), ps.get_data_parallel_rank()
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    # One seed per stage: the stage's tensor-parallel ranks cut their shards from the same
    # master weights and hold the same replicated norms (use_cpu_initialization).
    torch.manual_seed(1000 + stage)
    model = megatron_gpt(
        hcfg, qk_layernorm=name != "llama", pre_process=first, post_process=last,
        parallel_output=False,
    )  # fmt: skip
    with torch.no_grad():  # norms away from their initial ones, the same on every replica
        g = torch.Generator().manual_seed(2000 + stage)
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))

    seq, batch = ids.shape[1], ids.shape[0]
    positions = torch.arange(seq).expand_as(ids)
    causal = torch.ones(seq, seq, dtype=torch.bool).triu(1)[None, None]  # True: masked out
    with torch.no_grad():
        if not first:
            hidden = torch.empty(seq, batch, hcfg.hidden_size)
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(ids, positions, causal)
        if not last:
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        elif tp_rank == 0 and ep_rank == 0:
            torch.save(out[..., : hcfg.vocab_size].clone(), root / f"{name}-logits.pt")

    group = ps.get_data_parallel_group(with_context_parallel=True)
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    rerun = get_rerun_state_machine().state_dict(data_iterator=None, ckpt_format="torch_dist")

    # torch_dist: save_checkpoint's dist_checkpointing.save of generate_state_dict's dict.
    folder = root / f"{name}-torch_dist"
    it_dir = folder / f"iter_{ITERATION:07d}"
    if rank == 0:
        it_dir.mkdir(parents=True)
    dist.barrier()
    state = {
        "args": _megatron_lm_args(hcfg, tp=tp, pp=pp, ep=ep, fmt="torch_dist"),
        "checkpoint_version": 3.0, "iteration": ITERATION,
        "model": model.sharded_state_dict(metadata={**metadata, "dp_cp_group": group}),
        "rng_state": ShardedObject(
            "rng_state", [_rng_state()], (pp, tp), (stage, tp_rank), replica_id=dp_rank
        ),
        "rerun_state_machine": rerun, "num_floating_point_operations_so_far": 0,
    }  # fmt: skip
    dist_checkpointing.save(
        state, str(it_dir), get_default_save_sharded_strategy("torch_dist"),
        content_metadata=metadata,
    )  # fmt: skip
    dist.barrier()
    if rank == 0:
        (folder / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))

    # legacy: one torch.save per (tp, pp, ep) rank of data-parallel rank 0.
    folder = root / f"{name}-legacy"
    rank_dir = f"mp_rank_{tp_rank:02d}" + (f"_{stage:03d}" if pp > 1 else "")
    rank_dir += f"_{ep_rank:03d}" if ep > 1 else ""
    if dp_rank == 0 or ps.get_expert_data_parallel_rank() == 0:
        file = folder / f"iter_{ITERATION:07d}" / rank_dir / "model_optim_rng.pt"
        file.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "args": _megatron_lm_args(hcfg, tp=tp, pp=pp, ep=ep, fmt="torch"),
            "checkpoint_version": 3.0, "iteration": ITERATION,
            "model": model.state_dict_for_save_checkpoint(), "rng_state": [_rng_state()],
            "rerun_state_machine": get_rerun_state_machine().state_dict(
                data_iterator=None, ckpt_format="torch"
            ),
            "num_floating_point_operations_so_far": 0,
        }  # fmt: skip
        torch.save(state, file)
    dist.barrier()
    if rank == 0:
        (folder / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    dist.destroy_process_group()


def _check(root: Path) -> None:
    import json
    import multiprocessing
    import time

    import torch
    import transformers
    from safetensors.torch import load_file

    from forge_ckpt.cli import main as forge_convert

    ids = torch.randint(
        0, _COMMON["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1)
    )
    # Every model is written before the test process computes anything (a fork after its
    # intra-op thread pool ran is not safe); megatron and torch are imported once.
    ctx = multiprocessing.get_context("fork")
    start = time.monotonic()
    for name in CASES:
        # Not daemonic: megatron's torch_dist writer forks its own writer processes.
        writers = [ctx.Process(target=_write, args=(r, root, name, ids)) for r in range(WORLD)]
        for w in writers:
            w.start()
        deadline = time.monotonic() + 240
        for w in writers:
            w.join(timeout=max(0.0, deadline - time.monotonic()))
        for w in writers:  # a rank that failed leaves the others waiting in a collective
            if w.is_alive():
                w.kill()
                w.join()
        assert all(w.exitcode == 0 for w in writers), (name, [w.exitcode for w in writers])
        print(f"{name}: written by megatron-core ({time.monotonic() - start:.0f} s)", flush=True)

    for name, (prefix, extra, split) in CASES.items():
        want = torch.load(root / f"{name}-logits.pt")
        hcfg = getattr(transformers, f"{prefix}Config")(**_COMMON, **extra)
        config = root / f"{name}-config.json"
        config.write_text(json.dumps(hcfg.to_dict()))
        tensors = {}
        for fmt in ("torch_dist", "legacy"):
            out = root / f"{name}-{fmt}-hf"
            argv = ["megatron-to-hf", str(root / f"{name}-{fmt}"), str(out)]
            assert forge_convert([*argv, "--hf-config", str(config)]) == 0, (name, fmt)
            hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
            with torch.no_grad():
                got = hf.eval()(ids).logits
            error = ((got - want).norm() / want.norm()).item()
            assert error < TOLERANCE, (name, fmt, error)
            tensors[fmt] = {}
            for file in sorted(out.glob("*.safetensors")):
                tensors[fmt].update(load_file(file))
            print(
                f"{name} {fmt}: transformers logits match Megatron's (tp, pp, ep = {split}); "
                f"relative error {error:.2e}"
            )
        assert tensors["torch_dist"].keys() == tensors["legacy"].keys(), name
        for n, t in tensors["torch_dist"].items():
            assert torch.equal(t, tensors["legacy"][n]), (name, n)


if __name__ == "__main__":
    _check(Path(sys.argv[1]))
