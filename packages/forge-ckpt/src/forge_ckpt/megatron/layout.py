"""The file layout of Megatron-LM checkpoints: iteration folders, rank folders, pipeline stages.

A Megatron-LM save folder holds ``latest_checkpointed_iteration.txt`` (the newest iteration, or
``release``) and one folder per saved iteration, ``iter_0000100/``. In the legacy format that
folder holds one ``mp_rank_{tp:02d}/model_optim_rng.pt`` per tensor-parallel rank, or
``mp_rank_{tp:02d}_{pp:03d}/`` with pipeline parallelism; each file holds that rank's
``model`` state dict with *stage-local* layer numbers (``decoder.layers.0`` is the stage's first
layer), the embedding on the first stage and ``final_layernorm``/``output_layer`` on the last.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = [
    "LATEST_FILE",
    "iteration_dir",
    "rank_dir_name",
    "read_latest_iteration",
    "stage_layers",
]

LATEST_FILE = "latest_checkpointed_iteration.txt"
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")


def iteration_dir(root: Path, iteration: int | str) -> Path:
    """``root/iter_0000100`` (or ``root/release``)."""
    return root / ("release" if iteration == "release" else f"iter_{int(iteration):07d}")


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int) -> str:
    """``mp_rank_01`` without pipeline parallelism, ``mp_rank_01_002`` with."""
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def read_latest_iteration(root: Path) -> int | str:
    """The iteration ``latest_checkpointed_iteration.txt`` names (an int, or ``"release"``)."""
    file = root / LATEST_FILE
    if not file.is_file():
        found = sorted(p.name for p in root.glob("iter_*"))
        if found:
            return int(found[-1][len("iter_") :])
        raise FileNotFoundError(
            f"{root} is not a Megatron checkpoint folder: no {LATEST_FILE} and no iter_* folders"
        )
    text = file.read_text().strip()
    if text == "release":
        return text
    if not text.isdigit():
        raise ValueError(f"{file} should hold an iteration number or 'release', got {text!r}")
    return int(text)


def stage_layers(num_layers: int, pp: int) -> list[range]:
    """The global layer indices of each pipeline stage (Megatron's even split)."""
    if pp < 1:
        raise ValueError(f"pipeline_parallel must be >= 1, got {pp}")
    if num_layers % pp:
        raise ValueError(
            f"{num_layers} layers do not split evenly into {pp} pipeline stages; pick a "
            "pipeline_parallel that divides num_layers"
        )
    per = num_layers // pp
    return [range(s * per, (s + 1) * per) for s in range(pp)]


def layer_of(name: str) -> int | None:
    """The layer number in ``decoder.layers.N....`` (``None`` for other tensors)."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def renumber(name: str, offset: int) -> str:
    """``name`` with its layer number shifted by ``offset`` (global <-> stage-local)."""
    layer = layer_of(name)
    if layer is None:
        return name
    return _LAYER.sub(f"decoder.layers.{layer + offset}.", name, count=1)
