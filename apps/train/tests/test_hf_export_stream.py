"""The streaming Hugging Face export (issue 6: "stream tensors one shard at a time"):
:func:`forge_train.modeling.export_tensors` gathers a parallelized model's tensors one at a
time, merges LoRA adapters per layer and feeds ``forge_models.save_pretrained``. Its folders
are byte-identical to the former export's (the whole state dict gathered on rank 0, loaded
into a plain model, saved), with shards small enough that tensor order decides their files:
on one process (LoRA), and in 4-process pool jobs for PP2 x FSDP2 (tied embedding and head
on the first and last stage, padded vocabulary), PP2 x TP2 with two virtual stages per rank,
TP2 x FSDP2, EP2 x FSDP2 (experts sharded over ep x FSDP), FSDP4 with LoRA and a
DeepSeek-V3-style model with a multi-token prediction module under PP2 x EP2. Without a
pipeline, ``forge_models.save_pretrained`` of the DTensor model itself writes the same files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from forge_core.testing import import_path

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")

#: Small shards: a tensor in the wrong order lands in another file.
_SHARD = "64KB"
_MOE = ("model=tiny-moe", "+model.config.moe.mlp_only_layers=[0]")
_LORA = ('lora={rank:4,alpha:8.0,targets:["*.q_proj","*.v_proj","*.down_proj"]}',)


def _former_gather(parts) -> dict[str, torch.Tensor] | None:
    """The export's former gather (the reference): the whole state dict on rank 0, every
    stage's state sent to every rank of rank 0's pipeline group."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from forge_train.modeling import full_state_dict

    if parts.pipeline is None:
        state = full_state_dict(parts.model)
        return state if not dist.is_initialized() or dist.get_rank() == 0 else None
    full = get_model_state_dict(
        parts.pipeline.stage, options=StateDictOptions(full_state_dict=True)
    )
    local = {name: value.detach().cpu() for name, value in full.items()}
    group = parts.pipeline.group
    parts_: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts_, local, group=group)
    if dist.get_rank() != 0:
        return None
    merged: dict[str, torch.Tensor] = {}
    for part in parts_:
        merged.update(part)
    return merged


def _text_file(root: str) -> str:
    """A small jsonl corpus (the runs are built, not trained: the data only has to load)."""
    path = Path(root) / "corpus.jsonl"
    if not path.exists():
        rows = [json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n" * 8}) for i in range(64)]
        path.write_text("\n".join(rows) + "\n")
    return str(path)


def _random_adapters(model: torch.nn.Module) -> None:
    """Non-zero LoRA ``B`` (zero at initialization), so that the merge changes the weights."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_()


def _exports_match(root: str, name: str, *overrides: str) -> list[str]:
    """Export the built (not trained) model of ``overrides`` both ways; on rank 0 the files
    that differ (``[]``: none; other ranks return ``[]``). Also a pool job."""
    import torch.distributed as dist

    import forge_models
    from forge_train.components import build_components
    from forge_train.compose import compose_run_config
    from forge_train.lora import merge_lora_state_dict
    from forge_train.modeling import export_tensors

    named = any(o.startswith("model=") for o in overrides)  # else the tiny Llama
    cfg = compose_run_config(
        [
            *(() if named else tiny.TINY_MODEL),
            *tiny.TINY_RUN,
            f"train.output_dir={root}/{name}",
            "data=jsonl",
            f"data.paths=[{_text_file(root)}]",
            "data.global_batch_rows=8",  # two micro-batches per pipeline rank
            *overrides,
        ]
    )
    world = dist.get_world_size() if dist.is_initialized() else 1
    parts = build_components(
        cfg, world_size=world, degrees=cfg.parallel.resolve(world), device=torch.device("cpu")
    )
    if cfg.lora is not None:
        _random_adapters(parts.model)
    out = Path(root) / name
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    plain = forge_models.build_model(parts.model_config, device="meta")
    stream = export_tensors(
        parts.model, plain, lora=cfg.lora, is_main=is_main, pipeline=parts.pipeline
    )
    if stream is not None:
        forge_models.save_pretrained(plain, out / "new", max_shard_size=_SHARD, tensors=stream)
    folders = ["new"]
    if parts.pipeline is None and cfg.lora is None:  # save_pretrained of the DTensor model
        written = forge_models.save_pretrained(parts.model, out / "direct", max_shard_size=_SHARD)
        assert (written is not None) == is_main
        folders.append("direct")
    state = _former_gather(parts)
    if not is_main:
        return []
    if cfg.lora is not None:
        state = merge_lora_state_dict(state, scaling=cfg.lora.alpha / cfg.lora.rank)
    former = forge_models.build_model(parts.model_config, device="meta")
    forge_models.materialize(former, "cpu", init=False)
    former.load_state_dict(state)
    forge_models.save_pretrained(former, out / "old", max_shard_size=_SHARD)
    old = sorted(p.name for p in (out / "old").iterdir())
    assert len(old) > 3, old  # several shards and their index
    differ = []
    for folder in folders:
        new = sorted(p.name for p in (out / folder).iterdir())
        if new != old:
            return [f"{folder}: files {new} != {old}"]
        differ += [
            f"{folder}/{f}"
            for f in old
            if (out / folder / f).read_bytes() != (out / "old" / f).read_bytes()
        ]
    return differ


def test_one_process_lora_export_is_the_former_export(tmp_path):
    with tiny.reference_kernels():
        assert _exports_match(str(tmp_path), "lora", *_LORA) == []


def test_parallel_exports_are_the_former_export(tmp_path, dist_pool):
    pool = dist_pool(4)
    root = str(tmp_path)
    _text_file(root)  # before the ranks read it
    pad = "+model.config.vocab_pad_multiple=96"
    layouts = {
        "pp2_fsdp2": ("parallel=pp2-fsdp", "model.init_device=meta", pad),
        # Interleaved: rank 0 holds layers 0 and 2, rank 1 layers 1 and 3.
        "pp2_tp2_virtual": (
            "parallel=pp2-fsdp",
            "parallel.tp=2",
            "parallel.sequence_parallel=true",
            "parallel.pp_schedule=interleaved_1f1b",
            "parallel.pp_virtual_stages=2",
            "model.config.num_layers=4",
        ),
        "tp2_fsdp2": ("parallel=tp2-fsdp", pad),
        "ep2_fsdp2": (*_MOE, "parallel=ep2-fsdp", "model.init_device=meta"),
        "fsdp4_lora": ("parallel=fsdp", *_LORA),
        # DeepSeek-V3-style (MLA, MoE with expert bias) with a multi-token prediction module
        # on the last stage, which holds a copy of the first stage's embedding; PP2 x EP2.
        "pp2_ep2_mtp": (
            "model=tiny-deepseek",
            "+model.config.mtp_depth=1",
            "parallel=pp2-fsdp",
            "parallel.ep=2",
            "model.init_device=meta",
        ),
    }
    for name, layout in layouts.items():
        ranks = pool.run(_exports_match, root, name, *layout)
        assert ranks == [[]] * 4, (name, ranks)


def _failing_export(root: str) -> str:
    """Export an FSDP model into a folder rank 0 cannot create; what each rank saw (a pool
    job). Rank 0's writer fails before consuming the stream of collective gathers."""
    import torch.distributed as dist

    from forge_train.components import build_components
    from forge_train.compose import compose_run_config
    from forge_train.modeling import export_hf

    cfg = compose_run_config(
        [
            *tiny.TINY_MODEL,
            *tiny.TINY_RUN,
            f"train.output_dir={root}/failing",
            "data=jsonl",
            f"data.paths=[{_text_file(root)}]",
            "data.global_batch_rows=8",
            "parallel=fsdp",
        ]
    )
    world = dist.get_world_size()
    parts = build_components(
        cfg, world_size=world, degrees=cfg.parallel.resolve(world), device=torch.device("cpu")
    )
    blocker = Path(root) / "a_file"
    if dist.get_rank() == 0:
        blocker.write_text("not a folder")
    try:
        export_hf(
            parts.model, parts.model_config, blocker / "hf", tokenizer=None, lora=None,
            dtype=None, is_main=dist.get_rank() == 0,
        )  # fmt: skip
    except OSError as exc:
        return f"raised {type(exc).__name__}"
    return "returned"


def test_a_failing_writer_does_not_leave_the_other_ranks_waiting(tmp_path, dist_pool):
    """The main process's error comes after it has run the rest of the stream's gathers: the
    other ranks return at once instead of waiting in a collective until the timeout."""
    root = str(tmp_path)
    _text_file(root)
    ranks = dist_pool(4).run(_failing_export, root, timeout=120)
    assert ranks[0].startswith("raised "), ranks
    assert ranks[1:] == ["returned"] * 3, ranks


def test_incomplete_lora_layers_are_named():
    from forge_train.lora import merge_lora_tensors

    weight = torch.ones(2, 2)
    stream = merge_lora_tensors([("q.base.weight", weight), ("q.lora_A", weight)], scaling=1.0)
    with pytest.raises(ValueError, match=r"'q': \['base.weight', 'lora_A'\]"):
        list(stream)
