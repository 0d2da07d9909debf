"""DeepSeek-V3's sequence-wise balance loss of a packed row split over ranks (context
parallelism: zigzag or contiguous shards; sequence parallelism: contiguous chunks, the last
one short when the ranks do not divide the row; both: each context shard cut into sequence
chunks): the
per-document sums of every rank's tokens (each mapped to its document in the whole row by
:meth:`forge_train.sharded_routing.ShardedRouting.local_documents`) add up to the whole row's,
and the loss of the total equals the unsplit loss, in value and gradient."""

from __future__ import annotations

import pytest
import torch

from forge_models.blocks import RouterOutput
from forge_models.causal_lm import router_sequence_balance
from forge_train.sharded_routing import ShardedRouting

EXPERTS, TOP_K, LAYERS = 6, 2, 2
#: 16 tokens in 4 documents, one of them empty, three crossing the shards' boundaries.
CU_SEQLENS = torch.tensor([0, 3, 3, 9, 16])
DOCUMENTS = [0] * 3 + [2] * 6 + [3] * 7
TOKENS = 16


def _routing(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores [layers, tokens, experts] requiring grad, top-k indices)``: sigmoid affinities
    and their top-k, as DeepSeek-V3's router gives them."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(LAYERS, TOKENS, EXPERTS, generator=gen, dtype=torch.float64)
    scores = logits.sigmoid().float().requires_grad_()
    return scores, scores.detach().topk(TOP_K, dim=-1).indices


def _naive(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Eqs. 17-20 written out per layer and document (mean over the non-empty documents)."""
    total = torch.zeros(())
    for layer in range(LAYERS):
        per_document = []
        for a, b in zip(CU_SEQLENS[:-1].tolist(), CU_SEQLENS[1:].tolist(), strict=True):
            if b == a:
                continue
            s = scores[layer, a:b]
            normalised = s / s.sum(dim=-1, keepdim=True)
            picked = torch.zeros(EXPERTS).index_add_(
                0, indices[layer, a:b].reshape(-1), torch.ones((b - a) * TOP_K)
            )
            f = EXPERTS / (TOP_K * (b - a)) * picked
            per_document.append((f * normalised.mean(dim=0)).sum())
        total = total + torch.stack(per_document).mean()
    return total


def _unsplit(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """What the model computes on one process (``CausalLM``'s ``moe_stats.aux_loss``)."""
    shape = torch.Size((1, TOKENS))
    return sum(
        router_sequence_balance(
            RouterOutput(None, None, scores[layer], indices[layer]), shape, None, CU_SEQLENS
        )
        for layer in range(LAYERS)
    )


def _split(scores, indices, *, size: int, load_balance: bool, sp: int = 1) -> torch.Tensor:
    """Every rank's per-document sums of its own tokens, added up (the all-reduce), then the
    loss of the total, as :meth:`ShardedRouting.sequence_loss` forms it. ``sp``: each of the
    ``size`` context shards cut again into ``sp`` contiguous sequence-parallel chunks."""
    from forge_kernels.moe import sequence_balance_loss_from_sums, sequence_balance_sums
    from forge_parallel.context_parallel import shard_positions

    kwargs = {"input_ids": torch.zeros(1, TOKENS, dtype=torch.long), "cu_seqlens": CU_SEQLENS}
    total = 0
    for rank, chunk in ((r, c) for r in range(size) for c in range(sp)):
        routing = ShardedRouting(
            group=None, top_k=TOP_K, aux_loss="sequence", rank=rank, size=size,
            load_balance=load_balance, sequence_shard=chunk, sequence_shards=sp,
        )  # fmt: skip
        documents, count = routing.local_documents(kwargs)
        if load_balance:
            mine = shard_positions(TOKENS, cp_size=size, cp_rank=rank, load_balance=True)
        else:  # as a DTensor Shard(1) cuts the sequence (the last chunk may be short)
            mine = torch.arange(TOKENS).chunk(size)[rank]
        mine = mine.chunk(sp)[chunk]
        assert documents.tolist() == [DOCUMENTS[p] for p in mine.tolist()]
        total = total + torch.stack(
            [
                sequence_balance_sums(
                    scores[layer, mine], indices[layer, mine], documents, num_documents=count
                )
                for layer in range(LAYERS)
            ]
        )
    return sequence_balance_loss_from_sums(total, top_k=TOP_K)


@pytest.mark.parametrize(
    ("size", "load_balance", "sp"),
    [(2, True, 1), (2, False, 1), (4, False, 1), (3, False, 1), (2, True, 2)],
    ids=["zigzag2", "contiguous2", "contiguous4", "uneven3", "zigzag2_sp2"],
)
def test_split_row_gives_the_unsplit_loss_and_gradient(size, load_balance, sp):
    scores, indices = _routing(seed=size + load_balance)
    naive = _naive(scores, indices)
    (naive_grad,) = torch.autograd.grad(naive, scores)
    whole = _unsplit(scores, indices)
    (whole_grad,) = torch.autograd.grad(whole, scores)
    split = _split(scores, indices, size=size, load_balance=load_balance, sp=sp)
    (split_grad,) = torch.autograd.grad(split, scores)
    torch.testing.assert_close(whole, naive, rtol=1e-6, atol=0)
    torch.testing.assert_close(whole_grad, naive_grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=0)
    torch.testing.assert_close(split_grad, whole_grad, rtol=1e-5, atol=1e-8)
    # unbalanced routing scores above 1 (the loss is 1 for a perfectly balanced sequence)
    assert whole.item() > LAYERS


def test_a_shard_that_is_not_the_routed_tokens_is_refused():
    scores, indices = _routing(seed=0)
    routers = tuple(RouterOutput(None, None, scores[i, :8], indices[i, :8]) for i in range(2))
    routing = ShardedRouting(group=None, top_k=TOP_K, aux_loss="sequence", size=2)
    with pytest.raises(RuntimeError, match="routed 8 tokens but its share of the row has 16"):
        routing.sequence_loss(routers, torch.zeros(16).long(), 4)
    with pytest.raises(ValueError, match="the router saw 8 tokens but the batch"):
        router_sequence_balance(routers[0], torch.Size((1, TOKENS)), None, CU_SEQLENS)
