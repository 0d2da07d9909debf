"""forge-report plots a run's loss, throughput and memory to PNG; it explains a wrong folder."""

from __future__ import annotations

import json

from PIL import Image

from forge_train.report import main, read_metrics


def test_report_writes_valid_pngs_of_a_real_run(reported_run, tmp_path, capsys):
    result, _, _ = reported_run
    out = tmp_path / "plots"
    assert main([str(result.run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    names = ["loss.png", "throughput.png", "memory.png"]
    assert printed == [str(out / n) for n in names]
    for name in names:
        path = out / name
        assert path.stat().st_size > 5_000, name  # axes, labels and a curve, not an empty file
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.size == (700, 400)
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 2  # not blank


def test_folder_without_metrics_is_explained(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"forge-report: {tmp_path} has no metrics.jsonl" in err
    assert "train.output_dir" in err


def test_resumed_rows_replace_the_rerun_steps(tmp_path):
    rows = [
        {"step": 5, "loss": 4.0}, {"step": 10, "loss": 3.0}, {"step": 10, "eval_loss": 3.5},
        {"step": 15, "loss": 2.9},  # killed after this; the checkpoint was at step 10
        {"step": 15, "loss": 2.8}, {"step": 20, "loss": 2.5}, {"step": 20, "eval_loss": 2.7},
    ]  # fmt: skip
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, evals = read_metrics(path)
    assert [(r["step"], r["loss"]) for r in train] == [(5, 4.0), (10, 3.0), (15, 2.8), (20, 2.5)]
    assert [r["step"] for r in evals] == [10, 20]
