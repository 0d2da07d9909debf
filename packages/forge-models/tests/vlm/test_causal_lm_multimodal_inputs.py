"""CausalLM's multimodal inputs: ``inputs_embeds``, M-RoPE position ids and ``block_ids``."""

from __future__ import annotations

import pytest
import torch

import forge_models
from forge_kernels.registry import reference_implementations

TINY = {"num_layers": 2, "vocab_size": 97}


@pytest.fixture(autouse=True)
def _eager_kernels():
    """The kernels have their own tests; here the eager references keep the model fast."""
    with reference_implementations():
        yield


def _model(**overrides) -> forge_models.CausalLM:
    torch.manual_seed(0)
    return forge_models.build_model("qwen2-debug", **{**TINY, **overrides}).eval()


def _ids(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 97, shape, generator=torch.Generator().manual_seed(seed))


def test_inputs_embeds_equal_token_embeddings():
    model = _model()
    ids = _ids(2, 12)
    with torch.no_grad():
        ref = model(ids)
        out = model(ids, inputs_embeds=model.embed_tokens(ids))
        loss_ref = model(ids, labels=ids)
        loss = model(ids, labels=ids, inputs_embeds=model.embed_tokens(ids))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        model(ids, inputs_embeds=torch.zeros(2, 11, model.config.hidden_size))


def test_mrope_with_equal_components_is_1d_rope_and_sections_matter():
    config = forge_models.get_config("qwen2-debug", **TINY)
    half = config.rope_dim // 2
    section = (half - 2 * (half // 3), half // 3, half // 3)
    plain = _model()
    mrope = _model(mrope_section=section)
    mrope.load_state_dict(plain.state_dict())
    ids = _ids(2, 10)
    pos = torch.arange(10).expand(2, 10)
    with torch.no_grad():
        ref = plain(ids, position_ids=pos)
        torch.testing.assert_close(mrope(ids, position_ids=pos), ref, rtol=0, atol=0)
        torch.testing.assert_close(
            mrope(ids, position_ids=pos.expand(3, 2, 10)), ref, rtol=0, atol=0
        )
        grid = pos.expand(3, 2, 10).clone()
        grid[1] = grid[1] // 2  # height/width rows differ: the output must change
        assert not torch.allclose(mrope(ids, position_ids=grid), ref)
    with pytest.raises(ValueError, match="3 rows"):
        mrope(ids, position_ids=pos.expand(2, 2, 10))
    with pytest.raises(ValueError, match="mrope_section"):
        config.replace(mrope_section=(1, 1, 1))


def test_block_ids_make_blocks_bidirectional_and_keep_text_causal():
    model = _model()
    ids = _ids(1, 12)
    block_ids = torch.full((1, 12), -1)
    block_ids[0, 3:7] = 0
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] % 96) + 1  # the block's last token
    with torch.no_grad():
        base = model(ids, block_ids=block_ids)
        after = model(changed, block_ids=block_ids)
        causal = model(ids)
    # tokens before the block never see it; block tokens see their whole block
    torch.testing.assert_close(after[0, :3], base[0, :3], rtol=0, atol=0)
    assert not torch.allclose(after[0, 3], base[0, 3])
    # all -1 is plain causal attention; a block changes the block's outputs but not the prefix
    torch.testing.assert_close(model(ids, block_ids=torch.full((1, 12), -1)), causal)
    torch.testing.assert_close(base[0, :3], causal[0, :3], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(base[0, 3], causal[0, 3])


def test_packed_block_ids_match_separate_documents():
    model = _model()
    a, b = _ids(7, seed=3), _ids(5, seed=4)
    blocks_a = torch.tensor([-1, 0, 0, 0, -1, -1, -1])
    blocks_b = torch.tensor([-1, -1, 0, 0, -1])
    with torch.no_grad():
        ref_a = model(a[None], block_ids=blocks_a[None])
        ref_b = model(b[None], block_ids=blocks_b[None])
        packed = model(
            torch.cat([a, b])[None],
            cu_seqlens=torch.tensor([0, 7, 12]),
            block_ids=torch.cat([blocks_a, blocks_b + (blocks_b >= 0) * 1])[None],
        )
        labels = torch.cat([a, b])[None]
        loss = model(labels, cu_seqlens=torch.tensor([0, 7, 12]), labels=labels,
                     block_ids=torch.cat([blocks_a, blocks_b + (blocks_b >= 0)])[None])  # fmt: skip
    torch.testing.assert_close(packed[0, :7], ref_a[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[0, 7:], ref_b[0], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(loss)
