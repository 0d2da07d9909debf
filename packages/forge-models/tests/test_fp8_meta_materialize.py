"""A model built on the meta device, converted to delayed-scaling FP8 linears and materialized
(forge_models.materialize: ``to_empty``, then ``init_weights``, which initializes the FP8
linears' weights by name) starts with the delayed-scaling state of one built on the CPU."""

from __future__ import annotations

import torch

import forge_models
from forge_kernels.fp8 import Fp8Linear, convert_to_fp8
from forge_models import TransformerConfig, build_model

CONFIG = TransformerConfig(
    family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
    num_heads=4, num_kv_heads=2,
)  # fmt: skip


def _fp8(model: torch.nn.Module) -> torch.nn.Module:
    return convert_to_fp8(model, recipe="delayed", gemm="emulate")


def test_meta_built_delayed_fp8_model_materializes_to_the_eager_one(monkeypatch):
    torch.manual_seed(0)
    eager = _fp8(build_model(CONFIG))
    meta = _fp8(build_model(CONFIG, device="meta"))  # as forge-train: convert, then materialize
    assert any(isinstance(m, Fp8Linear) for m in meta.modules())

    def nan_empty(shape, *, dtype=None, device=None, **kwargs):
        """torch.empty's arbitrary memory, made NaN so the test is deterministic."""
        return torch.full(shape, float("nan"), dtype=dtype, device=device, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "empty", nan_empty)
        torch.manual_seed(0)
        forge_models.materialize(meta, "cpu")
    expected, got = eager.state_dict(), meta.state_dict()
    assert got.keys() == expected.keys()
    assert any(name.endswith("fp8_scale") for name in got)
    for name, value in got.items():
        assert torch.equal(value, expected[name]), name
    tokens = torch.arange(16).reshape(2, 8)
    logits = meta(tokens)
    assert logits.isfinite().all()
    assert torch.equal(logits, eager(tokens))  # the first delayed-scaling step casts alike
