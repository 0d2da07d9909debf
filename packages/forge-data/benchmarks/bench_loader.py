"""Benchmark: loader throughput (samples/s and tokens/s on one CPU core) vs a plain DataLoader.

Tokenizes part of the Python standard library with ``forge-preprocess`` (default tokenizer,
cached), then reads the same shards two ways in this process (``num_workers=0``, so the figures
are per CPU core):

* forge: ``PackedLoader`` (shuffle, packing into ``--seq-len`` rows, load balancing, collation
  with labels / position ids / cu_seqlens);
* baseline: ``torch.utils.data.DataLoader`` over a map-style dataset of the same documents
  (shuffled, each truncated to ``--seq-len``, padded to the batch's longest) - what a plain
  PyTorch loop reading the same memory-mapped data does.

Documents/s counts documents (pieces) delivered; tokens/s counts non-padding tokens (forge: the
pieces' lengths; baseline: the documents' lengths, both known without a pass over the batch).
The two loaders run in alternating rounds and the median round is reported, so a neighbour's
load on a shared machine hits both alike. With ``--mixture`` both read a ``MixtureDataset``
blending the shards (each its own ``TokenDataset``) with weights 4:3:2:1, as many documents as
the shards hold, and a third loader runs in the same rounds: forge reading that mixture one
``document()`` call per piece (what the loader did before ``MixtureDataset.gather``), so the
gain of the vectorized gather is measured under the same load.

    python packages/forge-data/benchmarks/bench_loader.py
    python packages/forge-data/benchmarks/bench_loader.py --mixture
    python packages/forge-data/benchmarks/bench_loader.py --smoke
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from forge_data.loader import LoaderConfig, PackedLoader, TokenDataset
from forge_data.mixture import MixtureDataset
from forge_data.preprocess import PreprocessConfig, preprocess
from forge_data.tokenizer import default_tokenizer, stdlib_corpus_files


class Docs(torch.utils.data.Dataset):
    def __init__(self, dataset: TokenDataset | MixtureDataset, seq_len: int):
        self.dataset, self.seq_len = dataset, seq_len

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        ids, _ = self.dataset.document(i)
        return torch.from_numpy(ids[: self.seq_len].astype(np.int64))


class PerDocument:
    """A dataset seen only through ``document(i)`` (no ``gather``): the per-piece path."""

    def __init__(self, dataset):
        self.dataset, self.lengths = dataset, dataset.lengths

    def __len__(self):
        return len(self.dataset)

    def document(self, i):
        return self.dataset.document(i)


def pad(batch):
    out = torch.zeros(len(batch), max(b.numel() for b in batch), dtype=torch.long)
    for i, b in enumerate(batch):
        out[i, : b.numel()] = b
    return out, sum(b.numel() for b in batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--files", type=int, default=300)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--rows", type=int, default=8, help="rows per step (forge) / batch size")
    p.add_argument("--seconds", type=float, default=3.0, help="per loader and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--mixture", action="store_true", help="read a 4:3:2:1 blend of the shards")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if args.smoke:
        args.files, args.seconds, args.rounds = 40, 1.0, 1
    tok = default_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = PreprocessConfig(
            inputs=stdlib_corpus_files(args.files), output_dir=tmp, progress=False, num_shards=4
        )
        manifest = preprocess(cfg, tok)
        ds = TokenDataset(tmp)
        print(f"data: {manifest['documents']} documents, {manifest['tokens']} tokens")
        if args.mixture:
            parts = [TokenDataset([s.prefix]) for s in ds.shards]
            ds = MixtureDataset(parts, [4, 3, 2, 1][: len(parts)], num_documents=len(ds))
            print(f"mixture of {len(parts)} shards: {len(ds)} documents, {ds.lengths.sum()} tokens")

        def run(batches):
            docs = toks = 0
            t = time.perf_counter()
            while time.perf_counter() - t < args.seconds:
                d, n = next(batches)
                docs, toks = docs + d, toks + n
            dt = time.perf_counter() - t
            return docs / dt, toks / dt

        def forge(data=ds):
            cfg = LoaderConfig(
                seq_len=args.seq_len, global_batch_rows=args.rows, micro_batch_rows=args.rows
            )
            loader = PackedLoader(data, cfg, dp_rank=0, dp_size=1)
            while True:
                (micro,) = next(loader)
                yield micro["pieces"].shape[0], int(micro["pieces"][:, 4].sum())

        def baseline():
            while True:
                dl = torch.utils.data.DataLoader(
                    Docs(ds, args.seq_len), batch_size=args.rows, shuffle=True, collate_fn=pad
                )
                for batch, n in dl:
                    yield batch.shape[0], n

        forge_batches, baseline_batches = forge(), baseline()
        per_doc = forge(PerDocument(ds)) if args.mixture else None
        rounds, per_doc_rounds = [], []
        for _ in range(args.rounds):
            rounds.append((run(forge_batches), run(baseline_batches)))
            if per_doc is not None:
                per_doc_rounds.append(run(per_doc))
        print(
            f"{'round':6} {'forge docs/s':>13} {'tokens/s':>12} {'baseline docs/s':>16} "
            f"{'tokens/s':>12} {'ratio':>6}"
        )
        for i, (f, b) in enumerate(rounds):
            print(f"{i:<6} {f[0]:13.0f} {f[1]:12.0f} {b[0]:16.0f} {b[1]:12.0f} {f[1] / b[1]:6.2f}")
        f, b = rounds[int(np.argsort([f[1] / b[1] for f, b in rounds])[len(rounds) // 2])]
        print(
            f"median round: forge {f[1] / 1e6:.1f} M tokens/s, baseline {b[1] / 1e6:.1f} M "
            f"tokens/s, forge / baseline {f[1] / b[1]:.2f}x"
        )
        if per_doc_rounds:
            gains = [f[1] / p[1] for (f, _), p in zip(rounds, per_doc_rounds, strict=True)]
            mid = int(np.argsort(gains)[len(gains) // 2])
            print(
                "forge reading the mixture one document() per piece, per round: "
                + ", ".join(f"{p[1] / 1e6:.1f}" for p in per_doc_rounds)
                + f" M tokens/s; median round: gather / per-document {gains[mid]:.2f}x "
                f"({rounds[mid][0][1] / 1e6:.1f} vs {per_doc_rounds[mid][1] / 1e6:.1f} M tokens/s)"
            )


if __name__ == "__main__":
    main()
