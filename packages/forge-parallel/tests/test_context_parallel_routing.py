"""Context parallelism routes only ``scaled_dot_product_attention``: a model whose attention is
computed another way (here hand-written matmul-softmax, standing in for flash-attn or any other
kernel) must fail loudly under ``apply_cp`` instead of attending within each rank's shard.

Single process on the fake process group: the checks are on the calls, not on the numbers.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from forge_core.testing import import_path
from forge_parallel.context_parallel import CPConfig, apply_cp

tm = import_path(Path(__file__).with_name("tiny_models.py"), "forge_parallel_tests_tiny_models")


class _SelfAttention(nn.Module):
    """One causal self-attention layer, its core through SDPA or hand-written."""

    def __init__(self, *, through_sdpa: bool, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.through_sdpa, self.heads = through_sdpa, heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = (
            t.view(B, S, self.heads, D // self.heads).transpose(1, 2)
            for t in self.qkv(x).chunk(3, dim=-1)
        )
        if self.through_sdpa:
            core = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            causal = torch.ones(S, S, dtype=torch.bool).tril()
            core = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        return self.out(core.transpose(1, 2).reshape(B, S, D))


def _no_function_mode_left() -> bool:
    return torch._C._len_torch_function_stack() == 0


@pytest.mark.parametrize("style", ["ring", "ulysses"])
def test_attention_outside_sdpa_is_refused_under_context_parallelism(fake_pg, style):
    x = torch.randn(2, 4, 16)  # this rank's shard of an 8-token sequence
    with fake_pg(world_size=2, rank=0):
        routed = _SelfAttention(through_sdpa=True)
        handle = apply_cp(routed, None, CPConfig(style=style))
        assert routed(x).shape == x.shape  # its SDPA call was routed: no error
        handle.remove()

        hand_written = _SelfAttention(through_sdpa=False)
        handle = apply_cp(hand_written, None, CPConfig(style=style))
        with pytest.raises(
            ValueError,
            match=r"a forward of _SelfAttention made no torch\.nn\.functional\."
            r"scaled_dot_product_attention call.*must call F\.scaled_dot_product_attention",
        ):
            hand_written(x)
        assert _no_function_mode_left()  # the router was taken off despite the error
        with pytest.raises(ValueError, match="made no"):  # every forward is checked
            hand_written(x)
        handle.remove()
        assert hand_written(x).shape == x.shape  # without context parallelism it runs

        # A forward that fails before its attention reports its own error, nothing else.
        handle = apply_cp(routed, None, CPConfig(style=style))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(RuntimeError):
                routed(x[..., :3])  # wrong hidden size
        assert [str(w.message) for w in caught if "always_call" in str(w.message)] == []
        handle.remove()
    assert _no_function_mode_left()


def _hf_windowed(family: str, *, window: int, max_window_layers: int = 0) -> nn.Module:
    """A tiny ``transformers`` model of ``family`` with a ``window``-token sliding window."""
    import transformers

    common = {
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "attn_implementation": "sdpa", "sliding_window": window,
    }  # fmt: skip
    torch.manual_seed(0)
    if family == "mistral":  # applies config.sliding_window to every layer whenever it is set
        return transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    # Qwen2: only with use_sliding_window, to the layers from max_window_layers on
    config = transformers.Qwen2Config(
        use_sliding_window=True, max_window_layers=max_window_layers, **common
    )
    return transformers.Qwen2ForCausalLM(config)


@pytest.mark.parametrize(
    ("family", "window", "max_window_layers", "refused"),
    [
        ("mistral", 4, 0, True),  # 8 tokens in all, window 4: the window takes effect
        ("mistral", 8, 0, False),  # a window as long as the sequence is full causal attention
        ("qwen2", 4, 0, True),
        ("qwen2", 4, 2, False),  # both layers below max_window_layers: no layer slides
    ],
)
def test_sliding_window_is_refused_where_it_takes_effect(
    fake_pg, family, window, max_window_layers, refused
):
    from forge_parallel.context_parallel.apply import active_cp_size

    model = _hf_windowed(family, window=window, max_window_layers=max_window_layers)
    tokens = torch.randint(0, 64, (2, 4))  # this rank's shard of an 8-token sequence
    positions = torch.tensor([[0, 1, 6, 7]] * 2)  # rank 0's zigzag positions
    with fake_pg(world_size=2, rank=0):
        handle = apply_cp(model, None, CPConfig())
        if refused:
            with pytest.raises(
                ValueError,
                match=rf"sliding attention window of {window} tokens \(config\.sliding_window\) "
                r"to a sequence of 8 tokens \(4 per rank x cp=2\)",
            ):
                model(input_ids=tokens, position_ids=positions, use_cache=False)
        else:
            model(input_ids=tokens, position_ids=positions, use_cache=False)
        assert active_cp_size() is None  # the router left with its forward
        handle.remove()
    assert _no_function_mode_left()


def test_attention_soft_capping_is_refused(fake_pg):
    """Gemma2 caps its attention scores (``attn_logit_softcapping``), which the SDPA-based
    context-parallel kernels do not: refused at setup, not dropped (its sliding layers alone
    no longer stop it, a window as long as the sequence being plain causal attention)."""
    import transformers

    config = transformers.Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=64,
        attn_logit_softcapping=50.0,
    )  # fmt: skip
    model = transformers.Gemma2ForCausalLM(config)
    with (
        fake_pg(world_size=2, rank=0),
        pytest.raises(
            ValueError, match=r"attn_logit_softcapping=50\.0: the model caps its attention scores"
        ),
    ):
        apply_cp(model, None, CPConfig())
