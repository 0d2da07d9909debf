"""forge-train's tests run forge-kernels' eager references (see ``tiny_run.reference_kernels``).

``reported_run``: one tiny run shared by the tests of what a run reports (profiler trace,
W&B / MLflow trackers, ``forge-report``), so the suite pays for it once.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from forge_core.testing import import_path, preload_in_workers

# The pool's workers start with forge-train's stack imported: each job builds meshes, so the
# workers are restarted every few layout runs, and each restart re-imported it (about 5 s a
# 4-rank pool on 2 cores, 2.5 CPU-seconds a rank) on its next job.
preload_in_workers(
    "torch._dynamo",  # what the first optimizer step imports
    "hydra",
    "forge_data",
    "forge_models",
    "forge_parallel",
    "forge_ckpt",
    "forge_train.trainer",
    "forge_train.components",
)

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")
fakes = import_path(Path(__file__).with_name("fake_trackers.py"), "forge_train_tests_fakes")


@pytest.fixture(autouse=True)
def _reference_kernels():
    with tiny.reference_kernels():
        yield


@pytest.fixture(scope="session")
def vlm_data_cache_dir(tmp_path_factory):
    """One data cache (demo tokenizer, image shard) for every VLM test module of the session:
    the second module finds it built (about 10 s each otherwise)."""
    return tmp_path_factory.mktemp("vlm-cache")


@pytest.fixture(scope="session")
def reported_run(tmp_path_factory):
    """``(TrainResult, fake wandb module, fake mlflow module)`` of a 4-step run that logs every
    step, evaluates at step 2, profiles step 3 and reports to (fake) W&B and MLflow."""
    from forge_train.trainer import train

    run_dir = tmp_path_factory.mktemp("reported_run")
    wandb, mlflow = fakes.fake_wandb(), fakes.fake_mlflow()
    cfg = tiny.tiny_config(
        run_dir, "train.steps=4", "logging.log_every=1", "train.eval_every=2",
        "train.eval_batches=1", "checkpoint.export_hf=false", "checkpoint.interval=0",
        "checkpoint.save_final=false", "logging.profile.start_step=3",
        "logging.profile.num_steps=1", "logging.wandb.enabled=true",
        "logging.wandb.project=forge-tests", "logging.mlflow.enabled=true",
        "logging.mlflow.experiment=forge-tests", "logging.mlflow.tracking_uri=file:///nowhere",
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as mp, tiny.reference_kernels():
        mp.setitem(sys.modules, "wandb", wandb)
        mp.setitem(sys.modules, "mlflow", mlflow)
        result = train(cfg)
    return result, wandb, mlflow
