"""Megatron-LM checkpoints hold objects beside the weights that ``weights_only`` loading refuses
(``args.attention_backend``, an enum of megatron.core; NumPy's RNG state in ``rng_state``).
forge's readers turn them into inert stand-ins: the checkpoint converts without megatron-core
or a ``--trust-global``, and no code named in the file runs."""

from __future__ import annotations

import argparse
import enum
import os
import random
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from forge_ckpt.megatron import LegacyCheckpoint, load_pt
from forge_ckpt.megatron.safe_load import Inert


class AttnBackend(enum.Enum):  # pickled under megatron-core's name (see _megatron_module)
    flash = 1
    auto = 5


def _megatron_module():
    """A stand-in ``megatron.core.transformer.enums`` module, only while the file is written
    (pickle looks the enum up by its module path)."""
    module = types.ModuleType("megatron.core.transformer.enums")
    AttnBackend.__module__ = module.__name__
    module.AttnBackend = AttnBackend
    return module


def _save_megatron_lm_file(file: Path) -> None:
    """A legacy rank file as Megatron-LM's checkpointing.py writes it (one tensor-parallel
    rank, no optimizer): ``args`` with ``attention_backend`` and ``params_dtype``, RNG state
    with NumPy's generator state."""
    module = _megatron_module()
    names = ["megatron", "megatron.core", "megatron.core.transformer", module.__name__]
    saved = {n: sys.modules.get(n) for n in names}
    for n in names[:-1]:
        sys.modules[n] = types.ModuleType(n)
    sys.modules[module.__name__] = module
    try:
        args = argparse.Namespace(
            num_layers=2, hidden_size=8, tensor_model_parallel_size=1,
            pipeline_model_parallel_size=1, transformer_impl="local",
            attention_backend=AttnBackend.auto, params_dtype=torch.float32,
        )  # fmt: skip
        rng = {
            "random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(),
        }  # fmt: skip
        state = {
            "args": args, "checkpoint_version": 3.0, "iteration": 7,
            "model": {
                "embedding.word_embeddings.weight": torch.arange(24.0).view(3, 8),
                "decoder.layers.0.mlp.linear_fc2.weight": torch.ones(8, 4),
                "decoder.layers.1.mlp.linear_fc2.weight": torch.full((8, 4), 2.0),
            },
            "rng_state": [rng], "num_floating_point_operations_so_far": 0,
        }  # fmt: skip
        file.parent.mkdir(parents=True)
        torch.save(state, file)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
        AttnBackend.__module__ = __name__


def test_megatron_lm_rank_file_reads_without_megatron_or_trust(tmp_path):
    file = tmp_path / "iter_0000007/mp_rank_00/model_optim_rng.pt"
    _save_megatron_lm_file(file)
    with pytest.raises(ValueError, match=r"AttnBackend.*trusted_globals"):
        load_pt(file)  # strict by default

    state = load_pt(file, inert_untrusted=True)
    backend = state["args"].attention_backend
    assert isinstance(backend, Inert)
    assert backend.qualified_name == "megatron.core.transformer.enums.AttnBackend"
    assert backend.args == (5,)  # the enum's value, kept as data
    assert state["args"].params_dtype is torch.float32
    np_state = state["rng_state"][0]["np_rng_state"]
    assert np_state[0] == "MT19937"
    assert isinstance(np_state[1], Inert)

    ckpt = LegacyCheckpoint(tmp_path)
    assert ckpt.iteration == 7
    assert ckpt.args["num_layers"] == 2
    tensors = dict(ckpt.iter_tensors(te_spec=False))
    assert torch.equal(tensors["embedding.word_embeddings.weight"], torch.arange(24.0).view(3, 8))
    assert torch.equal(tensors["decoder.layers.1.mlp.linear_fc2.weight"], torch.full((8, 4), 2.0))


class _Calls:
    """Pickled as a call of ``function(*args)``."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def test_stand_ins_run_no_code_from_the_file(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    file = tmp_path / "evil.pt"
    torch.save(
        {"args": argparse.Namespace(x=_Calls(shutil.rmtree, str(victim))), "model": {}}, file
    )
    state = load_pt(file, inert_untrusted=True)
    assert victim.is_dir()  # shutil.rmtree was not called: a stand-in took its arguments
    called = state["args"].x
    assert isinstance(called, Inert)
    assert called.qualified_name == "shutil.rmtree"
    assert called.args == (str(victim),)
    # Modules torch blocks outright (os, sys, subprocess, ...) stay refused.
    torch.save({"args": argparse.Namespace(x=_Calls(os.system, "true")), "model": {}}, file)
    with pytest.raises(ValueError, match=r"system.*trusted_globals"):
        load_pt(file, inert_untrusted=True)
