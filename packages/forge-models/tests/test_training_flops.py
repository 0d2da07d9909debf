"""``flops_per_token`` for runs that train only part of a language model (LoRA, a frozen model
behind a trained projector) against a measured count: ``FlopCounterMode`` over a tiny model's
forward and backward with the parameters frozen and the adapters added as such a run has them.

The attention runs as a fused kernel does (flash-attn, SDPA): a backward that computes ``dq``,
``dk`` and ``dv`` whenever it runs, from the saved probabilities (2x the forward). The CPU
dispatch's eager path would compute only the gradients autograd asks for, and
``FlopCounterMode``'s SDPA formula adds the scores a fused backward recomputes (2.5x): neither is
the model-FLOPs convention of :mod:`forge_models.flops`. The causal mask is applied to full
scores, so the measurement is the ``causal=False`` count.
"""

from __future__ import annotations

import fnmatch

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import forge_models
from forge_models.blocks import attention as attention_block
from forge_models.blocks import mla as mla_block
from forge_models.flops import _TrainingWalk, flops_per_token, linear_layers, matmul_params

SEQ = 8
RANK = 4


class _FusedAttention(torch.autograd.Function):
    """Causal attention ``[B, H, S, d]`` whose backward returns all of ``dq``, ``dk``, ``dv``."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        scores = (q @ k.transpose(-1, -2)) * scale
        future = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).triu(1)
        probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale = scale
        return probs @ v

    @staticmethod
    def backward(ctx, grad):
        q, k, v, probs = ctx.saved_tensors
        grad_v = probs.transpose(-1, -2) @ grad
        grad_probs = grad @ v.transpose(-1, -2)
        grad_scores = probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True))
        grad_scores = grad_scores * ctx.scale
        return grad_scores @ k, grad_scores.transpose(-1, -2) @ q, grad_v, None


def _fused_attention(q, k, v, *, causal=False, softmax_scale=None, **unused):
    """``forge_kernels.attention``'s contract for a plain causal batch ``[B, S, H, d]``."""
    assert causal
    assert all(x is None for x in unused.values()), unused
    groups = q.shape[2] // k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return _FusedAttention.apply(q, k, v, scale).transpose(1, 2)


@pytest.fixture(autouse=True)
def _fused(monkeypatch):
    # forge-kernels' eager references for the other ops (none has a matmul).
    monkeypatch.setenv("FORGE_KERNELS_IMPL", "reference")
    for module in (attention_block, mla_block):
        monkeypatch.setattr(module, "attention", _fused_attention)


class _Adapted(nn.Module):
    """A linear layer plus a rank-``r`` update ``x Aᵀ Bᵀ``: the products forge-train's
    ``LoRALinear`` computes (its scaling and dropout are elementwise)."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.lora_B = nn.Parameter(torch.randn(base.out_features, rank) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.lora_A.t() @ self.lora_B.t()


def _prepare(model: nn.Module, *, trainable, targets) -> None:
    """Freeze what ``trainable`` does not name, then adapt the linears ``targets`` match."""
    for name, p in model.named_parameters():
        p.requires_grad_(any(fnmatch.fnmatchcase(name, pat) for pat in trainable))
    adapted = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(fnmatch.fnmatchcase(name, t) for t in targets)
    ]
    for name in adapted:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, _Adapted(getattr(owner, child), RANK))


def _measured(model: nn.Module, *, input_grad: bool) -> int:
    """FLOPs of one forward + backward of ``SEQ`` tokens (``input_grad``: the embeddings carry
    a gradient, as a trained projector's features do); the multi-token prediction depths run
    through the head too (``output_mtp_logits``), as with labels."""
    config = model.config
    ids = torch.randint(0, config.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        embeds = model.embed_tokens(ids)
        if input_grad:
            embeds = embeds.detach().requires_grad_(True)
        out = model(ids, inputs_embeds=embeds, output_mtp_logits=config.mtp_depth > 0)
        logits = torch.cat([out[0], *out[1]]) if isinstance(out, tuple) else out
        if logits.requires_grad:
            logits.square().sum().backward()
    return counter.get_total_flops()


CASES = {
    "full": {},
    "lora_attention": {"trainable": (), "lora_targets": ("*.q_proj", "*.v_proj")},
    "lora_all_linears": {"trainable": (), "lora_targets": ("*_proj",)},
    "frozen_input_grad": {"trainable": (), "input_grad": True},
    "frozen": {"trainable": ()},
    # A gradient reaches layer 0 through its trained norm weights, not through the embedding.
    "lora_later_layer_norms_train": {
        "trainable": ("*norm.weight",),
        "lora_targets": ("layers.1.mlp.down_proj",),
    },
    # The embedding trains (and, tied, the head): every input gradient, one weight gradient.
    "embedding_only": {"trainable": ("embed_tokens.weight",)},
}


def _check(name: str, case: dict) -> tuple[int, int]:
    torch.manual_seed(0)
    model = forge_models.build_model(name, num_layers=2)
    targets = case.get("lora_targets", ())
    _prepare(model, trainable=case.get("trainable", ("*",)), targets=targets)
    measured = _measured(model, input_grad=case.get("input_grad", False))
    rank = {"lora_rank": RANK} if targets else {}
    predicted = SEQ * flops_per_token(model.config, SEQ, **case, **rank)
    return measured, predicted


@pytest.mark.parametrize("case", list(CASES))
def test_counts_what_a_dense_model_computes(case):
    """qwen2-debug: q/k/v biases, grouped-query heads, a tied head."""
    measured, predicted = _check("qwen2-debug", CASES[case])
    assert predicted == measured
    if case == "full":  # the default call: unchanged
        config = forge_models.get_config("qwen2-debug", num_layers=2)
        assert predicted == SEQ * (6 * matmul_params(config) + 12 * 2 * config.q_size * SEQ)


@pytest.mark.parametrize(
    ("name", "case"),
    [
        # Softmax router and a gated shared expert, all adapted (the router is a linear layer).
        ("qwen2-moe-debug", {"trainable": (), "lora_targets": ("*_proj", "*router", "*_gate")}),
        # MLA with a q latent, a dense then an MoE layer, one multi-token prediction depth.
        ("deepseek-v3-debug", {"trainable": (), "lora_targets": ("*q_b_proj", "*kv_b_proj")}),
        ("deepseek-v3-debug", {"trainable": (), "input_grad": True}),
    ],
    ids=["qwen2_moe_lora", "deepseek_v3_lora", "deepseek_v3_frozen_input_grad"],
)
def test_counts_moe_mla_and_mtp(name, case):
    measured, predicted = _check(name, case)
    assert predicted == measured


def test_lora_and_frozen_by_hand_for_llama3_8b():
    """LoRA on every projection of llama3-8b: no weight gradient of any base weight, no input
    gradient of layer 0's q/k/v (they read the frozen embedding through a frozen norm), plus
    the adapters; a frozen model without a trained part before it: forward only."""
    config = forge_models.get_config("llama3-8b")
    d, q, kv, inter, rank = 4096, config.q_size, config.kv_size, 14336, 16
    full = flops_per_token(config, 4096, causal=True)
    lora = flops_per_token(
        config, 4096, causal=True, trainable=(), lora_rank=rank, lora_targets=("*_proj",)
    )
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, 2 * inter), (inter, d)]
    adapters = sum(
        2 * rank * d_in * (2 + (layer > 0 or i >= 3)) + 6 * rank * d_out
        for layer in range(32)
        for i, (d_in, d_out) in enumerate(shapes)
    )
    assert lora == full - 2 * matmul_params(config) - 2 * d * (q + 2 * kv) + adapters
    assert 0.69 < lora / full < 0.70  # the causal attention still runs its whole backward
    assert 3 * flops_per_token(config, 4096, causal=True, trainable=()) == full


@pytest.mark.parametrize("name", forge_models.list_sizes())
def test_default_is_the_closed_form(name):
    """Every registered size: the walk with everything trained is ``6 N_matmul`` + attention."""
    config = forge_models.get_config(name)
    layers = config.num_layers + config.mtp_depth
    if config.mla is None:
        attention = 12 * layers * config.q_size * 1000
    else:
        mla = config.mla
        attention = 6 * layers * config.num_heads * (mla.qk_head_dim + mla.v_head_dim) * 1000
    assert flops_per_token(config, 1000) == 6 * matmul_params(config) + attention
    assert flops_per_token(config, 1000, causal=True) == 6 * matmul_params(config) + attention // 2


@pytest.mark.parametrize("name", [n for n in forge_models.list_sizes() if n.endswith("-debug")])
def test_names_are_the_models(name):
    """The walk asks about exactly the model's parameters (a tied head under both names) and
    its linear layers, in module order: the patterns mean what they mean on the model."""
    model = forge_models.build_model(name, device="meta")
    walk = _TrainingWalk(model.config, 1, trainable=("*",), lora_rank=0, targets=())
    walk.run(input_grad=False)
    params = {n for n, _ in model.named_parameters()}
    if model.config.tie_word_embeddings:
        params.add("lm_head.weight")
    assert set(walk.params) == params
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert linear_layers(model.config) == linears == list(walk.linears)


def test_refuses_what_it_cannot_count():
    config = forge_models.get_config("qwen2-debug")
    with pytest.raises(ValueError, match="lora_rank must be >= 1"):
        flops_per_token(config, 8, trainable=(), lora_targets=("*q_proj",))
    with pytest.raises(ValueError, match="LoRA freezes the base weights"):
        flops_per_token(config, 8, lora_rank=4, lora_targets=("*q_proj",))
    with pytest.raises(ValueError, match=r"trainable pattern 'vision\.\*' matches no parameter"):
        flops_per_token(config, 8, trainable=("vision.*",))
    with pytest.raises(ValueError, match="match no linear layer"):
        flops_per_token(config, 8, trainable=(), lora_rank=4, lora_targets=("*qkv",))
    # One pattern may name layers this model lacks (a router), as apply_lora allows.
    flops_per_token(config, 8, trainable=(), lora_rank=4, lora_targets=("*q_proj", "*router"))
