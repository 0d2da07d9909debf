"""What one run measures: cases (a model at a sequence length) and their implementations.

A :class:`Case` is one model config at one row length with a batch of ``rows`` packed rows; its
:class:`Impl` entries are the contenders that run the same training step on the same weights.
Implementations whose library is missing carry a ``skip`` reason and show as such in the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from forge_bench.peers import PeerStatus
from forge_models import MoEConfig, TransformerConfig, get_config

__all__ = ["LLM_SIZES", "Case", "Impl", "llm_cases", "moe_cases"]

#: ``--sizes`` name -> (forge size, tokens per step). 16k tokens for ~1B; ~3B takes 8k so that
#: transformers (fp32 logits of 128k vocabulary) fits 80 GB without recompute at 8192.
LLM_SIZES: dict[str, tuple[str, int]] = {
    "1b": ("llama3.2-1b", 16384),
    "3b": ("llama3.2-3b", 8192),
}


@dataclass(frozen=True, kw_only=True)
class Impl:
    """One contender. ``runner`` is ``"forge"``, ``"transformers"``, ``"torchtitan"`` or
    ``"megatron-core"`` (see ``forge_bench.worker.BUILDERS``); the rest are options."""

    name: str
    runner: str
    recompute: bool = False
    fp8_recipe: str | None = None
    fp8_backend: str = "torch"
    liger: bool = False
    skip: str | None = None


@dataclass(frozen=True, kw_only=True)
class Case:
    """One model at one row length: ``rows`` rows of ``seq`` packed tokens per step."""

    workload: str
    label: str
    config: TransformerConfig
    seq: int
    rows: int
    impls: tuple[Impl, ...] = field(default=())

    @property
    def tokens(self) -> int:
        return self.rows * self.seq


def _peer_impls(
    peers: dict[str, PeerStatus], *, recompute: bool, liger: bool, own_models: bool = False
) -> list[Impl]:
    """transformers (+ Liger-Kernel), and with ``own_models`` the peers that build the model
    their own way (torchtitan's ``Llama3Model``, Megatron-Core's ``GPTModel``)."""
    tag = " +recompute" if recompute else ""
    hf = peers["transformers"]
    impls = [Impl(name=f"transformers{tag}", runner="transformers", recompute=recompute,
                  skip=hf.reason)]  # fmt: skip
    if liger:
        lk = peers["liger-kernel"]
        impls.append(
            Impl(
                name=f"transformers+liger{tag}",
                runner="transformers",
                recompute=recompute,
                liger=True,
                skip=hf.reason or lk.reason,
            )
        )
    if own_models:
        for name in ("torchtitan", "megatron-core"):
            impls.append(Impl(name=f"{name}{tag}", runner=name, recompute=recompute,
                              skip=peers[name].reason))  # fmt: skip
    return impls


def llm_cases(
    *,
    sizes: list[str],
    seqs: list[int],
    peers: dict[str, PeerStatus],
    smoke: bool,
    tokens: int | None = None,
) -> list[Case]:
    """The dense Llama cases: forge bf16 / +recompute / FP8 (blockwise, current, TE) against
    transformers (SDPA), transformers + Liger-Kernel, torchtitan and Megatron-Core."""
    te = peers["transformer-engine"]
    impls = [
        Impl(name="forge", runner="forge"),
        *_peer_impls(peers, recompute=False, liger=True, own_models=True),
        Impl(name="forge +recompute", runner="forge", recompute=True),
        *_peer_impls(peers, recompute=True, liger=False, own_models=True),
        Impl(name="forge fp8-blockwise", runner="forge", fp8_recipe="blockwise"),
        Impl(name="forge fp8-current", runner="forge", fp8_recipe="current"),
        Impl(
            name="forge fp8-current (TE)",
            runner="forge",
            fp8_recipe="current",
            fp8_backend="te",
            skip=te.reason,
        ),
    ]
    if smoke:  # every contender's code path, on a model small enough for CPU
        config = get_config(
            "llama3-debug", hidden_size=128, intermediate_size=256, num_heads=8,
            num_kv_heads=4, head_dim=32,
        )  # fmt: skip
        return [Case(workload="llm", label="llama-tiny", config=config, seq=64, rows=2,
                     impls=tuple(impls))]  # fmt: skip
    cases = []
    for size in sizes:
        if size not in LLM_SIZES:
            raise ValueError(f"unknown --sizes entry {size!r}; known: {', '.join(LLM_SIZES)}")
        name, step_tokens = LLM_SIZES[size]
        step_tokens = tokens or step_tokens
        for seq in seqs:
            rows = max(1, step_tokens // seq)
            cases.append(Case(workload="llm", label=name, config=get_config(name), seq=seq,
                              rows=rows, impls=tuple(impls)))  # fmt: skip
    return cases


def moe_config(*, smoke: bool) -> TransformerConfig:
    """Qwen3-MoE-style, one GPU: hidden 2048, 8 layers, 64 experts of 768, top-8 (~3.1B
    parameters, ~0.9B active); ``smoke``: the 2-layer, 8-expert debug size."""
    if smoke:
        return get_config("qwen3-moe-debug")
    moe = MoEConfig(
        num_experts=64, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True
    )
    return get_config("qwen3-30b-a3b", num_layers=8, moe=moe)


def moe_cases(
    *, seqs: list[int], peers: dict[str, PeerStatus], smoke: bool, tokens: int | None = None
) -> list[Case]:
    """Forge's Qwen3-MoE against transformers' ``Qwen3MoeForCausalLM`` (and Liger-Kernel)."""
    impls = (Impl(name="forge", runner="forge"), *_peer_impls(peers, recompute=False, liger=True))
    config = moe_config(smoke=smoke)
    if smoke:
        return [Case(workload="moe", label="qwen3-moe-tiny", config=config, seq=64, rows=2,
                     impls=impls)]  # fmt: skip
    seq = seqs[0]
    rows = max(1, (tokens or 16384) // seq)
    return [Case(workload="moe", label="qwen3-moe-8x64e", config=config, seq=seq, rows=rows,
                 impls=impls)]  # fmt: skip
