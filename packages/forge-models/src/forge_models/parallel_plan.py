"""Default tensor / sequence-parallel plans as data: module path pattern -> style name.

A plan is a plain ``dict`` that forge-parallel applies from outside the model (the model knows
nothing about parallelism); users can print, copy and override it. Patterns are module paths
relative to the model with ``*`` for any layer index (``"layers.*.attn.q_proj"``). Styles,
after Megatron-LM (Shoeybi et al. 2019, arXiv:1909.08053) and sequence parallelism (Korthikanti
et al. 2022, arXiv:2205.05198):

``colwise``
    ``nn.Linear`` weight (and bias) sharded on dim 0, the output features: each rank computes
    a slice of the heads / features. Input replicated (all-gathered from sequence shards under
    sequence parallelism); output stays sharded on the last dim.
``colwise_packed``
    ``colwise`` for a weight that packs two equal projections along dim 0 (``gate_up_proj``:
    gate rows, then up rows). Each half is sharded separately, so rank ``r`` holds
    ``[gate_r; up_r]`` and ``chunk(2, dim=-1)`` of its local output gives matching gate and up
    slices. Sharding the packed weight as one block would pair the wrong rows.
``rowwise``
    weight sharded on dim 1, the input features (the input arrives sharded on its last dim from
    the ``colwise`` layer before it); partial outputs are all-reduced, or reduce-scattered over
    the sequence dim under sequence parallelism.
``sequence_parallel``
    a norm runs on the rank's slice of the sequence (input and output sharded on dim 1),
    weights replicated.
``block_input``
    the input of a block of column-parallel layers (``attn``, ``mlp``): all-gathered from
    sequence shards under sequence parallelism (else marked replicated), once for all the
    block's projections, whose input gradients are then reduced once.
``vocab_parallel_embedding``
    embedding rows (the vocabulary) sharded; each rank looks up the ids it owns, the partial
    outputs are all-reduced (reduce-scattered over the sequence dim under sequence parallelism).
``colwise_output_replicated``
    the output projection sharded over the vocabulary, logits all-gathered to every rank.
``loss_parallel``
    the output projection sharded over the vocabulary with logits left sharded, for a
    vocabulary-parallel cross-entropy.
``replicate``
    weights replicated on every rank (an MoE router, the shared-expert gate). forge-parallel's
    ``replicate`` style makes them replicated DTensors and runs the module on its local
    (plain tensor) input; under sequence parallelism on its sequence shard, with the weight
    gradients summed over tp. It refuses a DTensor input, so with forge-parallel a
    ``replicate`` module cannot sit inside a ``block_input`` block as ``MOE_TP_PLAN``'s router
    and MLA's latent projections do (and ``expert_parallel`` is forge-parallel's ``EPConfig``,
    not a plan style). forge-train therefore gives each MoE layer's whole block one
    ``replicate`` entry on the full sequence (``forge_train.components._text_plan``), as
    forge-parallel's tests do on sequence shards; there each rank routes its own shard, so a
    load-balancing loss or an expert-bias update would need its token counts summed over tp.
``expert_parallel``
    (MoE) the stacked expert weights ``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` and
    ``mlp.experts.down_proj`` ``[E, H, I]`` sharded along dim 0, the expert dim, over the
    expert-parallel axis (GShard, Lepikhin et al. 2020, arXiv:2006.16668): each rank holds
    ``E / ep`` whole experts; the routed token rows are sent to their experts' ranks
    (all-to-all) and the outputs sent back before ``moe_unpermute``. ``MoEExperts`` reads its
    local expert count from its weights. (forge-parallel does not apply this style yet.)

The attention reads its local head counts from the projection outputs, so no module attribute
needs dividing by the tensor-parallel degree. The per-head ``attn.q_norm`` / ``attn.k_norm`` of
Qwen3 act on the local heads of a ``colwise`` q/k projection with replicated weights, so they
need no entry. With tied embeddings the embedding and output projection share one matrix; a
plan must shard it consistently for both. Vocabulary padding
(``TransformerConfig.vocab_pad_multiple``) makes the vocabulary divisible by the
tensor-parallel degree.

Called with ``labels``, the model does not call ``lm_head``: it passes ``lm_head.weight`` and the
final hidden states to ``forge_kernels.fused_linear_cross_entropy``. A vocabulary-sharded
``lm_head`` therefore serves the logits path (no labels) as planned; the fused loss path needs
the full weight (or a vocabulary-parallel fused loss, not provided yet).
"""

from __future__ import annotations

__all__ = [
    "DEEPSEEK_V3_TP_PLAN",
    "DENSE_TP_PLAN",
    "MOE_TP_PLAN",
    "STYLES",
    "plan_without_sequence_parallel",
]

#: Every style name a forge plan may use, with a one-line meaning (details above).
STYLES: dict[str, str] = {
    "colwise": "shard weight dim 0 (output features); output sharded on the last dim",
    "colwise_packed": "colwise per half of a [gate; up] packed weight",
    "rowwise": "shard weight dim 1 (input features); outputs all-reduced / reduce-scattered",
    "sequence_parallel": "module runs on a sequence shard (dim 1), replicated weights",
    "block_input": "input of a block of colwise layers: gathered from sequence shards once",
    "vocab_parallel_embedding": "embedding rows sharded; outputs all-reduced / reduce-scattered",
    "colwise_output_replicated": "output projection sharded over vocab; logits gathered",
    "loss_parallel": "output projection sharded over vocab; logits left sharded for the loss",
    "replicate": "weights replicated on every rank of the axis (e.g. an MoE router)",
    "replicate_partial": "weights replicated, run on this rank's heads (QK-norm): gradients "
    "summed over tp",
    "gathered_input": "input of a block mixing replicated and colwise layers (MLA): gathered "
    "from sequence shards as a plain tensor, its gradient already whole",
    "reduce_grad": "identity whose gradient is summed over tp (MLA's shared rotary key)",
    "expert_parallel": "stacked expert weights sharded along dim 0 (the expert dim) over the "
    "expert-parallel axis; tokens dispatched to their experts' ranks and combined back",
}

#: The plan of the dense Llama/Qwen decoders (with sequence parallelism).
DENSE_TP_PLAN: dict[str, str] = {
    "embed_tokens": "vocab_parallel_embedding",
    "layers.*.attn_norm": "sequence_parallel",
    "layers.*.attn": "block_input",
    "layers.*.attn.q_proj": "colwise",
    "layers.*.attn.k_proj": "colwise",
    "layers.*.attn.v_proj": "colwise",
    "layers.*.attn.o_proj": "rowwise",
    "layers.*.mlp_norm": "sequence_parallel",
    "layers.*.mlp": "block_input",
    "layers.*.mlp.gate_up_proj": "colwise_packed",
    "layers.*.mlp.down_proj": "rowwise",
    "norm": "sequence_parallel",
    "lm_head": "colwise_output_replicated",
}


#: The plan of the mixture-of-experts decoders (Qwen2-MoE, Qwen3-MoE): the dense plan (which
#: still applies to their dense layers, ``mlp_only_layers``), plus the MoE layers' router
#: (replicated), routed experts (``"expert_parallel"``: ``mlp.experts.gate_up_proj``
#: ``[E, 2I, H]`` and ``mlp.experts.down_proj`` ``[E, H, I]`` sharded on dim 0, E divisible by
#: the expert-parallel degree) and shared expert (tensor parallel like a dense MLP; its scalar
#: gate replicated).
MOE_TP_PLAN: dict[str, str] = {
    **DENSE_TP_PLAN,
    "layers.*.mlp.router": "replicate",
    "layers.*.mlp.experts": "expert_parallel",
    "layers.*.mlp.shared_expert.gate_up_proj": "colwise_packed",
    "layers.*.mlp.shared_expert.down_proj": "rowwise",
    "layers.*.mlp.shared_expert_gate": "replicate",
}


def _deepseek_v3_block_plan(prefix: str) -> dict[str, str]:
    """One DeepSeek-V3 decoder block at ``prefix`` (``layers.*`` or an MTP module's block)."""
    return {
        f"{prefix}.attn_norm": "sequence_parallel",
        # Multi-head latent attention: the projections that produce per-head outputs are
        # column-parallel over the heads (each reduces its latent input's gradient); the latent
        # down-projections and their norms stay plain and replicated, run on the whole sequence
        # (``gathered_input``); the rotary key, read by every head, has its gradient summed.
        f"{prefix}.attn": "gathered_input",
        f"{prefix}.attn.q_proj": "colwise",
        f"{prefix}.attn.q_b_proj": "colwise",
        f"{prefix}.attn.kv_b_proj": "colwise",
        f"{prefix}.attn.shared_rope_key": "reduce_grad",
        f"{prefix}.attn.o_proj": "rowwise",
        f"{prefix}.mlp_norm": "sequence_parallel",
        f"{prefix}.mlp": "block_input",
        f"{prefix}.mlp.gate_up_proj": "colwise_packed",
        f"{prefix}.mlp.down_proj": "rowwise",
        f"{prefix}.mlp.router": "replicate",
        f"{prefix}.mlp.experts": "expert_parallel",
        f"{prefix}.mlp.shared_expert.gate_up_proj": "colwise_packed",
        f"{prefix}.mlp.shared_expert.down_proj": "rowwise",
    }


#: The plan of DeepSeek-V3 (arXiv:2412.19437), as torchtitan's: multi-head latent attention
#: sharded over heads (``q_proj``/``q_b_proj``/``kv_b_proj`` colwise, ``o_proj`` rowwise; the
#: ``q_a_proj``/``kv_a_proj`` latent projections replicated on the whole sequence, the shared
#: rotary key's gradient summed over the ranks), the MoE layers as in
#: ``MOE_TP_PLAN`` (no shared-expert gate), and the same for the multi-token prediction
#: modules' blocks; their ``eh_proj`` is replicated. The selection bias ``mlp.expert_bias`` is a
#: buffer, replicated and updated identically on every rank.
DEEPSEEK_V3_TP_PLAN: dict[str, str] = {
    "embed_tokens": "vocab_parallel_embedding",
    **_deepseek_v3_block_plan("layers.*"),
    **_deepseek_v3_block_plan("mtp.*.block"),
    "mtp.*.eh_proj": "replicate",
    "norm": "sequence_parallel",
    "lm_head": "colwise_output_replicated",
}


def plan_without_sequence_parallel(plan: dict[str, str]) -> dict[str, str]:
    """``plan`` for tensor parallelism alone: norms replicated (their entries dropped)."""
    return {k: v for k, v in plan.items() if v != "sequence_parallel"}
