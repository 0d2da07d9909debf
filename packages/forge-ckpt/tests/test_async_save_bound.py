"""The memory bound of asynchronous training checkpoints (forge_ckpt.training.manager): at most
one staged CPU copy exists, because a new save (or ``close``) waits for the previous write; the
copy is allocated once and reused by later saves; training may change the weights while the copy
is written."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from forge_ckpt.training import CheckpointConfig, CheckpointManager
from forge_ckpt.training import manager as manager_module

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 64)).square().mean().backward()
    opt.step()  # the two moments exist
    opt.zero_grad()
    return model, opt


def _storages(tree) -> dict[int, int]:
    """data pointer -> bytes of every tensor storage in a (nested) staged state."""
    out: dict[int, int] = {}
    stack = [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            out[storage.data_ptr()] = storage.nbytes()
    return out


def _assert_one_copy(first: dict[int, int], later: dict[int, int], param_bytes: int) -> None:
    reused = {k: n for k, n in later.items() if first.get(k) == n}
    new = sum(later.values()) - sum(reused.values())
    assert 3 * param_bytes <= sum(reused.values()) < 4 * param_bytes
    assert new < 0.1 * param_bytes, (new, param_bytes)


def test_one_staged_copy_reused_and_each_save_waits_for_the_previous(tmp_path, monkeypatch):
    model, opt = _model_and_optimizer()
    events: list[tuple[str, int]] = []
    staged: list[dict[int, int]] = []
    real_stage = manager_module.stage

    def counting_stage(stager, flat):
        events.append(("stage", len(staged) + 1))
        copy = real_stage(stager, flat)
        staged.append(_storages(copy))
        return copy

    monkeypatch.setattr(manager_module, "stage", counting_stage)
    manager = CheckpointManager(
        CheckpointConfig(directory=tmp_path, async_save=True, save_rng=False)
    )
    release = threading.Event()
    real_write = manager._write

    def gated_write(flat, tmp, final, step, tag):  # the background writer, held until released
        events.append(("write", step))
        assert release.wait(60)
        real_write(flat, tmp, final, step, tag)
        events.append(("written", step))

    manager._write = gated_write
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    manager.save(1, model=model, optimizer=opt)  # returns while its write is held
    assert events == [("stage", 1), ("write", 1)]
    assert manager.checkpoints() == []  # not visible before it is complete
    with torch.no_grad():  # training goes on and changes the weights in place
        for p in model.parameters():
            p.add_(1.0)

    def in_thread(call) -> threading.Thread:
        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        thread.join(0.3)
        return thread

    second = in_thread(lambda: manager.save(2, model=model, optimizer=opt))
    assert second.is_alive()  # save 2 waits for save 1's write ...
    assert events == [("stage", 1), ("write", 1)]  # ... before staging a second copy
    release.set()
    second.join(60)
    assert not second.is_alive()
    manager.wait()
    assert events == [(e, k) for k in (1, 2) for e in ("stage", "write", "written")]
    # One copy: save 2 reused save 1's staging buffers of every model and optimizer tensor
    # (the weights and both AdamW moments: 3x the parameter bytes); only the small non-tensor
    # state (JSON as uint8 tensors, new each save: its old copy goes with its source) is new.
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    _assert_one_copy(staged[0], staged[1], param_bytes)
    # The checkpoint holds the weights of when save returned, not the later ones.
    loaded, _ = _model_and_optimizer()
    with torch.no_grad():
        for p in loaded.parameters():
            p.zero_()
    manager.load(1, model=loaded)
    assert all(torch.equal(p, before[n]) for n, p in loaded.named_parameters())
    manager.load(2, model=loaded)
    assert all(torch.equal(p, before[n] + 1.0) for n, p in loaded.named_parameters())
    # close waits for a held write too, then the checkpoint is complete.
    release.clear()
    manager.save(3, model=model, optimizer=opt)
    closing = in_thread(manager.close)
    assert closing.is_alive()
    assert [c.step for c in manager.checkpoints()] == [1, 2]
    release.set()
    closing.join(60)
    assert not closing.is_alive()
    assert [c.step for c in manager.checkpoints()] == [1, 2, 3]
    _assert_one_copy(staged[0], staged[2], param_bytes)
