"""``forge-bench --smoke``: every workload runs at tiny size on CPU and yields a row per
implementation (or a skip row with its reason); forge and transformers, loaded from the same
weights, agree on the loss."""

from __future__ import annotations

import math

import pytest
from forge_bench.cli import main
from forge_bench.data import packed_batch
from forge_bench.peers import find_peers
from forge_bench.plan import llm_cases, moe_cases
from forge_bench.table import Row, fill_ratios, format_table


def test_packed_batch_rows_are_whole_documents():
    batch = packed_batch(rows=3, seq=40, vocab_size=100, seed=1)
    assert all(sum(row) == 40 for row in batch.lengths)
    assert any(len(row) > 1 for row in batch.lengths)
    forge = batch.forge_inputs(batch.input_ids.device)
    cu = forge["cu_seqlens"].tolist()
    assert cu[0] == 0
    assert cu[-1] == 120
    assert cu == sorted(cu)
    hf = batch.hf_inputs(batch.input_ids.device, packed=True)
    starts = (hf["position_ids"] == 0).sum().item()
    assert starts == len(cu) - 1  # one restart per document
    ignored = (hf["labels"] == -100).sum().item()
    assert ignored == starts - 3  # every document start but the first of each row


def test_ratios_compare_like_with_like():
    rows = [
        Row(workload="llm", case="c", impl="forge", tokens_per_s=300.0),
        Row(workload="llm", case="c", impl="transformers", tokens_per_s=100.0),
        Row(workload="llm", case="c", impl="forge fp8-current", tokens_per_s=450.0),
        Row(workload="llm", case="c", impl="torchtitan", status="skipped: not installed"),
    ]
    fill_ratios(rows)
    assert [r.ratio for r in rows] == [3.0, 3.0, 1.5, None]
    assert "skipped: not installed" in format_table(rows)


@pytest.mark.multiprocess
def test_smoke_run_reports_every_implementation(tmp_path, capsys):
    record = tmp_path / "BENCHMARKS.md"
    record.write_text("# header\n\nold row\n")
    code = main(["--smoke", "--record", str(record)])
    out = capsys.readouterr().out
    assert code == 0, out

    peers = find_peers(device_type="cpu")
    cases = llm_cases(sizes=[], seqs=[], peers=peers, smoke=True)
    cases += moe_cases(seqs=[], peers=peers, smoke=True)
    table = out[out.index("workload  case") :].splitlines()
    losses = {}
    for case in cases:
        for impl in case.impls:
            line = next(
                (ln for ln in table if f" {impl.name} " in ln and ln.startswith(case.workload)),
                None,
            )
            assert line is not None, f"no row for {case.workload} {impl.name}:\n{out}"
            if impl.skip:
                assert "skipped: " in line
                assert impl.skip[:20] in line
                continue
            cells = line.split()
            offset = 3 + len(case.label.split()) + len(impl.name.split()) - 1
            tokens_per_s = float(cells[offset].replace(",", ""))
            loss_first, loss_last = float(cells[offset + 3]), float(cells[offset + 4])
            assert all(math.isfinite(v) for v in (tokens_per_s, loss_first, loss_last)), line
            assert tokens_per_s > 0, line
            losses[case.workload, impl.name] = loss_first
    for workload in ("llm", "moe"):
        if (workload, "transformers") in losses:  # same weights, same batch, same loss
            forge, hf = losses[workload, "forge"], losses[workload, "transformers"]
            assert forge == pytest.approx(hf, rel=1e-4), (workload, forge, hf)
    assert losses["llm", "forge +recompute"] == pytest.approx(losses["llm", "forge"], rel=1e-5)
    if ("llm", "torchtitan") in losses:  # installed: its FullAC row computes the same loss
        titan = losses["llm", "torchtitan"]
        assert losses["llm", "torchtitan +recompute"] == pytest.approx(titan, rel=1e-5)
    assert "bench_fused_linear_cross_entropy.py" in out
    assert "### bench_fused_linear_cross_entropy.py" in out

    text = record.read_text()
    assert text.startswith("# header\n\nold row\n")
    assert "forge-bench --smoke --record" in text
    assert "qwen3-moe-tiny" in text
