"""Parameter and FLOP counts per token, for MFU.

``flops_per_token(config, seq_len)`` is the training cost (forward + backward) of one token
when every parameter trains:

    6 * N_matmul + 12 * L * (num_heads * head_dim) * seq_len

- ``N_matmul``: the weights of every matrix multiply: q, k, v, o, gate/up and down projections
  of every layer, plus the output projection with the real vocabulary (counted also when it is
  tied to the input embedding: the multiply happens either way). The embedding lookup, norms
  and biases are left out (no multiply, or negligible). Each weight costs 2 FLOPs per token
  forward (multiply + add) and 4 backward (gradients of input and weight): 6 in all.
- The attention term counts ``q kᵀ`` and ``softmax · v``: ``2 * 2 * seq_len * num_heads *
  head_dim`` FLOPs per token and layer forward, times 3 for forward + backward: ``12 L H Q T``
  as in PaLM (Chowdhery et al. 2022, arXiv:2204.02311, appendix B) and Megatron-LM (Narayanan
  et al. 2021, arXiv:2104.04473, whose ``72 B s l h² (1 + s / 6h + V / 12 h l)`` is the same
  count for ``num_heads * head_dim == hidden``). Like both, it does not halve the attention
  term for the causal mask; pass ``causal=True`` for the work a causal kernel really does.
- Mixture-of-experts layers count only the *active* weights per token: the router
  (``hidden * num_experts``), ``num_experts_per_tok`` routed experts
  (``3 * hidden * moe_intermediate_size`` each), and the shared expert with its gate
  (``3 * hidden * shared_expert_intermediate_size``, ``+ hidden`` for its gate) where there is
  one. Dense layers of an MoE model (``mlp_only_layers``, ``decoder_sparse_step``) count their
  dense MLP. :func:`count_params` counts every expert.
- Multi-head latent attention (DeepSeek-V2 arXiv:2405.04434, DeepSeek-V3 arXiv:2412.19437)
  counts its five projections as they run in training (keys and values up-projected per
  head): ``q`` (``hidden * H * (d_nope + d_rope)``, or through the q latent
  ``hidden * q_lora_rank + q_lora_rank * H * (d_nope + d_rope)``), ``kv_a``
  (``hidden * (kv_lora_rank + d_rope)``), ``kv_b`` (``kv_lora_rank * H * (d_nope + d_v)``) and
  ``o`` (``H * d_v * hidden``). Its attention term is ``6 * L * H * (d_nope + d_rope + d_v) *
  seq_len`` (``q kᵀ`` over the query/key width, ``softmax · v`` over the value width; the GQA
  formula's ``12 L H Q T`` is this with both widths equal to ``head_dim``).
- Multi-token prediction modules (``mtp_depth`` ``D``) run in training: each adds its
  ``eh_proj`` (``2 * hidden * hidden``), its block and another pass through the output
  projection to ``N_matmul``, and its block's attention to the attention term.

Partial training (``trainable``, ``lora_rank``/``lora_targets``, ``input_grad``): a run whose
weights do not all train computes less, and MFU in PaLM's sense counts the FLOPs the model
requires, which do not include the weight gradients of frozen weights. Each matmul is then
counted as autograd runs it, in the order the model runs (the module names are those of
``build_model(config)``; :func:`linear_layers` lists its linear layers). Per token:

    linear with N weights       2 N x (1 + weight_trains + grad_in)
    LoRA adapter of rank r      2 r in x (2 + grad_in) + 6 r out      (on an [in -> out] linear)
    attention                   F_att x (1 + 2 * (q, k or v carries a gradient))

``grad_in``: the matmul's input carries a gradient, i.e. something before it in the graph
trains: the embedding, a norm weight, a bias, an earlier weight or adapter, or with
``input_grad`` a part before the language model (a vision-language model's trained projector
or encoder). ``F_att`` is the forward attention term above (``4 H Q T`` per layer, MLA
``2 H (d_nope + d_rope + d_v) T``). An adapter's ``A [r, in]`` reads the layer's input
(forward, its weight gradient, the input's gradient if it carries one), ``B [out, r]`` reads
``A``'s output, which carries a gradient (forward, weight and input gradients). The attention
backward counts ``dq``, ``dk`` and ``dv`` whenever it runs, as fused kernels (flash-attn, SDPA)
compute them (and, as everywhere here, not the scores a fused backward recomputes: model
FLOPs, not hardware FLOPs). So a LoRA run costs ``4 N`` per base weight, ``2 N`` where no gradient reaches
(the projections of layer 0 before its first adapter read the frozen embedding through a
frozen norm), plus its adapters; a frozen language model ``4 N`` behind a trained projector
and ``2 N`` (attention ``1x``) with nothing trained before it. A mixture-of-experts layer's
router counts as a linear layer (its output weights the experts, so it carries a gradient if
its input does), the active experts as ``num_experts_per_tok`` rows of their stacked weights
(never LoRA targets). With every parameter trained (the default) this is the count above.

A vision-language model's encoder and projector cost per image, not per token (patches, and
windowed or per-tile attention): :func:`forge_models.vision_flops.visual_flops` counts them
per batch of visual items, in the same convention; add it to ``tokens x flops_per_token``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import nn

from forge_models.config import TransformerConfig

__all__ = ["active_params", "count_params", "flops_per_token", "linear_layers", "matmul_params"]


def _config(config_or_model: TransformerConfig | nn.Module) -> TransformerConfig:
    config = getattr(config_or_model, "config", config_or_model)
    if not isinstance(config, TransformerConfig):
        raise TypeError(
            f"expected a TransformerConfig or a forge model, got {type(config).__name__}"
        )
    return config


def count_params(config: TransformerConfig | nn.Module, *, embedding: bool = True) -> int:
    """Parameters of the model ``build_model(config)`` builds (a tied matrix counted once).

    ``embedding=False`` leaves out the input embedding table (and with it a tied output
    projection, which is the same matrix); vocabulary padding rows count as parameters.
    """
    c = _config(config)
    d = c.hidden_size
    attn = _attn_params(c, with_norms_and_biases=True)
    layers = [*range(c.num_layers), *range(c.num_layers, c.num_layers + c.mtp_depth)]
    total = sum(attn + _mlp_params(c, i, active=False) + 2 * d for i in layers)
    total += c.mtp_depth * (2 * d * d + 3 * d)  # eh_proj, enorm, hnorm, norm
    table = c.padded_vocab_size * d
    total += d + (0 if c.tie_word_embeddings else table)
    return total + table if embedding else total


def _attn_params(c: TransformerConfig, *, with_norms_and_biases: bool = False) -> int:
    """Weights of one attention layer's projections (plus its norms and biases if asked)."""
    d, mla = c.hidden_size, c.mla
    if mla is None:
        params = d * c.q_size + 2 * d * c.kv_size + c.q_size * d
        if with_norms_and_biases:
            params += (c.q_size + 2 * c.kv_size) * c.attention_bias + d * c.attention_out_bias
            params += 2 * c.head_dim * c.qk_norm
        return params
    h, q_out = c.num_heads, c.num_heads * mla.qk_head_dim
    params = d * q_out if mla.q_lora_rank is None else d * mla.q_lora_rank + mla.q_lora_rank * q_out
    params += d * (mla.kv_lora_rank + mla.qk_rope_head_dim)
    params += mla.kv_lora_rank * h * (mla.qk_nope_head_dim + mla.v_head_dim)
    params += h * mla.v_head_dim * d
    if with_norms_and_biases:
        params += mla.kv_lora_rank + (mla.q_lora_rank or 0)  # latent norms
        if c.attention_bias:  # q_a_proj (with a q latent), kv_a_proj and o_proj
            params += (mla.q_lora_rank or 0) + mla.kv_lora_rank + mla.qk_rope_head_dim + d
    return params


def _mlp_params(c: TransformerConfig, layer_idx: int, *, active: bool) -> int:
    """Weights of layer ``layer_idx``'s MLP (of a token's active experts with ``active``)."""
    d = c.hidden_size
    if not c.is_moe_layer(layer_idx):
        return 3 * d * c.intermediate_size
    moe = c.moe
    experts = moe.num_experts_per_tok if active else moe.num_experts
    params = d * moe.num_experts + experts * 3 * d * moe.moe_intermediate_size
    if moe.shared_expert_intermediate_size:
        params += 3 * d * moe.shared_expert_intermediate_size + d * moe.shared_expert_gate
    return params


def matmul_params(config: TransformerConfig | nn.Module) -> int:
    """``N_matmul`` of :func:`flops_per_token`: every matmul weight a token uses, output
    projection included (for MoE layers the router, the active experts and the shared expert)."""
    c = _config(config)
    d = c.hidden_size
    attn = _attn_params(c)
    layers = sum(attn + _mlp_params(c, i, active=True) for i in range(c.num_layers + c.mtp_depth))
    mtp = c.mtp_depth * (2 * d * d + c.vocab_size * d)
    return layers + c.vocab_size * d + mtp


def active_params(config: TransformerConfig | nn.Module, *, embedding: bool = True) -> int:
    """Parameters one token computes with (the "activated parameters" of MoE model cards): every
    parameter except the experts a token is not routed to, without the multi-token prediction
    modules (which only run in training).

    Model cards differ on the input embedding table: Qwen counts it (Qwen3-30B-A3B: 3.3B,
    Qwen1.5-MoE-A2.7B: 2.7B), DeepSeek does not (DeepSeek-V3: 37B, DeepSeek-V2-Lite: 2.4B):
    ``embedding=False`` leaves it out (the output projection counts either way, also when tied).
    """
    c = _config(config)
    if c.mtp_depth:
        c = c.replace(mtp_depth=0)
    inactive = sum(
        _mlp_params(c, i, active=False) - _mlp_params(c, i, active=True)
        for i in range(c.num_layers)
    )
    table = c.padded_vocab_size * c.hidden_size
    tied_head = table if c.tie_word_embeddings else 0
    total = count_params(c, embedding=False) + tied_head - inactive
    return total + table if embedding else total


def linear_layers(config: TransformerConfig | nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``build_model(config)``, in module order: what
    ``lora_targets`` (and forge-train's ``lora.targets``) match. A mixture-of-experts layer's
    routed experts are stacked weights, not linear layers."""
    walk = _TrainingWalk(_config(config), 1, trainable=("*",), lora_rank=0, targets=())
    walk.run(input_grad=False)
    return list(walk.linears)


def flops_per_token(
    config: TransformerConfig | nn.Module,
    seq_len: int,
    *,
    causal: bool = False,
    trainable: str | Iterable[str] = ("*",),
    lora_rank: int = 0,
    lora_targets: Iterable[str] = (),
    input_grad: bool = False,
) -> int:
    """Training FLOPs (forward + backward) per token at sequence length ``seq_len``.

    By default every parameter trains: ``6 * N_matmul + 12 * L * num_heads * head_dim *
    seq_len`` (see the module docstring; MLA: ``6 * L * H * (qk_head_dim + v_head_dim) *
    seq_len``, ``L`` including the MTP blocks). With ``causal=True`` the attention term is
    halved. Multiply by tokens per second and divide by the hardware's peak FLOP/s for MFU.

    A run that trains only part of the model (LoRA, a frozen language model behind a trained
    vision projector) computes less: the options say what trains, and each matmul is counted
    as autograd runs it (module docstring, "Partial training"):

    Args:
        trainable: fnmatch patterns of the parameter names (as ``build_model(config)`` names
            them: ``embed_tokens.weight``, ``layers.0.attn_norm.weight``,
            ``layers.0.mlp.experts.gate_up_proj``) that get gradients; ``()``: none (the base
            model of a LoRA run, a frozen language model). A tied output head is the embedding
            and trains if either name matches. Every pattern must match a parameter.
        lora_rank, lora_targets: LoRA adapters of rank ``lora_rank`` on every ``nn.Linear``
            whose module name (``layers.0.attn.q_proj``, ``layers.1.mlp.gate_up_proj``,
            ``lm_head``) matches one of the fnmatch patterns ``lora_targets``, as forge-train's
            ``lora.targets`` match a language model's modules; their base weights must not be
            ``trainable``. The patterns must match at least one linear layer together (as
            forge-train's ``apply_lora`` requires; one may name layers only some models have).
        input_grad: the language model's input embeddings carry a gradient: a part before it
            trains (a vision-language model's projector or encoder), so even a frozen language
            model runs the gradient of every matmul's input.

    Raises:
        ValueError: ``seq_len < 1``, a negative ``lora_rank`` or adapters without a rank, a
            ``trainable`` pattern or ``lora_targets`` that match nothing, or an adapted layer
            whose base weight trains.
    """
    c = _config(config)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    patterns = (trainable,) if isinstance(trainable, str) else tuple(trainable)
    targets = (lora_targets,) if isinstance(lora_targets, str) else tuple(lora_targets)
    if lora_rank < 0 or (targets and lora_rank < 1):
        raise ValueError(
            f"lora_rank must be >= 1 for lora_targets {list(targets)}, got {lora_rank}; "
            "pass the adapters' rank, or no lora_targets for a run without LoRA"
        )
    walk = _TrainingWalk(c, seq_len, trainable=patterns, lora_rank=lora_rank, targets=targets)
    walk.run(input_grad=input_grad)
    return walk.matmul + (walk.attention // 2 if causal else walk.attention)


class _TrainingWalk:
    """One token's way through the language model, each matmul counted as autograd runs it.

    Walks the modules in the order :class:`~forge_models.causal_lm.CausalLM` runs them, under
    the names ``build_model`` gives them, carrying whether the hidden state carries a gradient
    (some parameter before it trains, or ``input_grad``). A linear layer with ``N`` weights
    costs ``2 N`` forward, ``2 N`` more if its weight trains and ``2 N`` more if its input
    carries a gradient; its output carries one if its input does, or its weight, bias or
    adapter trains. A norm's output carries one if its input does or its weight trains.
    ``matmul`` and ``attention`` accumulate the two terms of the count; ``params`` and
    ``linears`` the names asked about, to check the patterns against.
    """

    def __init__(
        self,
        c: TransformerConfig,
        seq_len: int,
        *,
        trainable: tuple[str, ...],
        lora_rank: int,
        targets: tuple[str, ...],
    ) -> None:
        self.c, self.seq_len = c, seq_len
        self.patterns, self.rank, self.targets = trainable, lora_rank, targets
        self.params: dict[str, None] = {}  # (ordered sets)
        self.linears: dict[str, None] = {}
        self.matmul = 0
        self.attention = 0

    # -- primitives ---------------------------------------------------------------------------

    def trains(self, *names: str) -> bool:
        """Whether the parameter (several names: one tied tensor) gets a gradient."""
        self.params.update(dict.fromkeys(names))
        return any(fnmatch.fnmatchcase(n, p) for n in names for p in self.patterns)

    def norm(self, name: str, grad: bool) -> bool:
        return self.trains(f"{name}.weight") or grad

    def linear(
        self,
        name: str,
        d_in: int,
        d_out: int,
        grad: bool,
        *,
        bias: bool = False,
        weight: tuple[str, ...] | None = None,
        rows: int = 1,
    ) -> bool:
        """Count ``nn.Linear`` ``name`` (``[d_out, d_in]``, ``rows`` rows per token) on an input
        that carries a gradient iff ``grad``; returns whether its output carries one.
        ``weight``: the weight's parameter name(s) when not ``<name>.weight`` (a stacked expert
        weight, which LoRA cannot adapt; a tied head)."""
        stacked = weight is not None and f"{name}.weight" not in weight
        w = self.trains(*(weight or (f"{name}.weight",)))
        b = bias and self.trains(f"{name}.bias")
        self.matmul += 2 * d_in * d_out * rows * (1 + w + grad)
        out = w or b or grad
        if stacked:
            return out
        self.linears[name] = None
        if any(fnmatch.fnmatchcase(name, p) for p in self.targets):
            if w:
                raise ValueError(
                    f"lora_targets {list(self.targets)} adapt {name}, whose base weight also "
                    f"trains (trainable={list(self.patterns)}); LoRA freezes the base weights: "
                    "pass trainable=() or only the patterns of what trains beside the adapters"
                )
            # A reads x: forward, its weight gradient, x's gradient if x carries one; B reads
            # A's output (which carries a gradient): forward, weight and input gradients.
            r = self.rank
            self.matmul += rows * (2 * r * d_in * (2 + grad) + 6 * r * d_out)
            out = True
        return out

    # -- the model ----------------------------------------------------------------------------

    def run(self, *, input_grad: bool) -> None:
        c = self.c
        d, vocab = c.hidden_size, c.vocab_size
        tied = c.tie_word_embeddings
        embed = ("embed_tokens.weight", "lm_head.weight") if tied else ("embed_tokens.weight",)
        head = embed if tied else ("lm_head.weight",)
        embeds = self.trains(*embed)
        h = embeds or input_grad
        for i in range(c.num_layers):
            h = self.block(f"layers.{i}", i, h)
        self.linear("lm_head", d, vocab, self.norm("norm", h), weight=head)
        for k in range(c.mtp_depth):  # h: the main model's (then the previous depth's) output
            m = f"mtp.{k}"
            e, hidden = self.norm(f"{m}.enorm", embeds), self.norm(f"{m}.hnorm", h)
            merged = self.linear(f"{m}.eh_proj", 2 * d, d, e or hidden)
            h = self.block(f"{m}.block", c.num_layers + k, merged)
            self.linear("lm_head", d, vocab, self.norm(f"{m}.norm", h), weight=head)
        self.check_patterns()

    def block(self, prefix: str, layer_idx: int, h: bool) -> bool:
        h = self.attn(f"{prefix}.attn", self.norm(f"{prefix}.attn_norm", h)) or h
        return self.mlp(f"{prefix}.mlp", layer_idx, self.norm(f"{prefix}.mlp_norm", h)) or h

    def attn(self, p: str, x: bool) -> bool:
        c, mla = self.c, self.c.mla
        d = c.hidden_size
        if mla is None:
            bias = c.attention_bias
            q = self.linear(f"{p}.q_proj", d, c.q_size, x, bias=bias)
            k = self.linear(f"{p}.k_proj", d, c.kv_size, x, bias=bias)
            v = self.linear(f"{p}.v_proj", d, c.kv_size, x, bias=bias)
            if c.qk_norm:
                q, k = self.norm(f"{p}.q_norm", q), self.norm(f"{p}.k_norm", k)
            core = q or k or v
            self.attention += 4 * self.seq_len * c.q_size * (1 + 2 * core)
            return self.linear(f"{p}.o_proj", c.q_size, d, core, bias=c.attention_out_bias)
        heads, bias = c.num_heads, c.attention_bias
        q_out = heads * mla.qk_head_dim
        if mla.q_lora_rank is None:
            q = self.linear(f"{p}.q_proj", d, q_out, x)
        else:
            q = self.linear(f"{p}.q_a_proj", d, mla.q_lora_rank, x, bias=bias)
            q = self.linear(f"{p}.q_b_proj", mla.q_lora_rank, q_out, self.norm(f"{p}.q_a_norm", q))
        kv_a = self.linear(
            f"{p}.kv_a_proj", d, mla.kv_lora_rank + mla.qk_rope_head_dim, x, bias=bias
        )
        kv = self.linear(
            f"{p}.kv_b_proj",
            mla.kv_lora_rank,
            heads * (mla.qk_nope_head_dim + mla.v_head_dim),
            self.norm(f"{p}.kv_a_norm", kv_a),
        )
        core = q or kv_a or kv  # keys: kv_b's and kv_a's rotary part; values: kv_b's
        self.attention += (
            2 * self.seq_len * heads * (mla.qk_head_dim + mla.v_head_dim) * (1 + 2 * core)
        )
        return self.linear(f"{p}.o_proj", heads * mla.v_head_dim, d, core, bias=bias)

    def mlp(self, p: str, layer_idx: int, x: bool) -> bool:
        c = self.c
        d = c.hidden_size
        if not c.is_moe_layer(layer_idx):
            up = self.linear(f"{p}.gate_up_proj", d, 2 * c.intermediate_size, x)
            return self.linear(f"{p}.down_proj", c.intermediate_size, d, up)
        moe = c.moe
        inter, k = moe.moe_intermediate_size, moe.num_experts_per_tok
        router = self.linear(f"{p}.router", d, moe.num_experts, x)  # the routing weights' grad
        gate_up = f"{p}.experts.gate_up_proj"
        up = self.linear(gate_up, d, 2 * inter, x, weight=(gate_up,), rows=k)
        down = f"{p}.experts.down_proj"
        out = self.linear(down, inter, d, up, weight=(down,), rows=k) or router
        shared = moe.shared_expert_intermediate_size
        if shared:
            s = self.linear(f"{p}.shared_expert.gate_up_proj", d, 2 * shared, x)
            out = self.linear(f"{p}.shared_expert.down_proj", shared, d, s) or out
            if moe.shared_expert_gate:
                out = self.linear(f"{p}.shared_expert_gate", d, 1, x) or out
        return out

    def check_patterns(self) -> None:
        """``ValueError`` for a ``trainable`` pattern that matches no parameter, or
        ``lora_targets`` that match no linear layer (forge-train's ``lora.apply_lora`` rule: one
        pattern may name layers that only some models have)."""
        for pattern in self.patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in self.params):
                raise ValueError(
                    f"trainable pattern {pattern!r} matches no parameter of this language model; "
                    f"its parameters are named like {', '.join(sorted(self.params)[:4])}"
                )
        if self.targets and not any(
            fnmatch.fnmatchcase(n, p) for n in self.linears for p in self.targets
        ):
            raise ValueError(
                f"lora_targets {list(self.targets)} match no linear layer of this language "
                f"model; its linear layers are named like {', '.join(sorted(self.linears)[:4])}"
            )
