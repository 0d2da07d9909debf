"""Benchmark: load-aware DP balancing vs naive assignment, simulated for DP sizes 8 .. 1024.

Two length distributions, both available offline:

* ``stdlib``: the token lengths of the Python standard library's source files under the default
  forge tokenizer (byte-level BPE trained on the same corpus, cached);
* ``mixture``: a long-tailed web-like mixture (log-normal lengths), 0.5% very long documents
  (32k-256k tokens) and 20% image samples (64 text tokens + 576 image tokens, plus an image
  encoder cost).

Documents are shuffled and packed into rows of ``--seq-len`` tokens (forge's packer). Each
simulated step draws ``dp * rows_per_rank`` rows; the cost of a row is the sum over its
documents of ``a*len + b*len^2`` (``QuadraticCost``, ``b = 1/(12*hidden)``) plus the image
encoder cost. For every DP size it prints the max/mean rank cost ratio (mean and worst over the
steps) of the naive contiguous split and of forge's balancer, a lower bound no layout with equal
rows per rank can beat (worst step), and the balancer's CPU time per
step (process CPU time, median over steps, of the rank assignment plus this rank's
micro-batch split: what each rank computes).

    python packages/forge-data/benchmarks/bench_balance.py
    python packages/forge-data/benchmarks/bench_balance.py --smoke      # quick check
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from forge_data.balance import QuadraticCost, balance_step, imbalance
from forge_data.document_balance import balance_step_documents
from forge_data.packing import pack_documents


def stdlib_lengths(max_files: int | None) -> np.ndarray:
    from forge_data.tokenizer import default_tokenizer, stdlib_corpus_files

    tok = default_tokenizer()
    files = stdlib_corpus_files(max_files)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    return np.array([len(ids) for ids in tok.encode_batch(texts)], dtype=np.int64)


def mixture(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Lengths and per-document extra cost (image encoder) of a long-tailed mixture."""
    lengths = np.maximum(rng.lognormal(6.5, 1.3, n).astype(np.int64), 8)
    kind = rng.random(n)
    long = kind < 0.005
    lengths[long] = rng.integers(32_768, 262_144, long.sum())
    image = (kind >= 0.005) & (kind < 0.205)
    lengths[image] = 64 + 576
    extra = np.where(image, 2_000.0, 0.0)
    return lengths, extra


def pool_rows(lengths, extra, *, seq_len, rows, cost, rng):
    """Row costs of a pool of packed rows (documents resampled until ``rows`` are filled)."""
    need = int(rows * seq_len / max(lengths.mean(), 1) * 1.1) + 16
    pick = rng.integers(0, lengths.size, need)
    plan = pack_documents(np.arange(need), lengths[pick], seq_len=seq_len, window=16)
    doc_extra = extra[pick][plan.doc] * (plan.start == 0)
    piece_costs = cost.doc_costs(plan.length) + doc_extra
    costs = np.bincount(plan.row, weights=piece_costs, minlength=plan.num_rows)
    return costs, plan, piece_costs


def step_pieces(plan, piece_costs, picked):
    """Row (in the step), length and cost of every piece of the rows ``picked`` of the pool."""
    counts = np.diff(plan.row_offsets)[picked]
    first = plan.row_offsets[picked]
    idx = np.repeat(first - (np.cumsum(counts) - counts), counts) + np.arange(counts.sum())
    return np.repeat(np.arange(picked.size), counts), plan.length[idx], piece_costs[idx]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=32_768)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--rows-per-rank", type=int, default=4)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dp", type=int, nargs="*", default=[8, 32, 128, 512, 1024])
    p.add_argument("--stdlib-files", type=int, default=None)
    p.add_argument("--refine-steps", type=int, default=None, help="default: 4")
    p.add_argument("--document-steps", type=int, default=16, help="document exchanges per step")
    p.add_argument("--sources", nargs="*", default=["stdlib", "mixture"])
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated data and steps")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if args.smoke:
        args.dp, args.steps, args.stdlib_files, args.seq_len = [8, 64], 3, 60, 4096
    cost = QuadraticCost(a=1.0, b=1.0 / (12 * args.hidden))
    rng = np.random.default_rng(args.seed)
    sources = {}
    if "stdlib" in args.sources:
        t0 = time.perf_counter()
        lengths = stdlib_lengths(args.stdlib_files)
        sources["stdlib"] = (lengths, np.zeros(lengths.size))
        print(
            f"stdlib: {lengths.size} files, {lengths.sum()} tokens, median "
            f"{int(np.median(lengths))}, max {lengths.max()} "
            f"({time.perf_counter() - t0:.1f}s to tokenize)"
        )
    if "mixture" in args.sources:
        sources["mixture"] = mixture(200_000, rng)
    print(
        f"seq_len={args.seq_len} hidden={args.hidden} rows/rank={args.rows_per_rank} "
        f"micro-batches={args.micro_batches} steps={args.steps}; cost a*len + len^2/(12*hidden)"
    )
    header = (
        f"{'data':8} {'dp':>5} {'naive mean':>10} {'naive max':>10} {'rows mean':>10} "
        f"{'rows max':>9} {'bound':>7} {'ms/step':>8} {'docs mean':>10} {'docs max':>9} "
        f"{'ms/step':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, (lens, extra) in sources.items():
        max_rows = max(args.dp) * args.rows_per_rank
        pool, plan, piece_costs = pool_rows(
            lens, extra, seq_len=args.seq_len, rows=max_rows * 2, cost=cost, rng=rng
        )
        for dp in args.dp:
            g = dp * args.rows_per_rank
            naive, forge, bound, times, docs, doc_times = [], [], [], [], [], []
            for _ in range(args.steps):
                picked = rng.choice(pool.size, g, replace=False)
                rows = pool[picked]
                t = time.process_time()
                _layout, report = balance_step(
                    rows,
                    dp_size=dp,
                    micro_batches=args.micro_batches,
                    rank=0,
                    refine_steps=args.refine_steps,
                )
                times.append((time.process_time() - t) * 1e3)
                naive.append(report.naive)
                # No layout beats: the heaviest row plus the lightest rows_per_rank - 1 others.
                mean = rows.sum() / dp
                light = np.sort(rows)[: args.rows_per_rank - 1].sum()
                bound.append(max(rows.max() + light, mean) / mean)
                forge.append(report.balanced)
                assert imbalance(rows.reshape(dp, -1).sum(1)) == report.naive
                piece_row, length, piece_cost = step_pieces(plan, piece_costs, picked)
                t = time.process_time()
                _rows, _layout, doc_report = balance_step_documents(
                    piece_row,
                    length,
                    piece_cost,
                    n_rows=g,
                    seq_len=args.seq_len,
                    dp_size=dp,
                    micro_batches=args.micro_batches,
                    rank=0,
                    refine_steps=args.refine_steps,
                    document_steps=args.document_steps,
                )
                doc_times.append((time.process_time() - t) * 1e3)
                docs.append(doc_report.balanced)
            print(
                f"{name:8} {dp:5d} {np.mean(naive):10.3f} {np.max(naive):10.3f} "
                f"{np.mean(forge):10.3f} {np.max(forge):9.3f} {np.max(bound):7.3f} "
                f"{np.median(times):8.2f} {np.mean(docs):10.3f} {np.max(docs):9.3f} "
                f"{np.median(doc_times):8.2f}"
            )
        print(f"{name:8} padding waste of the packed rows: {plan.stats.padding_waste:.2%}")


if __name__ == "__main__":
    main()
