"""logging.profile writes a Chrome trace of the chosen steps, holding the model's operators."""

from __future__ import annotations

import json

import pytest

from forge_train.compose import compose_run_config
from forge_train.config import ConfigError


def test_profile_window_writes_a_chrome_trace_of_the_model(reported_run):
    result, _, _ = reported_run
    trace = result.run_dir / "profile" / "trace_rank0_steps3-3.json"
    assert result.profile_traces == [trace]
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    # the model's operators: the embedding lookup, its matmuls, the recorded step
    assert "aten::embedding" in names
    assert names & {"aten::mm", "aten::addmm", "aten::matmul", "aten::linear"}
    assert any(str(n).startswith("ProfilerStep#") for n in names)
    assert "aten::embedding_dense_backward" in names or any("Backward" in str(n) for n in names)


def test_profile_window_must_fit_the_run():
    with pytest.raises(
        ConfigError, match=r"logging.profile: the window \(steps 9..11\) ends after"
    ):
        compose_run_config(["train.steps=10", "logging.profile.start_step=9",
                            "logging.profile.num_steps=3"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"logging.profile.start_step: must be >= 1, got 0"):
        compose_run_config(["logging.profile.start_step=0"])
