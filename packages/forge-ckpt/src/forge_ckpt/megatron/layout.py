"""The file layout of Megatron-LM checkpoints: iteration folders, rank folders, pipeline stages.

A Megatron-LM save folder holds ``latest_checkpointed_iteration.txt`` (the newest iteration, or
``release``) and one folder per saved iteration, ``iter_0000100/``. In the legacy format that
folder holds one ``mp_rank_{tp:02d}/model_optim_rng.pt`` per tensor-parallel rank, or
``mp_rank_{tp:02d}_{pp:03d}/`` with pipeline parallelism, and one more ``_{ep:03d}`` suffix with
expert parallelism (Megatron-LM's ``get_checkpoint_name``: ``mp_rank_01_002_003`` is TP rank 1,
pipeline stage 2, expert rank 3; without pipeline parallelism ``mp_rank_01_003``). Each file holds
that rank's ``model`` state dict with *stage-local* layer numbers (``decoder.layers.0`` is the
stage's first layer) and, on an expert rank, *rank-local* expert numbers; the embedding on the
first stage and ``final_layernorm``/``output_layer`` on the last.

Pipeline stages hold equal numbers of layers unless the first and/or last stage is given its own
count (Megatron-LM's ``--decoder-first-pipeline-num-layers`` /
``--decoder-last-pipeline-num-layers``); the other stages then share the rest evenly. Virtual
pipeline stages split each stage into model chunks (``model0``, ``model1``, ... in a rank's
file): see :mod:`forge_ckpt.megatron.virtual_pipeline`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

__all__ = [
    "FIRST_STAGE_PREFIXES",
    "LATEST_FILE",
    "iteration_dir",
    "on_first_stage",
    "parallel_args",
    "parse_rank_dir",
    "rank_dir_name",
    "read_latest_iteration",
    "stage_layers",
]

LATEST_FILE = "latest_checkpointed_iteration.txt"
# A LLaVAModel keeps its GPTModel under ``language_model.`` (its vision encoder's layers,
# ``vision_model.decoder.layers.N``, are not pipeline-split: see FIRST_STAGE_PREFIXES).
_LAYER = re.compile(r"^((?:language_model\.)?decoder\.layers\.)(\d+)\.")

#: Names that live on the first pipeline stage: the (language model's) embedding and a
#: LLaVAModel's vision encoder and projector (Megatron-Core builds them where ``add_encoder``).
FIRST_STAGE_PREFIXES = (
    "embedding.",
    "language_model.embedding.",
    "vision_model.",
    "vision_projection.",
)
RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


def iteration_dir(root: Path, iteration: int | str) -> Path:
    """``root/iter_0000100`` (or ``root/release``)."""
    return root / ("release" if iteration == "release" else f"iter_{int(iteration):07d}")


def rank_dir_name(tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    """``mp_rank_01`` without pipeline parallelism, ``mp_rank_01_002`` with, and a
    ``_{ep_rank:03d}`` suffix with expert parallelism (``ep > 1``)."""
    name = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return name if ep == 1 else f"{name}_{ep_rank:03d}"


def parse_rank_dir(name: str, *, expert_parallel: bool) -> tuple[int, int, int] | None:
    """``(tp_rank, pp_rank, ep_rank)`` of a rank folder name (``None`` for other names).

    ``mp_rank_XX_YYY`` is ambiguous: pipeline stage ``YYY`` or, in an expert-parallel
    checkpoint without pipeline parallelism, expert rank ``YYY`` (``expert_parallel``, which the
    checkpoint's args decide, as Megatron-LM's do).
    """
    match = RANK_DIR.match(name)
    if match is None:
        return None
    tp_rank, second, third = match.groups()
    if third is not None:
        return int(tp_rank), int(second), int(third)
    if second is None:
        return int(tp_rank), 0, 0
    return (int(tp_rank), 0, int(second)) if expert_parallel else (int(tp_rank), int(second), 0)


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


def stage_layers(
    num_layers: int, pp: int, *, first: int | None = None, last: int | None = None
) -> list[range]:
    """The global layer indices of each pipeline stage: Megatron-LM's split, even unless the
    first and/or last stage's layer counts are given (``--decoder-first-pipeline-num-layers`` /
    ``--decoder-last-pipeline-num-layers``), the other stages then sharing the rest evenly."""
    if pp < 1:
        raise ValueError(f"pipeline_parallel must be >= 1, got {pp}")
    fixed = {0: first, pp - 1: last}
    fixed = {s: n for s, n in fixed.items() if n is not None}
    if fixed and pp == 1:
        raise ValueError(
            "first/last pipeline stage layer counts need pipeline_parallel > 1; drop them "
            "(one stage holds every layer)"
        )
    for s, n in fixed.items():
        if int(n) < 1:
            which = "first" if s == 0 else "last"
            raise ValueError(f"the {which} pipeline stage needs at least 1 layer, got {n}")
    rest = num_layers - sum(fixed.values())
    middle = pp - len(fixed)
    if (middle == 0 and rest != 0) or (middle > 0 and (rest < middle or rest % middle)):
        given = ", ".join(f"{'first' if s == 0 else 'last'}={n}" for s, n in fixed.items())
        raise ValueError(
            f"{num_layers} layers do not split into {pp} pipeline stages"
            + (f" with {given}" if given else "")
            + f": the {middle} other stage(s) must share the remaining {rest} layers evenly, at "
            "least 1 each; pick a pipeline_parallel (and first/last counts) that fit num_layers"
        )
    counts = [int(fixed.get(s, rest // middle if middle else 0)) for s in range(pp)]
    starts = [sum(counts[:s]) for s in range(pp)]
    return [range(a, a + n) for a, n in zip(starts, counts, strict=True)]


def layer_of(name: str) -> int | None:
    """The layer number in ``decoder.layers.N....`` or ``language_model.decoder.layers.N....``
    (``None`` for other tensors)."""
    match = _LAYER.match(name)
    return int(match.group(2)) if match else None


def on_first_stage(name: str) -> bool:
    """Whether a tensor outside the decoder layers belongs to the first pipeline stage (the
    others, ``decoder.final_layernorm`` and ``output_layer``, to the last)."""
    return name.startswith(FIRST_STAGE_PREFIXES)


def renumber(name: str, offset: int) -> str:
    """``name`` with its layer number shifted by ``offset`` (global <-> stage-local)."""
    match = _LAYER.match(name)
    if match is None:
        return name
    return f"{match.group(1)}{int(match.group(2)) + offset}.{name[match.end() :]}"


def parallel_args(
    tp: int,
    pp: int,
    ep: int,
    first: int | None,
    last: int | None,
    virtual: int = 1,
    layout: str | None = None,
) -> dict[str, Any]:
    """The Megatron-LM arguments (``args``) that record a parallel split (``virtual``: model
    chunks per pipeline rank; ``layout``: a custom pipeline layout string)."""
    args: dict[str, Any] = {
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "expert_model_parallel_size": ep,
        "expert_tensor_parallel_size": tp,
        # Megatron-LM's validate_args stores None for a single chunk per rank.
        "virtual_pipeline_model_parallel_size": virtual if virtual > 1 else None,
    }
    if layout is not None:
        args["pipeline_model_parallel_layout"] = layout
    elif virtual > 1:
        args["num_virtual_stages_per_pipeline_rank"] = virtual
    if first is not None:
        args["decoder_first_pipeline_num_layers"] = int(first)
    if last is not None:
        args["decoder_last_pipeline_num_layers"] = int(last)
    return args
