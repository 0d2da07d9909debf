""":func:`forge_ckpt.hf.full_tensors.iter_full_tensors` on one process (its parallel layouts,
PP / TP / FSDP / EP, are tested by forge-train's ``test_hf_export_stream.py`` pool job)."""

from __future__ import annotations

import pytest
import torch

from forge_ckpt.hf.full_tensors import iter_full_tensors


def test_one_process_yields_the_tensors_in_the_asked_order():
    state = {"b": torch.ones(2, requires_grad=True), "a": torch.zeros(3), "c": torch.arange(4)}
    seen: list[list[str]] = []
    pairs = list(iter_full_tensors(state, sort_key=lambda n: n, check=seen.append))
    assert seen == [["a", "b", "c"]]  # before any tensor
    assert [n for n, _ in pairs] == ["a", "b", "c"]
    for name, tensor in pairs:
        assert not tensor.requires_grad
        assert tensor.data_ptr() == state[name].data_ptr()  # no copy on one process


def test_a_failed_check_stops_before_any_tensor():
    def check(names: list[str]) -> None:
        raise ValueError(f"unexpected {names}")

    with pytest.raises(ValueError, match=r"unexpected \['x'\]"):
        next(iter_full_tensors({"x": torch.ones(1)}, check=check))


def test_a_pipeline_group_needs_torch_distributed():
    with pytest.raises(ValueError, match="not initialized"):
        next(iter_full_tensors({"x": torch.ones(1)}, pipeline_group=object()))
