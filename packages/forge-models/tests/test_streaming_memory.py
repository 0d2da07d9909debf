"""Peak memory of ``save_pretrained`` / ``load_hf_weights`` / ``from_pretrained`` (issue 6:
"stream tensors one shard at a time, peak memory about one shard, not the model").

A fresh subprocess (clean RSS; glibc told to return large blocks at ``free``, so that memory a
step frees cannot hide the next step's growth) builds a ~290 MB float32 Llama (4 layers of
hidden size 1024, no tensor above 16 MB), then measures the high-water RSS (``VmHWM``, reset
through ``/proc/self/clear_refs``) over the resident model around each step. Measured on the
2-core CI machine (3 runs): saving in 32 MB shards grows RSS by 34 MB (one shard: safetensors
serializes a shard's bytes before writing them), loading into the model by 17 MB (one
tensor), ``from_pretrained(mmap=False)`` by 16 MB over the model it builds. Gathering the state
dict first (a copy of every tensor) grows the save by 123% of the model: the bound, 25% of the
model, fails it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_MB = 2**20
#: What each step may add over the resident model, as a fraction of the model's bytes.
_BOUND = 0.25


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _growth(step) -> int:
    """Bytes the high-water RSS rose above the RSS before ``step()``."""
    base = _status("VmRSS")
    _reset_peak()
    step()
    return _status("VmHWM") - base


def _measure(out: str) -> dict[str, float]:
    """The subprocess: a ~290 MB model saved, loaded back and loaded anew (see the module
    docstring); growths in MB."""
    import gc

    import torch

    import forge_models

    config = forge_models.TransformerConfig(
        vocab_size=4096,
        hidden_size=1024,
        intermediate_size=4096,
        num_layers=4,
        num_heads=8,
        num_kv_heads=8,
        tie_word_embeddings=False,
    )
    model = forge_models.build_model(config, device="meta")
    forge_models.materialize(model, "cpu", init=False)
    with torch.no_grad():
        for param in model.parameters():
            param.uniform_(-0.02, 0.02)  # resident: every page written
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    folder = Path(out) / "hf"
    save = _growth(lambda: forge_models.save_pretrained(model, folder, max_shard_size="32MB"))
    load = _growth(lambda: forge_models.load_hf_weights(model, folder))
    shards = len(list(folder.glob("*.safetensors")))
    model = None  # freed (large blocks go back to the system at once)
    gc.collect()
    fresh = _growth(lambda: forge_models.from_pretrained(folder, mmap=False)) - size
    return {
        "model": size / _MB,
        "save": save / _MB,
        "load": load / _MB,
        "from_pretrained": fresh / _MB,
        "shards": shards,
    }


@pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs"
)
def test_save_and_load_peak_about_one_shard(tmp_path):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    done = subprocess.run(
        [sys.executable, __file__, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    mb = json.loads(done.stdout.strip().splitlines()[-1])
    assert mb["model"] > 250, mb
    assert mb["shards"] >= 9, mb
    limit = _BOUND * mb["model"]  # a whole-state copy would be >= 100%
    assert mb["save"] < limit, mb
    assert mb["load"] < limit, mb
    assert mb["from_pretrained"] < limit, mb


if __name__ == "__main__":
    print(json.dumps(_measure(sys.argv[1])))
