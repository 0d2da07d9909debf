"""Benchmark training checkpoints and Hugging Face loading against their baselines, in one run.

    python packages/forge-ckpt/benchmarks/bench_checkpoint.py            # ~0.5 GB state, ~134M HF
    python packages/forge-ckpt/benchmarks/bench_checkpoint.py --smoke    # tiny sizes, seconds

1. Disk baseline: a plain file of the checkpoint's size written with ``write`` + ``fsync`` and
   read back cold (its pages evicted with ``posix_fadvise(DONTNEED)`` after the fsync).
2. ``CheckpointManager`` (one process): a model of ``--state-mb`` MB of float32 weights with
   its AdamW state (3x the weights in total) saved synchronously (until complete, fsync
   included), saved asynchronously (time training is blocked for, and time until complete)
   and loaded cold into a fresh model and optimizer. GB/s counts the bytes of the files
   written (``.distcp`` + metadata).
3. HF loading: a random-weight Llama of about ``--hf-params`` parameters saved by
   ``transformers`` (safetensors, float32), loaded by ``forge_models.from_pretrained`` and by
   ``transformers.AutoModelForCausalLM.from_pretrained`` (best of ``--repeats``, warm page
   cache for both), with a check that both hold the same weights.

Figures depend on the disk and on how busy the machine is: compare the columns of one run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from forge_ckpt.training import CheckpointConfig, CheckpointManager

warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def evict(path: Path) -> None:
    """Drop a file's (clean) pages from the page cache, so the next read hits the disk."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def raw_disk(path: Path, nbytes: int, chunk: int = 64 << 20) -> tuple[float, float]:
    """Seconds to write ``nbytes`` (write + fsync) and to read them back cold."""
    block = os.urandom(min(chunk, nbytes))
    start = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)
        f.flush()
        os.fsync(f.fileno())
    write_s = time.perf_counter() - start
    evict(path)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(chunk):
            pass
    read_s = time.perf_counter() - start
    path.unlink()
    return write_s, read_s


class Wide(nn.Module):
    def __init__(self, numel: int, layers: int = 8) -> None:
        super().__init__()
        dim = int((numel // layers) ** 0.5)
        self.layers = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(layers))


def build_state(numel: int):
    model = Wide(numel)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # creates the two moments
    opt.zero_grad()
    return model, opt


def bench_training_checkpoint(root: Path, state_mb: int, repeats: int) -> list[tuple]:
    model, opt = build_state(state_mb * (1 << 20) // 4)
    rows = []
    sync_s, async_block_s, async_total_s, load_s, nbytes = [], [], [], [], 0
    for i in range(repeats):
        for mode in ("sync", "async"):
            directory = root / f"{mode}{i}"
            config = CheckpointConfig(
                directory=directory, async_save=mode == "async", save_rng=False
            )
            with CheckpointManager(config) as manager:
                start = time.perf_counter()
                path = manager.save(1, model=model, optimizer=opt)
                blocked = time.perf_counter() - start
                manager.wait()
                total = time.perf_counter() - start
            nbytes = folder_bytes(path)
            if mode == "sync":
                sync_s.append(total)
            else:
                async_block_s.append(blocked)
                async_total_s.append(total)
        fresh_model, fresh_opt = build_state(state_mb * (1 << 20) // 4)
        evict(path)
        start = time.perf_counter()
        CheckpointManager(CheckpointConfig(directory=path.parent)).load(
            1, model=fresh_model, optimizer=fresh_opt
        )
        load_s.append(time.perf_counter() - start)
        assert all(
            torch.equal(a, b)
            for a, b in zip(model.parameters(), fresh_model.parameters(), strict=True)
        )
        for mode in ("sync", "async"):
            shutil.rmtree(root / f"{mode}{i}")
    raw = [raw_disk(root / "raw.bin", nbytes) for _ in range(repeats)]
    raw_w, raw_r = min(w for w, _ in raw), min(r for _, r in raw)
    gb = nbytes / 1e9
    rows.append(("raw file write + fsync", gb, raw_w, gb / raw_w, 1.0))
    rows.append(("ckpt save (sync)", gb, min(sync_s), gb / min(sync_s), raw_w / min(sync_s)))
    rows.append(
        ("ckpt async: training blocked", gb, min(async_block_s), float("nan"), float("nan"))
    )
    rows.append(
        (
            "ckpt async: until complete",
            gb,
            min(async_total_s),
            gb / min(async_total_s),
            raw_w / min(async_total_s),
        )
    )
    rows.append(("raw file read (cold)", gb, raw_r, gb / raw_r, 1.0))
    rows.append(("ckpt load (cold)", gb, min(load_s), gb / min(load_s), raw_r / min(load_s)))
    return rows


def llama_config(params: int):
    from transformers import LlamaConfig

    # Llama-shaped: hidden h, 12 layers, MLP 8/3 h, 32k vocab, untied head
    for hidden in range(256, 4096, 64):
        layers, inter, vocab = 12, int(hidden * 8 / 3) // 64 * 64, 32000
        n = 2 * vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * inter)
        if n >= params:
            break
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        tie_word_embeddings=False,
    ), n


def bench_hf_load(root: Path, params: int, repeats: int) -> list[tuple]:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    import forge_models

    config, n = llama_config(params)
    folder = root / "hf"
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    gb = folder_bytes(folder) / 1e9
    times: dict[str, list[float]] = {"forge_models.from_pretrained": [], "transformers": []}
    for _ in range(repeats):
        start = time.perf_counter()
        forge = forge_models.from_pretrained(folder, dtype=torch.float32)
        times["forge_models.from_pretrained"].append(time.perf_counter() - start)
        start = time.perf_counter()
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        times["transformers"].append(time.perf_counter() - start)
    # same weights: the embedding and the last layer's down projection
    hf_state = hf.state_dict()
    forge_embed = next(t for name, t in forge.state_dict().items() if "embed" in name)
    assert torch.equal(forge_embed, hf_state["model.embed_tokens.weight"])
    base = min(times["transformers"])
    return [
        (f"{name} ({n / 1e6:.0f}M params)", gb, min(t), gb / min(t), base / min(t))
        for name, t in times.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-mb", type=int, default=512, help="model weights in MB")
    parser.add_argument("--hf-params", type=float, default=134e6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.state_mb, args.hf_params, args.repeats = 8, 20e6, 1
    root = Path(tempfile.mkdtemp(prefix="forge_bench_ckpt_", dir=args.dir))
    try:
        rows = bench_training_checkpoint(root, args.state_mb, args.repeats)
        rows += bench_hf_load(root, int(args.hf_params), args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, scratch {root.parent}")
    print(f"{'case':44s} {'GB':>7s} {'seconds':>8s} {'GB/s':>7s} {'x baseline':>10s}")
    for name, gb, seconds, rate, ratio in rows:
        print(f"{name:44s} {gb:7.3f} {seconds:8.3f} {rate:7.2f} {ratio:10.2f}")
    print("baseline: raw write for saves, raw read for loads, transformers for HF loads")


if __name__ == "__main__":
    main()
