"""A run folder is one run's: a checkpoint of another model or data set-up is refused with a
one-paragraph config error (not a traceback), a fresh start in a folder holding another run's
checkpoints, export or metrics is refused unless ``train.overwrite_output_dir`` asks, and the old
run's files are byte-identical after a refusal; default folders never collide. Tiny
single-process runs of 1-2 steps (the mismatches stop at the resume, before any step)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

import forge_train.rundir
from forge_core.testing import import_path
from forge_train.cli import main as cli_main
from forge_train.compose import compose_run_config
from forge_train.config import ConfigError
from forge_train.rundir import prepare_run_dir, previous_outputs
from forge_train.trainer import train

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")

#: Two steps of 2 rows, no evaluation: a checkpoint at step 2, an HF export, two metrics rows.
_SHORT = (
    "train.steps=2",
    "train.eval_batches=0",
    "data.global_batch_rows=2",
    "logging.log_every=1",
)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """The folder of a finished tiny run (step-2 checkpoint, ``hf/``, ``metrics.jsonl``)."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    with tiny.reference_kernels():
        train(tiny.tiny_config(folder, *_SHORT))
    assert (folder / "checkpoints" / "step_00000002").is_dir()
    assert (folder / "hf" / "model.safetensors").is_file()
    return folder


@pytest.fixture
def old_run(finished_run, tmp_path) -> Path:
    """A copy of the finished run's folder for one test to try to reuse."""
    folder = tmp_path / "old"
    shutil.copytree(finished_run, folder)
    return folder


def _contents(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by relative path: its SHA-256 (folders: ``"dir"``)."""
    return {
        str(p.relative_to(folder)): "dir"
        if p.is_dir()
        else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


def test_another_models_checkpoint_is_a_clean_config_error(old_run, capsys):
    """``forge-train`` in the folder of a run of another model size: exit status 2 and one
    line naming the folder, the step, what differs and the fix; no traceback, no file touched."""
    before = _contents(old_run)
    capsys.readouterr()
    with tiny.reference_kernels():
        status = cli_main(
            [*tiny.TINY, *_SHORT, f"train.output_dir={old_run}", "model.config.hidden_size=64"]
        )
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith(
        f"forge-train: invalid config: train.output_dir: cannot resume the run in {old_run}: its "
        f"newest checkpoint (step 2, {old_run / 'checkpoints' / 'step_00000002'}) was written by "
        "a run with another set-up (the model or optimizer differs: "
    ), err
    assert "checkpoint [8192, 32], this run [8192, 64]" in err
    assert "pick a new train.output_dir" in err
    assert "Traceback" not in err
    assert err.count("\n") == 1, err  # one paragraph
    assert _contents(old_run) == before


def test_another_data_setup_is_a_config_error(old_run):
    """Another ``data.seq_len`` (the loader's sample order depends on it): a ConfigError that
    says so, the folder left as it was."""
    before = _contents(old_run)
    with pytest.raises(ConfigError) as info, tiny.reference_kernels():
        train(tiny.tiny_config(old_run, *_SHORT, "data.seq_len=32"))
    message = str(info.value)
    assert message.startswith(f"train.output_dir: cannot resume the run in {old_run}: its newest")
    assert "(step 2," in message
    assert "seq_len=64 but this one 32" in message
    assert "\n" not in message
    assert _contents(old_run) == before


def test_a_fresh_start_in_another_runs_folder_is_refused(old_run):
    """``checkpoint.resume=false`` in a finished run's folder would overwrite its step-2
    checkpoint and export and append to its metrics: refused, every file as it was."""
    before = _contents(old_run)
    with pytest.raises(ConfigError) as info, tiny.reference_kernels():
        train(tiny.tiny_config(old_run, *_SHORT, "checkpoint.resume=false"))
    message = str(info.value)
    assert message.startswith(
        f"train.output_dir: {old_run} holds a previous run's outputs (checkpoints/ with step(s) "
        "2; a Hugging Face export in hf/; metrics.jsonl with rows up to step 2) and this run "
        "starts fresh there (checkpoint.resume=false)"
    ), message
    assert "train.overwrite_output_dir=true" in message
    assert "checkpoint.resume=true" in message
    assert _contents(old_run) == before


def test_overwrite_output_dir_starts_over_without_mixing(old_run):
    """``checkpoint.resume=false train.overwrite_output_dir=true``: the old run's outputs are
    deleted first, so the folder then holds this run's alone (no old rows, no abandoned step)."""
    (old_run / "notes.txt").write_text("mine")
    with tiny.reference_kernels():
        result = train(
            tiny.tiny_config(
                old_run,
                *_SHORT,
                "train.steps=1",
                "checkpoint.export_hf=false",
                "checkpoint.resume=false",
                "train.overwrite_output_dir=true",
            )
        )
    assert result.start_step == 0
    rows = [json.loads(line) for line in (old_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    assert sorted(p.name for p in (old_run / "checkpoints").iterdir()) == ["step_00000001"]
    assert not (old_run / "hf").exists()  # the old export is gone, none written
    assert (old_run / "notes.txt").read_text() == "mine"  # not a run output: kept


def test_metrics_files_open_at_the_first_row(tmp_path):
    """The logger writes nothing into the run folder until a row comes: a run that stops at
    its resume (a checkpoint it cannot load) leaves another run's folder as it was."""
    from forge_train.config import LoggingConfig
    from forge_train.metrics import MetricsLogger

    log = MetricsLogger(
        LoggingConfig(progress="plain", tensorboard="false"), tmp_path, enabled=True
    )
    log.message("set-up")
    assert list(tmp_path.iterdir()) == []
    log.log({"step": 1, "eval_loss": 2.0}, show=False)
    log.close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "eval_loss": 2.0}\n'


def test_a_folder_with_rows_but_no_checkpoint_is_refused(tmp_path):
    """Metrics rows and no checkpoint to resume (e.g. ``checkpoint.interval=0`` without a final
    save): a fresh start there would mix its rows in, refused; an empty ``metrics.jsonl`` (a run
    that failed before its first row) is no previous run."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("")
    assert previous_outputs(folder) == []
    cfg = tiny.tiny_config(folder)
    assert prepare_run_dir(cfg) == (folder, None)
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 5, "loss": 1.0}) + "\n")
    with pytest.raises(ConfigError, match=r"metrics.jsonl with rows up to step 5\) and no comp"):
        prepare_run_dir(cfg)
    assert (folder / "metrics.jsonl").read_text() == json.dumps({"step": 5, "loss": 1.0}) + "\n"


def test_default_run_folders_are_never_shared(tmp_path, monkeypatch):
    """Jobs started in the same second get ``runs/<stamp>``, ``runs/<stamp>-2``, ...: each
    folder created (exclusive mkdir) by the job that names it."""
    from datetime import datetime

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(forge_train.rundir, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    cfg = compose_run_config([*tiny.TINY])
    assert cfg.train.output_dir is None
    folders = [prepare_run_dir(cfg)[0] for _ in range(3)]
    assert folders == [
        Path("runs/20260102-030405"),
        Path("runs/20260102-030405-2"),
        Path("runs/20260102-030405-3"),
    ]
    assert all((tmp_path / f).is_dir() for f in folders)
