"""Test helpers: a tiny Llama-like decoder in plain torch (optionally with Qwen3's per-head
QK-norm), a tiny ``transformers`` Llama, their tensor-parallel plans, and one training loop
shared by the single-process reference and every parallel layout (AdamW, gradient
accumulation, gradient clipping).

Imported by file path from the test modules (and, through them, by the worker pool).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

import forge_parallel
from forge_parallel import TPPlan, ZeroOptimizer


@dataclass(frozen=True, kw_only=True)
class TinyConfig:
    vocab: int = 64
    dim: int = 32
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn: int = 64
    eps: float = 1e-5
    tie: bool = False  # the head shares the embedding matrix
    qk_norm: bool = False  # Qwen3's per-head RMSNorm on queries and keys (``q_norm``/``k_norm``)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rotate(x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary position embedding (half-split convention) on ``x`` of shape (B, H, S, D).

    ``position_ids`` (S,): the tokens' positions (default ``arange(S)``; a context-parallel
    shard passes its global positions).
    """
    seq, half = x.shape[2], x.shape[3] // 2
    freq = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float32) / half))
    positions = torch.arange(seq) if position_ids is None else position_ids
    angle = positions.to(torch.float32)[:, None] * freq[None, :]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    """Grouped-query attention; with ``cfg.qk_norm``, Qwen3's ``q_norm``/``k_norm`` (one
    RMSNorm over ``head_dim`` shared by all heads, applied before the rotary embedding, as
    ``transformers``' ``Qwen3Attention``). Under tensor parallelism each rank normalises only
    its own heads, so those shared weights get partial gradients (plan style
    ``replicate_partial``)."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rotate(q, position_ids), _rotate(k, position_ids)
        repeat = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.dim, 2 * cfg.ffn, bias=False)
        self.down_proj = nn.Linear(cfg.ffn, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), position_ids)
        return x + self.mlp(self.mlp_norm(x))


class TinyLlama(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        if cfg.tie:
            self.lm_head.weight = self.embed.weight

    def forward(
        self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x) if position_ids is None else layer(x, position_ids)
        return self.lm_head(self.norm(x))


def tiny_plan(
    *, sequence_parallel: bool = False, loss_parallel: bool = True, qk_norm: str | None = None
) -> TPPlan:
    """The TinyLlama plan: Megatron attention/MLP split, vocab-parallel embedding and head.

    ``qk_norm``: the style of a QK-norm model's ``q_norm``/``k_norm`` (``"replicate_partial"``,
    the right one; another style only to show that the exactness test catches it).
    """
    norms = {} if qk_norm is None else {f"layers.*.attn.{n}": qk_norm for n in ("q_norm", "k_norm")}
    return TPPlan(
        styles={
            "embed": "vocab_parallel_embedding",
            "layers.*.attn_norm": "sequence_parallel",
            "layers.*.attn": "block_input",
            "layers.*.attn.q_proj": "colwise",
            "layers.*.attn.k_proj": "colwise",
            "layers.*.attn.v_proj": "colwise",
            "layers.*.attn.o_proj": "rowwise",
            **norms,
            "layers.*.mlp_norm": "sequence_parallel",
            "layers.*.mlp": "block_input",
            "layers.*.mlp.gate_up_proj": "colwise_packed",
            "layers.*.mlp.down_proj": "rowwise",
            "norm": "sequence_parallel",
            "lm_head": "loss_parallel" if loss_parallel else "colwise_output_replicated",
        },
        attributes={"layers.*.attn": {"num_heads": "divide", "num_kv_heads": "divide"}},
        sequence_parallel=sequence_parallel,
    )


def build_tiny(seed: int = 0, **overrides) -> TinyLlama:
    torch.manual_seed(seed)
    return TinyLlama(TinyConfig(**overrides))


def build_tiny_qk_norm(seed: int = 0) -> TinyLlama:
    """The tiny Llama with QK-norm, its norm weights drawn from [0.5, 1.5] instead of ones (as a
    trained checkpoint's are), so that their scaling takes part in the forward too."""
    model = build_tiny(seed, qk_norm=True)
    with torch.no_grad():
        for layer in model.layers:
            for norm in (layer.attn.q_norm, layer.attn.k_norm):
                norm.weight.uniform_(0.5, 1.5)
    return model


# -- transformers' Llama -----------------------------------------------------------------


#: The shape of every tiny ``transformers`` model here (2 layers, GQA 4 / 2 heads).
HF_TINY = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def build_hf_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        **HF_TINY,
        attn_implementation="sdpa",
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).float()


def build_hf_mistral(seed: int = 0) -> nn.Module:
    """``transformers``' Mistral, its sliding window as long as the training sequence (``SEQ``
    tokens): full causal attention, which context parallelism runs."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(
        **HF_TINY,
        sliding_window=SEQ,
        attn_implementation="sdpa",
        tie_word_embeddings=False,
    )
    return MistralForCausalLM(config).float()


def build_hf_phi3_gqa(seed: int = 0) -> nn.Module:
    """``transformers``' Phi3 with grouped-query attention: its fused ``qkv_proj`` packs
    unequal parts (4 query heads, 2 key and 2 value heads: 32, 16 and 16 rows)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    config = Phi3Config(
        **HF_TINY,
        pad_token_id=None,  # its default (32000) lies outside the tiny vocabulary
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
        tie_word_embeddings=False,
    )
    return Phi3ForCausalLM(config).float()


def hf_phi3_plan(*, sequence_parallel: bool = False) -> TPPlan:
    """Phi3's plan: the fused projections packed (``qkv_proj`` in head proportions 4:2:2), and
    under sequence parallelism the recipe for a ``transformers`` model (README): the embedding
    output stays whole, because ``transformers`` derives positions and masks from its length,
    and the first decoder layer cuts the sequence."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import RowwiseParallel

    a, m = "model.layers.*.self_attn", "model.layers.*.mlp"
    styles: dict = {
        "model.embed_tokens": "vocab_parallel_embedding",
        a: "block_input",
        f"{a}.qkv_proj": "colwise_packed:4,2,2",
        f"{a}.o_proj": "rowwise",
        m: "block_input",
        f"{m}.gate_up_proj": "colwise_packed",
        f"{m}.down_proj": "rowwise",
        "lm_head": "loss_parallel",
    }
    if sequence_parallel:
        styles["model.embed_tokens"] = RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Replicate()
        )
        styles["model.layers.0"] = "sequence_scatter"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            styles[f"model.layers.*.{norm}"] = "sequence_parallel"
        styles["model.norm"] = "sequence_parallel"
    return TPPlan(
        styles=styles,
        # Phi3 slices qkv at config.num_attention_heads * head_dim and reads
        # self.num_key_value_heads: both must become the local counts
        attributes={a: {"config.num_attention_heads": "divide", "num_key_value_heads": "divide"}},
        sequence_parallel=sequence_parallel,
    )


HF_LLAMA_PLAN = TPPlan(
    styles={
        "model.embed_tokens": "vocab_parallel_embedding",
        "model.layers.*.self_attn": "block_input",  # hidden_states arrives as a keyword
        "model.layers.*.self_attn.q_proj": "colwise",
        "model.layers.*.self_attn.k_proj": "colwise",
        "model.layers.*.self_attn.v_proj": "colwise",
        "model.layers.*.self_attn.o_proj": "rowwise",
        "model.layers.*.mlp": "block_input",
        "model.layers.*.mlp.gate_proj": "colwise",
        "model.layers.*.mlp.up_proj": "colwise",
        "model.layers.*.mlp.down_proj": "rowwise",
        "lm_head": "loss_parallel",
    },
    # transformers derives local head counts from tensor shapes: only check divisibility.
    attributes={
        "model.layers.*.self_attn": {
            "config.num_attention_heads": "check",
            "config.num_key_value_heads": "check",
        }
    },
)


def logits_of(
    model: nn.Module, tokens: torch.Tensor, position_ids: torch.Tensor | None = None
) -> torch.Tensor:
    if isinstance(model, TinyLlama):  # FSDP/replicate subclass the model's class
        return model(tokens) if position_ids is None else model(tokens, position_ids)
    if position_ids is None:
        return model(input_ids=tokens, use_cache=False).logits
    # Training passes no KV cache; transformers then reads a zigzag shard's positions as packed
    # documents, which context parallelism must not turn into a local mask.
    positions = position_ids[None].expand_as(tokens)
    return model(input_ids=tokens, position_ids=positions, use_cache=False).logits


def _cp_shard(
    result: forge_parallel.ParallelizeResult | None, inputs: torch.Tensor, labels: torch.Tensor
):
    """Context parallelism: this rank's tokens, labels and global positions, and its group."""
    mesh = result.mesh if result is not None else None
    if mesh is None or mesh.dims.cp == 1:
        return inputs, labels, None, None
    from forge_parallel.context_parallel import CPConfig, shard_positions, shard_sequence

    group = mesh["cp"]
    load_balance = (result.context_parallel or CPConfig()).load_balance
    layout = {"cp_size": group.size(), "cp_rank": group.get_local_rank()}
    layout["load_balance"] = load_balance
    positions = shard_positions(inputs.shape[1], **layout)
    return (
        shard_sequence(inputs, dim=1, **layout),
        shard_sequence(labels, dim=1, **layout),
        positions,
        group,
    )


# -- training ---------------------------------------------------------------------------

STEPS, ACCUM, BATCH, SEQ = 5, 2, 4, 8
LR, MAX_NORM = 1e-3, 0.5


def make_batches(vocab: int = 64, seed: int = 1234) -> list[list[torch.Tensor]]:
    """``STEPS`` steps of ``ACCUM`` micro-batches of token ids, (BATCH, SEQ + 1) each."""
    gen = torch.Generator().manual_seed(seed)
    return [
        [torch.randint(0, vocab, (BATCH, SEQ + 1), generator=gen) for _ in range(ACCUM)]
        for _ in range(STEPS)
    ]


def _value(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def train(
    model: nn.Module,
    batches: list[list[torch.Tensor]],
    *,
    result: forge_parallel.ParallelizeResult | None = None,
    optimizer: dict | None = None,
) -> dict:
    """Train on ``batches``; returns per-step losses and grad norms (averaged over DP ranks).

    Without ``result`` this is the single-process reference (torch's AdamW and clipping).
    """
    mesh = result.mesh if result is not None else None
    dp_group = mesh["dp"] if mesh is not None else None
    dp_size = dp_group.size() if dp_group is not None else 1
    dp_rank = dp_group.get_local_rank() if dp_group is not None else 0
    if result is None:
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    else:
        opt = result.build_optimizer(
            torch.optim.AdamW, lr=LR, weight_decay=0.1, **(optimizer or {})
        )
    losses, norms = [], []
    for micro_batches in batches:
        step_loss = torch.zeros(())
        for i, tokens in enumerate(micro_batches):
            rows = tokens.chunk(dp_size)[dp_rank]
            inputs, labels = rows[:, :-1], rows[:, 1:]
            inputs, labels, position_ids, cp_group = _cp_shard(result, inputs, labels)
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or result is None else result.no_sync()
            loss_ctx = result.loss_context() if result is not None else contextlib.nullcontext()
            with sync, loss_ctx:
                logits = logits_of(model, inputs, position_ids)
                if cp_group is None:
                    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
                else:
                    from forge_parallel.context_parallel import context_parallel_cross_entropy

                    loss = context_parallel_cross_entropy(logits, labels, group=cp_group)
                loss = loss / len(micro_batches)
                loss.backward()
            step_loss += _value(loss).detach()
        if isinstance(opt, ZeroOptimizer):
            norm = opt.clip_grad_norm_(MAX_NORM)
        elif result is None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        else:
            norm = forge_parallel.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        opt.zero_grad()
        if dp_group is not None:
            dist.all_reduce(step_loss, group=dp_group.get_group())
            step_loss /= dp_size
        losses.append(step_loss.item())
        norms.append(_value(norm).item())
    return {"losses": losses, "norms": norms}


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: _value(p.detach()).clone() for n, p in model.named_parameters()}


def rank0_reference(initial: nn.Module, batches) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(train record, final parameters)`` of a single-process run of a copy of ``initial``,
    trained on rank 0 only and broadcast: at 8 ranks on a small machine, a copy per rank would
    cost more than the layouts themselves. The run must clip (its norms exceed ``MAX_NORM``)."""
    trained: list = [None, None]
    if dist.get_rank() == 0:
        reference_model = copy.deepcopy(initial)
        trained = [train(reference_model, batches), full_params(reference_model)]
    dist.broadcast_object_list(trained, src=0)
    reference, ref_params = trained
    assert max(reference["norms"]) > MAX_NORM, reference["norms"]
    return reference, ref_params


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def compare(reference: dict, ref_params: dict, got: dict, got_params: dict) -> dict[str, float]:
    """Worst relative errors of losses, grad norms and final parameters."""
    assert ref_params.keys() == got_params.keys(), set(ref_params) ^ set(got_params)
    loss = max(
        abs(a - b) / max(abs(b), 1e-12)
        for a, b in zip(got["losses"], reference["losses"], strict=True)
    )
    norm = max(
        abs(a - b) / max(abs(b), 1e-12)
        for a, b in zip(got["norms"], reference["norms"], strict=True)
    )
    param = max(rel_err(got_params[n], ref_params[n]) for n in ref_params)
    assert math.isfinite(loss)
    assert math.isfinite(param)
    return {"loss": loss, "norm": norm, "param": param}


def run_layouts(build: str, layouts: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Train the reference and every layout (``parallelize`` keyword arguments) on this rank."""
    from forge_core import ParallelDims

    factory = {
        "tiny": build_tiny,
        "tiny_qk_norm": build_tiny_qk_norm,
        "hf": build_hf_llama,
        "hf_mistral": build_hf_mistral,
        "hf_phi3_gqa": build_hf_phi3_gqa,
    }[build]
    batches = make_batches()
    reference_model = factory()
    initial = copy.deepcopy(reference_model)
    reference = train(reference_model, batches)
    ref_params = full_params(reference_model)
    # The clipping threshold must bite, or clipping is not being tested.
    assert max(reference["norms"]) > MAX_NORM, reference["norms"]
    out = {}
    for name, layout in layouts.items():
        kwargs = dict(layout)
        dims = ParallelDims(world_size=dist.get_world_size(), **kwargs.pop("dims"))
        optimizer = kwargs.pop("optimizer", None)
        model = copy.deepcopy(initial)
        result = forge_parallel.parallelize(model, dims, **kwargs)
        got = train(result.model, batches, result=result, optimizer=optimizer)
        out[name] = compare(reference, ref_params, got, full_params(result.model))
    return out


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run inside it, by name (``counts["aten.mm"]``): what a recompute
    policy reran in backward."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))
