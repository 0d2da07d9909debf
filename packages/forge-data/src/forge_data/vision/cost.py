"""Cost of packed VLM rows for data-parallel balancing: language model plus vision encoder.

Two rows of the same token count can cost very different amounts when one holds a large image:
the vision encoder runs on every patch, and its attention grows with the square of the patches
in each sequence it attends over (one per tile, or per image / temporal group). A row's cost is
the :class:`forge_data.balance.QuadraticCost` of its documents (placeholder tokens included)
plus, for every encoder sequence of ``p`` patches, ``a*p + b*p*k + c``, where ``k`` is how many
patches each attends to: ``p`` for full attention, ``min(p, window)`` for windowed attention
(the Qwen2.5-VL ViT: 8 x 8 = 64-patch windows, with full attention in a few layers, the
``full_attention_fraction``). :meth:`VisionCost.fit` calibrates all six coefficients from
measured step times by non-negative least squares, as :meth:`QuadraticCost.fit` does.

The defaults are in units of one LLM token's linear-layer cost: a ViT of a tenth of the LLM's
parameters costs ``a = 0.1`` per patch, and with hidden size ``h_v`` its (bidirectional)
attention adds ``b / a ~ 1 / (6 h_v)`` per attended patch (``h_v = 1280``: ``b = 1.3e-5``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forge_data.balance import QuadraticCost, nonnegative_lstsq

__all__ = ["VisionCost"]


@dataclass(frozen=True, kw_only=True)
class VisionCost:
    """Row cost = ``llm`` cost of the documents + encoder cost of their visual sequences.

    Implements the ``CostModel`` protocol of :mod:`forge_data.balance`; without
    ``encoder_seqlens`` it is the LLM cost alone.
    """

    llm: QuadraticCost = field(default_factory=QuadraticCost)
    a: float = 0.1
    b: float = 1.3e-5
    c: float = 0.0
    window: int | None = None
    full_attention_fraction: float = 0.0

    def __post_init__(self):
        if min(self.a, self.b, self.c) < 0:
            raise ValueError(
                f"encoder cost coefficients must be >= 0, got a={self.a}, b={self.b}, c={self.c}"
            )
        if self.window is not None and self.window < 1:
            raise ValueError(
                f"window must be >= 1 patch or None (full attention), got {self.window}"
            )
        if not 0.0 <= self.full_attention_fraction <= 1.0:
            raise ValueError(
                f"full_attention_fraction must be in [0, 1], got {self.full_attention_fraction}"
            )

    def attended(self, seqlens: np.ndarray) -> np.ndarray:
        """Patches each patch attends to, averaged over the encoder's layers."""
        p = np.asarray(seqlens, dtype=np.float64)
        if self.window is None:
            return p
        f = self.full_attention_fraction
        return f * p + (1.0 - f) * np.minimum(p, self.window)

    def encoder_costs(self, seqlens: np.ndarray) -> np.ndarray:
        """Cost of each encoder sequence of ``seqlens[i]`` patches."""
        p = np.asarray(seqlens, dtype=np.float64)
        return self.a * p + self.b * p * self.attended(p) + self.c

    def row_costs(
        self,
        lengths: np.ndarray,
        rows: np.ndarray,
        n_rows: int,
        *,
        encoder_seqlens: np.ndarray | None = None,
        encoder_doc: np.ndarray | None = None,
    ) -> np.ndarray:
        """Cost of each of ``n_rows`` rows: document ``j`` (``lengths[j]`` tokens) is in row
        ``rows[j]``; encoder sequence ``i`` (``encoder_seqlens[i]`` patches) belongs to document
        ``encoder_doc[i]``."""
        costs = self.llm.row_costs(lengths, rows, n_rows)
        if encoder_seqlens is None:
            return costs
        if encoder_doc is None or len(encoder_doc) != len(encoder_seqlens):
            raise ValueError("encoder_doc must give the document of every encoder sequence")
        doc = np.bincount(
            np.asarray(encoder_doc, dtype=np.int64),
            weights=self.encoder_costs(encoder_seqlens),
            minlength=len(lengths),
        )
        return costs + np.bincount(rows, weights=doc, minlength=n_rows)

    def sample_row_costs(self, rows: Sequence[Sequence[Mapping[str, Any]]]) -> np.ndarray:
        """Costs of rows of VLM samples (dicts with ``input_ids`` and, for samples with visual
        items, ``visual["encoder_seqlens"]``), e.g. the rows of one global batch."""
        samples = [s for row in rows for s in row]
        lengths = np.array([len(s["input_ids"]) for s in samples], dtype=np.int64)
        row_of = np.repeat(np.arange(len(rows)), [len(row) for row in rows])
        seqlens = [
            np.asarray(s["visual"]["encoder_seqlens"]) if "visual" in s else np.zeros(0)
            for s in samples
        ]
        doc = np.repeat(np.arange(len(samples)), [len(x) for x in seqlens])
        flat = np.concatenate([np.zeros(0), *seqlens])
        return self.row_costs(lengths, row_of, len(rows), encoder_seqlens=flat, encoder_doc=doc)

    def sample_costs(self, samples: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Cost of each VLM sample on its own: its tokens' LLM cost plus its encoder sequences'
        (patch-counted) cost. A row's cost is their sum, so these are the per-document costs
        :func:`forge_data.document_balance.balance_step_documents` moves between rows."""
        return self.sample_row_costs([[s] for s in samples])

    @classmethod
    def fit(
        cls,
        step_lengths: Sequence[Sequence[int]],
        step_encoder_seqlens: Sequence[Sequence[int]],
        step_times: Sequence[float],
        *,
        window: int | None = None,
        full_attention_fraction: float = 0.0,
    ) -> VisionCost:
        """Least-squares fit of the LLM's ``(a, b, c)`` and the encoder's ``(a, b, c)`` to
        measured times: in step ``i`` one rank processed documents of ``step_lengths[i]`` tokens
        and encoder sequences of ``step_encoder_seqlens[i]`` patches in ``step_times[i]``.
        Coefficients are kept >= 0 so the model stays monotone."""
        if not len(step_lengths) == len(step_encoder_seqlens) == len(step_times):
            raise ValueError(
                f"{len(step_lengths)} steps of lengths, {len(step_encoder_seqlens)} of encoder "
                f"sequences and {len(step_times)} step times: give one of each per step"
            )
        if len(step_times) < 6:
            raise ValueError(
                f"fitting 6 coefficients needs >= 6 measured steps, got {len(step_times)}"
            )
        shape = cls(window=window, full_attention_fraction=full_attention_fraction)
        rows = []
        for n, p in zip(step_lengths, step_encoder_seqlens, strict=True):
            n = np.asarray(n, dtype=np.float64)
            p = np.asarray(p, dtype=np.float64)
            rows.append(
                [n.sum(), (n * n).sum(), n.size, p.sum(), (p * shape.attended(p)).sum(), p.size]
            )
        coef = nonnegative_lstsq(np.array(rows), np.asarray(step_times, dtype=np.float64))
        return cls(
            llm=QuadraticCost(a=float(coef[0]), b=float(coef[1]), c=float(coef[2])),
            a=float(coef[3]),
            b=float(coef[4]),
            c=float(coef[5]),
            window=window,
            full_attention_fraction=full_attention_fraction,
        )
