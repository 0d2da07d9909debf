"""Shared scaffolding of the parity tests against transformers (test_hf_parity.py,
test_moe_parity.py, test_deepseek_parity.py): build a reference model from a small config with
random weights, save it, load it through ``forge_models.from_pretrained``, and compare logits and
every parameter's gradient through the family's forge-ckpt mapping. Nothing is downloaded.

Loaded by path (``_helpers()`` in each test file), as the tests run with
``--import-mode=importlib``.
"""

from __future__ import annotations

import torch

import forge_models
from forge_ckpt import get_mapping

#: Max relative error (Frobenius norm) of logits, losses and gradients in float32.
RTOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def ids(vocab: int, *shape: int, seed: int = 1) -> torch.Tensor:
    """Random token ids in ``[1, vocab)`` (0 stays free for padding)."""
    return torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(seed))


def probe(vocab: int, shape, seed: int = 2) -> torch.Tensor:
    """Fixed random weights: loss = sum(logits * probe) gives every logit a gradient."""
    return torch.randn(*shape, vocab, generator=torch.Generator().manual_seed(seed))


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Move every float parameter and buffer of ``model`` off its values in place (as training
    would), e.g. before checking that an export carries the model's weights, not its source's."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(scale * torch.randn(t.shape, generator=gen))


class HFPair:
    """A transformers model with informative random weights, its saved folder, and the forge
    model loaded from it.

    Norm weights (which start at 1), biases and MoE routers (which start at 0) and DeepSeek's
    selection bias buffer are re-drawn so that every parameter matters.
    """

    def __init__(
        self,
        config_cls: str,
        model_cls: str,
        config: dict,
        hf_dir,
        *,
        max_shard_size: str | None = None,
        seed: int = 0,
    ) -> None:
        import transformers

        torch.manual_seed(seed)
        self.ref_cls = getattr(transformers, model_cls)
        self.ref = self.ref_cls(getattr(transformers, config_cls)(**config)).eval()
        with torch.no_grad():
            for pname, p in self.ref.named_parameters():
                if "norm" in pname:
                    p.copy_(1 + 0.2 * torch.randn_like(p))
                elif pname.endswith("bias"):
                    p.copy_(0.1 * torch.randn_like(p))
                elif pname.endswith("mlp.gate.weight") or "shared_expert_gate" in pname:
                    p.copy_(0.3 * torch.randn_like(p))
            for bname, b in self.ref.named_buffers():
                if bname.endswith("e_score_correction_bias"):
                    b.copy_(0.05 * torch.randn_like(b))
        self.hf_dir = hf_dir
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        self.ref.save_pretrained(hf_dir, **kwargs)
        self.model = forge_models.from_pretrained(hf_dir)

    def zero_grad(self) -> None:
        self.ref.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)

    def forge_grads_as_hf(self, **ctx_options) -> dict[str, torch.Tensor]:
        """Every forge gradient under its checkpoint name, through the same mapping as weights
        (buffers such as DeepSeek's selection bias are mapped along and dropped)."""
        config = self.model.config
        spec = get_mapping(forge_models.get_family(config.family).ckpt_mapping)
        ctx = spec.context(
            self.model.hf_config, vocab_pad_multiple=config.vocab_pad_multiple, **ctx_options
        )
        grads = {n: p.grad for n, p in self.model.named_parameters()}
        assert all(g is not None for g in grads.values()), [
            n for n, g in grads.items() if g is None
        ]
        buffers = dict(self.model.named_buffers())
        mapped = dict(spec.forge_to_hf({**grads, **buffers}.items(), ctx))
        hf_buffers = {n for n, _ in self.ref.named_buffers()}
        return {n: t for n, t in mapped.items() if n not in hf_buffers}

    def assert_grads_match(self, *, unused: tuple[str, ...] = (), **ctx_options) -> None:
        """``unused``: reference parameters that no output depends on (e.g. SigLIP's
        post-layernorm, which LLaVA-OneVision loads but never applies): they must get no
        gradient there, and forge carries them as buffers (mapped along, not trained)."""
        params = dict(self.ref.named_parameters())
        assert all(params[n].grad is None for n in unused), unused
        ref = {n: p.grad for n, p in params.items() if n not in unused}
        ours = self.forge_grads_as_hf(**ctx_options)
        for name in unused:  # a carried buffer: its value, equal to the reference's weight
            assert torch.equal(ours.pop(name), params[name].detach()), name
        assert sorted(ours) == sorted(ref)  # every parameter, no more, no less
        for name, g in ref.items():
            if g.norm() < 1e-6:
                # Zero up to rounding on both sides: e.g. the router of a top-1 layer with
                # norm_topk_prob (every routing weight is exactly 1) and no aux loss.
                assert ours[name].norm() < 1e-6, name
                continue
            assert rel(ours[name], g) <= RTOL, (name, rel(ours[name], g))
