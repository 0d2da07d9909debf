"""The torchtitan contender: torchtitan's own Llama 3 model, built with the case's architecture.

torchtitan (Liang et al. 2024, "TorchTitan: One-stop PyTorch native solution for production ready
LLM pre-training", arXiv:2410.06511) ships its model as ``torchtitan.models.llama3.Llama3Model``
built from a tree of config dataclasses; ``torchtitan.models.llama3.model_registry`` only offers
its named flavors (whose 1B/3B RoPE scaling factor is 8, not Llama 3.2's 32), so this module
builds the tree itself from the case's :class:`forge_models.TransformerConfig` with torchtitan's
own helpers (``make_gqa_config`` with the fused ``wqkv``, ``make_ffn_config``, ``ComplexRoPE``
with Llama scaling), loads the shared Hugging Face weights through torchtitan's
``Llama3StateDictAdapter.from_hf`` and checks that its matmul weights equal
``forge_models.matmul_params`` (so the MFU column, computed from the case, means the same).

Training setup, as the other rows: bf16 weights and AdamW state (torchtitan's trainer would keep
fp32 weights under FSDP mixed precision), eager (no ``torch.compile``: the forge row does not
compile either), torchtitan's ``FullAC`` per block for ``+recompute`` and its
``cross_entropy_loss`` (sum, divided by the valid targets). Packed rows: on CUDA torchtitan's
``VarlenAttention`` with the document boundaries from the restarting positions (what its
dataloaders emit; FA3/FA4 where torchtitan picks them and their package is installed, else
torch's built-in FlashAttention 2: :func:`flash_attention_for_varlen`); on CPU its flex attention has no backward and varlen attention is CUDA only,
so the row falls back to torchtitan's ``ScaledDotProductAttention``, causal over each whole
packed row, and its note says so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch

import forge_models
from forge_models import IGNORE_INDEX, TransformerConfig

__all__ = [
    "build_torchtitan",
    "flash_attention_for_varlen",
    "load_torchtitan_llama",
    "torchtitan_llama_config",
]


def flash_attention_for_varlen() -> tuple[contextlib.AbstractContextManager, str]:
    """The FlashAttention that torchtitan's ``VarlenAttention`` will run, and how to build it.

    torchtitan activates FA3 on Hopper and FA4 on Blackwell
    (``torchtitan.tools.utils.get_cuda_flash_attention_impl``), which needs their packages
    (``flash_attn_interface`` for FA3); without them its constructor raises. Then the attention
    is built as on older GPUs, with torch's built-in FlashAttention 2 kernels of ``varlen_attn``,
    and the row's note says so. Returns a context to build the model in and that note.
    """
    from torch.nn.attention import activate_flash_attention_impl
    from torchtitan.tools.utils import get_cuda_flash_attention_impl

    wanted = get_cuda_flash_attention_impl()
    if wanted is None:
        return contextlib.nullcontext(), "varlen_attn with torch's built-in FlashAttention 2"
    try:
        activate_flash_attention_impl(wanted)
    except (ImportError, RuntimeError) as exc:
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        builtin = mock.patch(
            "torchtitan.tools.utils.get_cuda_flash_attention_impl", return_value=None
        )
        return builtin, f"torch's built-in FlashAttention 2, not torchtitan's {wanted} ({why})"
    return contextlib.nullcontext(), f"varlen_attn with {wanted}"


def torchtitan_llama_config(config: TransformerConfig, *, seq: int, varlen: bool):
    """torchtitan's ``Llama3Model.Config`` for ``config`` (dense Llama family only)."""
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention, VarlenAttention
    from torchtitan.models.common.config_utils import make_ffn_config, make_gqa_config
    from torchtitan.models.llama3.model import Llama3Model, Llama3TransformerBlock

    unsupported = [
        name
        for name, bad in (
            ("family", config.family != "llama"),
            ("moe", config.moe is not None),
            ("mla", config.mla is not None),
            ("attention_bias", config.attention_bias or config.attention_out_bias),
            ("qk_norm", config.qk_norm),
            ("mtp_depth", config.mtp_depth > 0),
        )
        if bad
    ]
    if unsupported:
        raise ValueError(
            f"the torchtitan runner builds dense Llama models only; this config sets "
            f"{unsupported} (family {config.family!r})"
        )
    dim, eps = config.hidden_size, config.rms_norm_eps
    scaling = config.rope_scaling
    if scaling is not None and type(scaling).__name__ != "Llama3RopeScaling":
        raise ValueError(f"torchtitan's ComplexRoPE has no {type(scaling).__name__}")
    rope = ComplexRoPE.Config(
        dim=config.head_dim,
        max_seq_len=seq,
        theta=config.rope_theta,
        **(
            {}
            if scaling is None
            else {
                "scaling": "llama",
                "scaling_factor": scaling.factor,
                "low_freq_factor": scaling.low_freq_factor,
                "high_freq_factor": scaling.high_freq_factor,
                "original_max_position_embeddings": scaling.original_max_position_embeddings,
            }
        ),
    )
    inner = VarlenAttention.Config() if varlen else ScaledDotProductAttention.Config()
    layers = [
        Llama3TransformerBlock.Config(
            attention_norm=RMSNorm.Config(normalized_shape=dim, eps=eps),
            ffn_norm=RMSNorm.Config(normalized_shape=dim, eps=eps),
            attention=make_gqa_config(
                dim=dim,
                n_heads=config.num_heads,
                n_kv_heads=config.num_kv_heads,
                head_dim=config.head_dim,
                wqkv_param_init={},
                wo_param_init={},
                inner_attention=inner,
                fuse_qkv=True,
                rope=rope,
            ),
            feed_forward=make_ffn_config(
                dim=dim,
                hidden_dim=config.intermediate_size,
                w1_param_init={},
                w2w3_param_init={},
            ),
        )
        for _ in range(config.num_layers)
    ]
    vocab = config.vocab_size
    return Llama3Model.Config(
        dim=dim,
        vocab_size=vocab,
        enable_weight_tying=config.tie_word_embeddings,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim),
        norm=RMSNorm.Config(normalized_shape=dim, eps=eps),
        lm_head=Linear.Config(in_features=dim, out_features=vocab),
        layers=layers,
    )


def _matmul_weights(model: torch.nn.Module) -> int:
    """Weights of every ``nn.Linear`` (the tied output head counted as a matmul)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def load_torchtitan_llama(
    hf_dir: str,
    config: TransformerConfig,
    *,
    seq: int,
    dtype: torch.dtype,
    device: torch.device,
    varlen: bool,
) -> torch.nn.Module:
    """torchtitan's Llama 3 with the weights of the Hugging Face folder ``hf_dir``."""
    from safetensors.torch import load_file
    from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter

    model_config = torchtitan_llama_config(config, seq=seq, varlen=varlen)
    with torch.device(device):  # builds the RoPE cache (complex64) on the device
        model = model_config.build()
    files = sorted(Path(hf_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {hf_dir}")
    hf_state: dict[str, torch.Tensor] = {}
    for file in files:
        hf_state.update(load_file(file))
    state = Llama3StateDictAdapter(model_config, None).from_hf(hf_state)
    state = {k: v.to(dtype) for k, v in state.items()}
    # Parameters only: Module.to(dtype) would also cast the complex RoPE cache to a real dtype.
    for param in model.parameters():
        param.data = param.data.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"torchtitan weights do not match: missing {missing}, unexpected "
                         f"{unexpected}")  # fmt: skip
    expected = forge_models.matmul_params(config)
    if _matmul_weights(model) != expected:
        raise ValueError(
            f"torchtitan's model has {_matmul_weights(model):,} matmul weights, the case "
            f"{expected:,}: the architectures differ and MFU would not compare"
        )
    return model


def build_torchtitan(
    job, device: torch.device, *, dtype: torch.dtype
) -> tuple[torch.nn.Module, Callable[[], torch.Tensor], list[str]]:
    """The model, one step's loss closure and the row's notes for a forge-bench job."""
    from torchtitan.components.loss import cross_entropy_loss

    from forge_bench.data import packed_batch

    config: TransformerConfig | None = job.config
    if config is None:
        raise ValueError(
            "the torchtitan runner builds the model from Job.config; pass the case's config"
        )
    varlen = device.type == "cuda"
    dtype_name = str(dtype).removeprefix("torch.")
    notes = [f"{dtype_name} weights + AdamW (as every row); eager, no torch.compile (as forge)"]
    attention_context, attention_note = (
        flash_attention_for_varlen() if varlen else (contextlib.nullcontext(), "")
    )
    with attention_context:
        model = load_torchtitan_llama(
            job.hf_dir, config, seq=job.seq, dtype=dtype, device=device, varlen=varlen
        )
    if job.impl.recompute:
        from torchtitan.distributed.activation_checkpoint import FullAC

        FullAC(FullAC.Config()).apply(model)
        notes.append("torchtitan FullAC per block")
    _, titan_flops = model.config.get_nparams_and_flops(model, job.seq)
    forge_flops = forge_models.flops_per_token(config, job.seq)
    notes.append(f"torchtitan's own FLOP count {titan_flops / forge_flops - 1:+.2%} vs MFU's")
    batch = packed_batch(rows=job.rows, seq=job.seq, vocab_size=job.vocab_size)
    inputs = batch.hf_inputs(device, packed=varlen)
    tokens = inputs["input_ids"]
    targets = forge_models.shift_labels(inputs["labels"])
    valid = (targets != IGNORE_INDEX).sum()
    if varlen:
        positions = inputs["position_ids"]
        masks = model.get_attention_masks(positions)
        notes.append(f"packed (torchtitan VarlenAttention from the positions; {attention_note})")
    else:
        positions = masks = None
        notes.append("causal over each packed row (on CPU torchtitan's flex attention has no "
                     "backward and its varlen attention does not run)")  # fmt: skip

    def step() -> torch.Tensor:
        logits = model(tokens, positions, masks)
        return cross_entropy_loss(logits, targets) / valid

    return model, step, notes
