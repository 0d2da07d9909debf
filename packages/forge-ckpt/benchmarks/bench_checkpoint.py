"""Benchmark training checkpoints and Hugging Face loading against their baselines, in one run.

    python packages/forge-ckpt/benchmarks/bench_checkpoint.py            # ~0.5 GB state, ~134M HF
    python packages/forge-ckpt/benchmarks/bench_checkpoint.py --smoke    # tiny sizes, seconds

1. Disk baseline: a plain file of the checkpoint's size written with ``write`` + ``fsync`` and
   read back cold (its pages evicted with ``posix_fadvise(DONTNEED)`` after the fsync).
2. ``CheckpointManager`` (one process): a model of ``--state-mb`` MB of float32 weights with
   its AdamW state (3x the weights in total) saved synchronously (until complete, fsync
   included) and asynchronously (time training is blocked for, and time until complete),
   ``--repeats + 1`` times with one manager per mode, as training saves: the first save
   (an async save allocates its CPU staging copy then) and the best later one (the staging
   copy is reused) are reported apart; then loaded cold into a fresh model and optimizer.
   GB/s counts the bytes of the files written (``.distcp`` + metadata).
3. HF loading: a random-weight Llama of about ``--hf-params`` parameters saved by
   ``transformers`` (safetensors, float32), loaded by ``forge_models.from_pretrained`` (default:
   unfused weights keep the file's memory-mapped pages; and with ``mmap=False``: every weight
   copied) and by ``transformers.AutoModelForCausalLM.from_pretrained``, each load in a fresh
   process as a job loads its model (after an untimed load of a tiny model of the same kind,
   so imports and first-call set-up are not timed; best of ``--repeats``; warm page
   cache for all), with a check that all hold the same weights. Both default loaders map the
   file and read a page on its first use, so each is also timed until every weight has been
   read once ("+ read every weight", against transformers doing the same). ``--before-src``
   times an older forge-models / forge-ckpt the same way::

       git archive <commit> packages/forge-models/src packages/forge-ckpt/src | tar -x -C /tmp/old
       python .../bench_checkpoint.py --before-src /tmp/old/packages/forge-models/src \\
           /tmp/old/packages/forge-ckpt/src

4. Sharded HF loading (``--part sharded``): one rank's ``forge_models.sharded_load.
   load_hf_shards`` of the same Llama folder, for the whole model in one process, FSDP rank 1
   of 4 and rank 1 of TP2 x FSDP2 (the rank's real placements under the fake process group: no
   communication, each rank's reads are its own), with contiguous shards read straight into
   the parameters (``direct``, one ``preadv`` each) against every box read through the
   memory-mapped slice reader and copied (``direct=False``, the path before), page cache
   cold (the folder's pages evicted before each load) and warm; best of ``--repeats``.

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
    """Save ``repeats + 1`` times per mode with one manager each (as training does): the first
    save allocates the CPU staging copy of an async save, later ones reuse it."""
    model, opt = build_state(state_mb * (1 << 20) // 4)
    blocked: dict[str, list[float]] = {"sync": [], "async": []}
    complete: dict[str, list[float]] = {"sync": [], "async": []}
    for mode in ("sync", "async"):
        config = CheckpointConfig(
            directory=root / mode, async_save=mode == "async", save_rng=False, keep_last_n=1
        )
        with CheckpointManager(config) as manager:
            for step in range(1, repeats + 2):
                with torch.no_grad():  # a training step changes the weights in place
                    for p in model.parameters():
                        p.add_(1e-3)
                start = time.perf_counter()
                path = manager.save(step, model=model, optimizer=opt)
                blocked[mode].append(time.perf_counter() - start)
                manager.wait()
                complete[mode].append(time.perf_counter() - start)
        if mode == "async":
            shutil.rmtree(root / "sync")
    nbytes = folder_bytes(path)
    load_s = []
    for _ in range(repeats):
        fresh_model, fresh_opt = build_state(state_mb * (1 << 20) // 4)
        evict(path)
        start = time.perf_counter()
        CheckpointManager(CheckpointConfig(directory=path.parent)).load(
            path, model=fresh_model, optimizer=fresh_opt
        )
        load_s.append(time.perf_counter() - start)
        assert all(
            torch.equal(a, b)
            for a, b in zip(model.parameters(), fresh_model.parameters(), strict=True)
        )
    shutil.rmtree(root / "async")
    raw = [raw_disk(root / "raw.bin", nbytes) for _ in range(repeats)]
    raw_w, raw_r = min(w for w, _ in raw), min(r for _, r in raw)
    gb = nbytes / 1e9
    nan = float("nan")
    rows = [("raw file write + fsync", gb, raw_w, gb / raw_w, 1.0)]
    for label, pick in (("first save", lambda t: t[0]), ("later saves", lambda t: min(t[1:]))):
        sync_s, async_s = pick(complete["sync"]), pick(complete["async"])
        rows += [
            (f"ckpt save (sync), {label}", gb, sync_s, gb / sync_s, raw_w / sync_s),
            (f"ckpt async, {label}: training blocked", gb, pick(blocked["async"]), nan, nan),
            (f"ckpt async, {label}: until complete", gb, async_s, gb / async_s, raw_w / async_s),
        ]
    rows.append(("raw file read (cold)", gb, raw_r, gb / raw_r, 1.0))
    rows.append(("ckpt load (cold)", gb, min(load_s), gb / min(load_s), raw_r / min(load_s)))
    return rows


def llama_config(params: int, *, vocab: int = 32000, layers: int = 12):
    """A Llama config of about ``params`` parameters: the smallest hidden size (a multiple of
    64) that reaches it with ``layers`` layers, an 8/3 h MLP, ``vocab`` tokens, untied head."""
    from transformers import LlamaConfig

    for hidden in range(64, 4096, 64):
        inter = int(hidden * 8 / 3) // 64 * 64
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


def touch_all(model: nn.Module) -> float:
    """Read every weight once (a memory-mapped weight is paged in on its first read)."""
    total = 0.0
    with torch.no_grad():
        for t in model.state_dict().values():
            total += float(t.sum())
    return total


def load_once(loader: str, folder: str, warmup: str) -> None:
    """In a fresh process: load the tiny ``warmup`` folder (lazy imports and first-call set-up,
    not timed), then ``folder`` once; print the seconds until loaded and until every weight
    was read once, and the embedding's checksum."""
    if loader == "transformers":
        from transformers import AutoModelForCausalLM

        def load(path: str) -> nn.Module:
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        import forge_models

        options = {"mmap": False} if loader == "forge-copy" else {}

        def load(path: str) -> nn.Module:
            return forge_models.from_pretrained(path, dtype=torch.float32, **options)

    load(warmup)
    start = time.perf_counter()
    model = load(folder)
    loaded = time.perf_counter() - start
    touch_all(model)
    touched = time.perf_counter() - start
    embed = next(t for name, t in model.state_dict().items() if "embed" in name)
    print(f"RESULT {loaded} {touched} {float(embed.double().sum())!r}")


LOADERS = {
    "forge": "forge_models.from_pretrained",
    "forge-copy": "forge_models.from_pretrained(mmap=False)",
    "transformers": "transformers",
}


def bench_hf_load(
    root: Path,
    params: int,
    repeats: int,
    before_src: list[str] | None = None,
    llama: dict | None = None,
) -> list[tuple]:
    """Each load in a fresh process (imports not timed), as a job loads its model: best of
    ``repeats`` processes per loader, interleaved. ``before_src``: source folders of an older
    forge-ckpt / forge-models (e.g. ``git archive``) timed the same way, as "before"."""
    import subprocess
    import sys

    from transformers import LlamaForCausalLM

    config, n = llama_config(params, **(llama or {}))
    folder = root / "hf"
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1}
    small |= {"vocab_size": 128, "num_attention_heads": 1, "num_key_value_heads": 1}
    tiny = config.__class__(**{**config.to_dict(), **small})
    LlamaForCausalLM(tiny).save_pretrained(root / "hf_warmup")
    gb = folder_bytes(folder) / 1e9
    runs = [(name, label, None) for name, label in LOADERS.items()]
    if before_src:
        path = os.pathsep.join(before_src)
        runs.append(("forge", "forge_models.from_pretrained, before", path))
    times: dict[str, list[tuple[float, float]]] = {}
    sums = set()
    for _ in range(repeats):
        for loader, label, pythonpath in runs:
            env = dict(os.environ)
            if pythonpath:
                env["PYTHONPATH"] = pythonpath
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--load-once",
                    loader,
                    str(folder),
                    str(root / "hf_warmup"),
                ],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            _, loaded, touched, checksum = next(
                line for line in out.splitlines() if line.startswith("RESULT ")
            ).split()
            times.setdefault(label, []).append((float(loaded), float(touched)))
            sums.add(checksum)
    assert len(sums) == 1, f"the loaders disagree on the embedding: {sums}"
    base = times["transformers"]
    rows = []
    for label, t in times.items():
        for k, suffix in ((0, ""), (1, " + read every weight")):
            best = min(x[k] for x in t)
            rows.append(
                (
                    f"{label}{suffix} ({n / 1e6:.0f}M)",
                    gb,
                    best,
                    gb / best,
                    min(x[k] for x in base) / best,
                )
            )
    return rows


def _sharded_model(config, layout: str):
    """A meta-device forge model parallelized as ``layout`` on this (fake) rank."""
    import forge_parallel
    from forge_core import ParallelDims
    from forge_models import registry

    model = registry.build_model(config, device="meta")
    if layout == "fsdp4":
        forge_parallel.parallelize(model, ParallelDims(world_size=4, dp_shard=4))
    elif layout == "tp2xfsdp2":
        plan = registry.get_family(config.family).parallel_plan(sequence_parallel=False)
        forge_parallel.parallelize(model, ParallelDims(world_size=4, tp=2, dp_shard=2), plan=plan)
    return model.to_empty(device="cpu")


def bench_sharded_load(
    root: Path, params: int, repeats: int, llama: dict | None = None
) -> list[tuple]:
    """See the module docstring (part 4)."""
    from transformers import LlamaForCausalLM

    from forge_ckpt import HFCheckpoint
    from forge_core.testing import fake_process_group
    from forge_models import registry
    from forge_models.sharded_load import load_hf_shards

    hf_config, n = llama_config(params, **(llama or {}))
    folder = root / "hf_sharded"
    torch.manual_seed(0)
    LlamaForCausalLM(hf_config).save_pretrained(folder)
    raw = HFCheckpoint(folder).config
    config = registry.family_for_hf_config(raw).config_from_hf(raw)
    rows = []
    with fake_process_group(world_size=4, rank=1):
        for layout in ("whole", "fsdp4", "tp2xfsdp2"):
            best: dict[tuple[bool, bool], float] = {}
            gb = 0.0
            for _ in range(repeats):
                for direct in (False, True):
                    for cold in (True, False):
                        model = _sharded_model(config, layout)
                        if cold:
                            evict(folder)
                        start = time.perf_counter()
                        report = load_hf_shards(model, folder, direct=direct)
                        seconds = time.perf_counter() - start
                        key = (direct, cold)
                        best[key] = min(best.get(key, seconds), seconds)
                        gb = report.bytes_read / 1e9
                        del model
            for cold in (True, False):
                for direct in (False, True):
                    label = "direct (preadv)" if direct else "slice reader (before)"
                    seconds = best[direct, cold]
                    rows.append(
                        (
                            f"sharded load {layout} rank 1, {'cold' if cold else 'warm'}, {label}",
                            gb,
                            seconds,
                            gb / seconds,
                            best[False, cold] / seconds,
                        )
                    )
    print(f"sharded load: {n / 1e6:.0f}M Llama, float32, {folder_bytes(folder) / 1e9:.3f} GB")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-mb", type=int, default=512, help="model weights in MB")
    parser.add_argument("--hf-params", type=float, default=134e6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that it runs")
    parser.add_argument("--part", choices=("all", "training", "hf", "sharded"), default="all")
    parser.add_argument(
        "--before-src",
        nargs="+",
        default=None,
        help="src folders of an older forge-ckpt and forge-models to time as 'before'",
    )
    parser.add_argument(
        "--load-once", nargs=3, metavar=("LOADER", "FOLDER", "WARMUP"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.load_once:
        load_once(*args.load_once)
        return
    llama = {}  # the Llama shape: 12 layers, a 32k vocabulary
    if args.smoke:  # a few MB: checks that every part runs (tests/test_benchmark.py)
        args.state_mb, args.hf_params, args.repeats = 2, 1e6, 1
        llama = {"vocab": 1024, "layers": 2}
    root = Path(tempfile.mkdtemp(prefix="forge_bench_ckpt_", dir=args.dir))
    try:
        rows = []
        if args.part in ("all", "training"):
            rows += bench_training_checkpoint(root, args.state_mb, args.repeats)
        if args.part in ("all", "hf"):
            rows += bench_hf_load(root, int(args.hf_params), args.repeats, args.before_src, llama)
        if args.part in ("all", "sharded"):
            rows += bench_sharded_load(root, int(args.hf_params), args.repeats, llama)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, scratch {root.parent}")
    print(f"{'case':68s} {'GB':>7s} {'seconds':>8s} {'GB/s':>7s} {'x baseline':>10s}")
    for name, gb, seconds, rate, ratio in rows:
        print(f"{name:68s} {gb:7.3f} {seconds:8.3f} {rate:7.2f} {ratio:10.2f}")
    print(
        "baseline: raw write for saves, raw read for loads, transformers for HF loads, the "
        "slice reader (before) for sharded loads"
    )


if __name__ == "__main__":
    main()
