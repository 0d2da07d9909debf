"""The Megatron-Core contender: ``megatron.core.models.gpt.GPTModel`` with the local layer spec.

Megatron-Core (Shoeybi et al. 2019, "Megatron-LM", arXiv:1909.08053; NVIDIA's ``megatron-core``
package) builds the case's architecture as a ``GPTModel`` from ``get_gpt_layer_local_spec``
(its own PyTorch modules, no Transformer Engine: RMSNorm, SwiGLU, grouped-query attention with
RoPE and Llama 3 scaling), in one process: ``torch.distributed`` is initialized for world size 1
and ``parallel_state.initialize_model_parallel(1, 1)``. The shared Hugging Face weights go
through forge-ckpt's ``hf_to_megatron`` (local spec, no vocabulary padding, ``legacy`` format),
and the matmul weights are checked against ``forge_models.matmul_params``.

Training setup, as the other rows: bf16 weights and AdamW state, eager; ``+recompute`` is
Megatron's full recompute of every layer (``recompute_granularity="full"``, ``"uniform"``, 1
layer per group). The local spec's ``DotProductAttention`` takes no packed-sequence metadata
(that needs Transformer Engine), so packed rows get a block-diagonal causal mask: each document
attends to itself only; RoPE positions run on across a row, which changes nothing within a
document (RoPE scores depend on position differences only). The loss is Megatron's own
per-token cross entropy, averaged over the valid targets.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable

import torch

import forge_models
from forge_models import IGNORE_INDEX, TransformerConfig

__all__ = [
    "block_causal_mask",
    "build_megatron",
    "load_megatron_gpt",
    "megatron_gpt",
    "release_parallel_state",
]


def block_causal_mask(lengths: tuple[tuple[int, ...], ...], seq: int) -> torch.Tensor:
    """Megatron's boolean attention mask ``[rows, 1, seq, seq]`` (``True`` = masked out): causal
    within each document of a row, nothing across documents."""
    masks = []
    for row in lengths:
        doc = torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row))
        allowed = (doc[:, None] == doc[None, :]) & torch.ones(seq, seq, dtype=torch.bool).tril()
        masks.append(~allowed)
    return torch.stack(masks)[:, None]


def _init_parallel_state(device: torch.device) -> None:
    """``torch.distributed`` at world size 1 and Megatron's model-parallel groups of size 1."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not dist.is_initialized():  # an in-process store: no address, no port to collide on
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    if device.type == "cuda":
        model_parallel_cuda_manual_seed(0)


def release_parallel_state() -> None:
    """Undo :func:`_init_parallel_state` (for callers that go on in the same process)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def megatron_gpt(
    config: TransformerConfig, *, seq: int, dtype: torch.dtype, device: torch.device,
    recompute: bool,
):  # fmt: skip
    """Megatron-Core's ``GPTModel`` for ``config`` (dense Llama family), local layer spec."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig as MegatronConfig

    if config.family != "llama" or config.moe is not None or config.mla is not None:
        raise ValueError(f"the Megatron-Core runner builds dense Llama models only, got "
                         f"family {config.family!r}")  # fmt: skip
    _init_parallel_state(device)
    recompute_args = (
        {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
        if recompute
        else {}
    )
    mcfg = MegatronConfig(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_heads,
        num_query_groups=config.num_kv_heads,
        kv_channels=config.head_dim,
        ffn_hidden_size=config.intermediate_size,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        layernorm_epsilon=config.rms_norm_eps,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=device.type != "cuda",
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        **recompute_args,
    )
    scaling = config.rope_scaling
    model = GPTModel(
        config=mcfg,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=config.vocab_size,
        max_sequence_length=seq,
        share_embeddings_and_output_weights=config.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=config.rope_theta,
        rope_scaling=scaling is not None,
        rope_scaling_factor=scaling.factor if scaling is not None else 8.0,
    )
    if scaling is not None:  # Megatron fixes the other Llama 3 scaling parameters: set them all
        rope = model.rotary_pos_emb
        dim = config.head_dim
        base = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        rope.inv_freq = rope._apply_scaling(
            base.to(rope.inv_freq.device),
            factor=scaling.factor,
            low_freq_factor=scaling.low_freq_factor,
            high_freq_factor=scaling.high_freq_factor,
            original_max_position_embeddings=scaling.original_max_position_embeddings,
        )
    return model.to(device)


def load_megatron_gpt(hf_dir: str, config: TransformerConfig, **kwargs) -> torch.nn.Module:
    """:func:`megatron_gpt` with the weights of the Hugging Face folder ``hf_dir``."""
    from forge_ckpt import hf_to_megatron

    model = megatron_gpt(config, **kwargs)
    with tempfile.TemporaryDirectory(prefix="forge_bench_megatron_") as tmp:
        out = hf_to_megatron(hf_dir, tmp, format="legacy", te_spec=False,
                             make_vocab_size_divisible_by=1, overwrite=True)  # fmt: skip
        files = sorted(out.rglob("model_optim_rng.pt"))
        if len(files) != 1:
            raise FileNotFoundError(f"expected one model_optim_rng.pt under {out}, got {files}")
        state = torch.load(files[0], map_location="cpu", weights_only=False)["model"]
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("._extra_state")]
    if missing or unexpected:
        raise ValueError(f"Megatron-Core weights do not match: missing {missing}, unexpected "
                         f"{unexpected}")  # fmt: skip
    matmul = sum(p.numel() for n, p in model.named_parameters() if "layernorm" not in n)
    if not config.tie_word_embeddings:  # the input embedding is no matmul
        matmul -= model.embedding.word_embeddings.weight.numel()
    if matmul != forge_models.matmul_params(config):
        raise ValueError(f"Megatron-Core's model has {matmul:,} matmul weights, the case "
                         f"{forge_models.matmul_params(config):,}: MFU would not compare")  # fmt: skip
    return model


def build_megatron(
    job, device: torch.device, *, dtype: torch.dtype
) -> tuple[torch.nn.Module, Callable[[], torch.Tensor], list[str]]:
    """The model, one step's loss closure and the row's notes for a forge-bench job."""
    from forge_bench.data import packed_batch

    config: TransformerConfig | None = job.config
    if config is None:
        raise ValueError(
            "the Megatron-Core runner builds the model from Job.config; pass the case's config"
        )
    model = load_megatron_gpt(job.hf_dir, config, seq=job.seq, dtype=dtype, device=device,
                              recompute=job.impl.recompute)  # fmt: skip
    dtype_name = str(dtype).removeprefix("torch.")
    notes = [f"{dtype_name} weights + AdamW as the other rows; local spec (no TE)"]
    if job.impl.recompute:
        notes.append("Megatron full recompute per layer")
    batch = packed_batch(rows=job.rows, seq=job.seq, vocab_size=job.vocab_size)
    inputs = batch.hf_inputs(device, packed=True)
    tokens = inputs["input_ids"]
    targets = forge_models.shift_labels(inputs["labels"])
    loss_mask = (targets != IGNORE_INDEX).float()
    labels = targets.clamp(min=0)  # Megatron's vocab-parallel cross entropy wants valid ids
    mask = block_causal_mask(batch.lengths, job.seq).to(device)
    positions = torch.arange(job.seq, device=device).expand_as(tokens)
    notes.append("packed (block-diagonal causal mask; the local spec has no varlen attention)")

    def step() -> torch.Tensor:
        per_token = model(tokens, positions, mask, labels=labels)
        return (per_token.float() * loss_mask).sum() / loss_mask.sum()

    return model, step, notes
