"""The results table: one row per (case, implementation), ratios and MFU filled in after the run.

MFU = tokens/s * ``forge_models.flops_per_token(config, seq)`` / device peak, with
``flops_per_token = 6 * N_matmul + 12 * L * H * head_dim * seq`` (PaLM, Chowdhery et al. 2022,
arXiv:2204.02311, appendix B): ``N_matmul`` the non-embedding matmul weights a token uses (the
output head included; for MoE the router and the active experts only), the second term the
attention scores and values at row length ``seq``, not halved for the causal mask nor reduced
for packed documents, so that figures compare with the usual ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["FLOP_FORMULA", "Row", "fill_ratios", "format_table", "peak_tflops_for"]

FLOP_FORMULA = (
    "MFU = tokens/s x flops_per_token / peak; flops_per_token = 6*N_matmul + 12*L*H*head_dim*seq "
    "(forge_models.flops_per_token: non-embedding matmul weights incl. the output head, MoE: "
    "active experts only; attention at row length seq, not halved for causal or packing)"
)


def peak_tflops_for(device_name: str, *, dtype: str = "bf16") -> float | None:
    """The dense peak TFLOP/s of a known GPU, else None: forge-kernels' one table
    (:func:`forge_kernels.benchmarking.peak_tflops`, matched by name token, so an L40 is not
    taken for an L4)."""
    from forge_kernels.benchmarking import peak_tflops

    return peak_tflops(device_name, dtype=dtype)


@dataclass(kw_only=True)
class Row:
    workload: str
    case: str
    impl: str
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak_bytes: int | None = None
    loss_first: float | None = None
    loss_last: float | None = None
    ratio: float | None = None
    status: str = "ok"  # "ok", "skipped: <reason>", "error: <message>"
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _baseline(impl: str) -> str | None:
    """The row a ratio compares against: peers against forge with the same recompute setting,
    forge FP8 against forge bf16, plain forge rows against transformers."""
    recompute = " +recompute" if impl.endswith(" +recompute") else ""
    if impl.startswith("forge fp8"):
        return "forge"
    if impl.startswith("forge"):
        return f"transformers{recompute}"
    return f"forge{recompute}"


def fill_ratios(rows: list[Row]) -> None:
    """``ratio`` per row: forge / peer on peer rows; forge / transformers on forge bf16 rows;
    FP8 / bf16 on forge FP8 rows (empty where either side did not run)."""
    by_key = {(r.case, r.impl): r for r in rows}
    for row in rows:
        other = by_key.get((row.case, _baseline(row.impl) or ""))
        if not (row.ok and other and other.ok and row.tokens_per_s and other.tokens_per_s):
            continue
        if row.impl.startswith("forge"):
            row.ratio = row.tokens_per_s / other.tokens_per_s
        else:
            row.ratio = other.tokens_per_s / row.tokens_per_s


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, fmt)


COLUMNS = ("workload", "case", "implementation", "tokens/s", "MFU", "peak GiB", "loss@1",
           "loss@end", "ratio", "notes")  # fmt: skip


def format_table(rows: list[Row]) -> str:
    """A fixed-width text table (also valid inside a Markdown code block)."""
    cells = [COLUMNS]
    for r in rows:
        notes = "; ".join(r.notes) if r.ok else "; ".join([r.status, *r.notes])
        cells.append(
            (
                r.workload,
                r.case,
                r.impl,
                _num(r.tokens_per_s, ",.0f"),
                "-" if r.mfu is None else f"{100 * r.mfu:.1f}%",
                "-" if r.peak_bytes is None else f"{r.peak_bytes / 2**30:.2f}",
                _num(r.loss_first, ".4f"),
                _num(r.loss_last, ".4f"),
                "-" if r.ratio is None else f"{r.ratio:.2f}x",
                notes,
            )
        )
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS) - 1)]
    lines = []
    for n, c in enumerate(cells):
        left = [
            c[i].ljust(widths[i]) if i < 3 else c[i].rjust(widths[i]) for i in range(len(widths))
        ]
        lines.append("  ".join([*left, c[-1]]).rstrip())
        if n == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)
