"""The report's "Decoding" section, from the cells of the `decode` scenario (a prompt of n tokens
prefilled, then k tokens generated one step at a time): per-token latency against the context n
with its fitted exponent, the cache or state memory measured next to the analytic size, where
each efficient variant's step becomes faster than exact attention's, and the context at which
each variant's state fills the memory budget, predicted from the analytic state size.

    section_decoding(doc, kernel_lines(cells, "decode"), budget_gb, colours, out)  # no lines: nothing
    fit_state(tokens, state_mb).tokens_at(budget_mb)   # None for a constant-size state

The helpers above the section are pure (arrays or lines in, numbers out).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import record as R
from pipeline.report.analysis import FIT_POINTS, Crossover, crossover, median_per_n
from pipeline.report.document import Doc
from pipeline.report.figures import plot_scaling
from pipeline.report.format import MISSING, fmt, fmt_lengths
from pipeline.report.lines import FLAG, Line, logged_values, memory_budget_mb

SCENARIO = "decode"
# scenario.new_tokens: a schema field (pipeline/schema.py), recorded as a flattened config param
NEW_TOKENS = R.col("scenario.new_tokens", "param")
# a state whose size changes by less than this fraction across the measured lengths is constant
CONSTANT_RTOL = 1e-3
MIB = 2**20
XLABEL = "context n (prompt tokens)"


@dataclass(frozen=True)
class StateFit:
    """The decoding state's size against the tokens it holds: state ≈ base + per_token · tokens
    (MiB), least squares over the measured lengths; `constant` when it does not grow."""

    per_token_mb: float
    base_mb: float
    lengths: tuple[int, ...]  # tokens held (n + k) at the lengths fitted
    constant: bool

    def tokens_at(self, budget_mb: float) -> float | None:
        """Tokens the state holds when it reaches budget_mb; None when it never does (constant
        or not growing). 0 when even the base exceeds the budget."""
        if self.constant or self.per_token_mb <= 0:
            return None
        return max(0.0, (budget_mb - self.base_mb) / self.per_token_mb)


def fit_state(tokens, state_mb, rtol: float = CONSTANT_RTOL) -> StateFit | None:
    """A linear fit of the state size (MiB) on the tokens it holds, over every length with a
    positive value (repeats: their median). Constant when its values spread by at most `rtol`
    of the largest. None below 2 lengths (one point cannot tell growth from a constant)."""
    lengths, values = median_per_n(tokens, state_mb)
    if len(lengths) < 2:
        return None
    used = tuple(int(v) for v in lengths)
    top = float(values.max())
    if (top - float(values.min())) <= rtol * top:
        return StateFit(0.0, float(np.median(values)), used, True)
    slope, intercept = np.polyfit(lengths, values, 1)
    return StateFit(float(slope), float(intercept), used, False)


def new_tokens(line: Line) -> int:
    """k, the tokens a line's cells generated after the prompt (0 when not logged)."""
    if NEW_TOKENS not in line.rows:
        return 0
    k = pd.to_numeric(line.rows[NEW_TOKENS], errors="coerce").dropna()
    return int(k.median()) if len(k) else 0


def line_state_fit(line: Line, metric: str = R.DECODE_STATE_MB_ANALYTIC) -> StateFit | None:
    """fit_state over the line's ok cells: the state for n + k tokens against n + k."""
    n, y = line.series(metric)
    return fit_state(n + new_tokens(line), y) if len(n) else None


def latency_crossover(candidate: Line, reference: Line, metric: str = R.DECODE_MS_PER_TOKEN) -> Crossover:
    """Where candidate's per-token latency drops below reference's, over their common lengths."""
    nc, yc = candidate.series(metric)
    nr, yr = reference.series(metric)
    common = np.intersect1d(nc, nr)
    return crossover(common, yc[np.isin(nc, common)], yr[np.isin(nr, common)])


def logged_context(line: Line) -> float | None:
    """The cells' own decode/context_at_budget (bisection on the variant's state_bytes at the
    budget pre-flight used), median over ok cells; None when none logged it (constant state)."""
    col = R.col(R.DECODE_CONTEXT_AT_BUDGET)
    ok = line.ok()
    if col not in ok or ok[col].dropna().empty:
        return None
    return float(ok[col].median())


def _at(line: Line, metric: str, n: int | None) -> float | None:
    if n is None:
        return None
    ns, ys = line.series(metric)
    hit = ys[ns == n]
    return float(hit[0]) if len(hit) else None


def _common_n(lines: list[Line], metric: str) -> int | None:
    sets = [set(ln.series(metric)[0].astype(int)) for ln in lines]
    sets = [s for s in sets if s]
    common = set.intersection(*sets) if sets else set()
    return max(common) if common else None


def _exponent(fit, line: Line | None = None) -> str:
    """A fitted slope to 2 decimals with its 95 % CI where there is one, † when a cell it was
    fitted on is not stable; a flat line's rounding noise (-0.00) reads 0.00."""
    if fit is None:
        return MISSING
    text = fit.describe().replace("-0.00", "0.00")
    return text + (FLAG if line is not None and len(line.flagged(fit.lengths)) else "")


def _flag_at(line: Line, n: int | None) -> str:
    return FLAG if n and len(line.flagged([n])) else ""


def kv_heads(line: Line) -> str:
    """`H_kv / H` of a line's cells: key/value heads of query heads (grouped-query attention
    when fewer), from the recorded config; MISSING where not logged."""
    h, kv = (logged_values(line.ok(), key, "param") for key in (R.N_HEADS, R.N_KV_HEADS))
    if h.empty:
        return MISSING
    return f"{int(kv.iloc[0]) if len(kv) else int(h.iloc[0])} / {int(h.iloc[0])}"


def _exact_word(line: Line) -> str:
    return {True: "yes", False: "no", None: "unknown"}[line.exact]


def _state_word(fit: StateFit | None) -> str:
    if fit is None:
        return "unknown"
    if fit.constant:
        return f"constant ({fmt(fit.base_mb)} MiB)"
    return f"grows: {fmt(fit.per_token_mb * MIB)} B per token"


# ----------------------------------------------------------------------------- the section
def section_decoding(doc: Doc, lines: list[Line], budget_gb: float | None, colours: dict,
                     out: Path) -> None:
    """The Decoding section over the decode lines (`kernel_lines(cells, "decode")`); writes
    nothing when there are none."""
    if not lines:
        return
    doc.h(2, "Decoding")
    doc.p("Cells of the `decode` scenario: a prompt of n tokens is prefilled (the full forward "
          "filling the variant's cache or state), then k tokens are generated one step at a time, "
          f"each timed alone; `{R.DECODE_MS_PER_TOKEN}` is the median step. Exact attention reads a "
          "KV cache of n tokens per step (expected exponent ≈ 1); a variant with a constant-size "
          "state (sliding window, Performer's running sums, the SSM) does the same work at every n "
          f"(≈ 0). Exponents are fitted over the {FIT_POINTS} largest lengths that ran ok, with a 95 % CI "
          f"in brackets; {FLAG}: a cell behind the figure is not `stable` (section 6).")
    _latency(doc, lines, colours, out)
    _state(doc, lines, colours, out)
    _crossovers(doc, lines)
    _context_at_budget(doc, lines, budget_gb)
    _named_shapes(doc, lines, budget_gb)


def _latency(doc: Doc, lines: list[Line], colours: dict, out: Path) -> None:
    path = plot_scaling(lines, R.DECODE_MS_PER_TOKEN, "time per generated token (ms)",
                        "Decoding: per-token latency vs context", colours, out / "decode_latency.png",
                        xlabel=XLABEL, guides=(0, 1))
    if path:
        doc.figure(path, "Per-token decoding latency vs context n (log-log; dashed grey: O(1) and "
                         "O(n) through the smallest length; legend: fitted slope over the largest lengths)")
    else:
        doc.p(f"No ok decode cells logged `{R.DECODE_MS_PER_TOKEN}`.")
    n = _common_n(lines, R.DECODE_MS_PER_TOKEN)
    at = f" @ {n:,}" if n else ""
    rows = []
    for ln in lines:
        ft, fp = ln.fit(R.DECODE_MS_PER_TOKEN), ln.fit(R.DECODE_PREFILL_MS)
        rows.append([ln.label, _exact_word(ln), kv_heads(ln), _state_word(line_state_fit(ln)),
                     _exponent(ft, ln), fmt_lengths(ft.lengths) if ft else MISSING,
                     fmt(_at(ln, R.DECODE_MS_PER_TOKEN, n)) + _flag_at(ln, n), fmt(_at(ln, R.DECODE_TOKENS_PER_S, n)),
                     _exponent(fp, ln), fmt(_at(ln, R.DECODE_PREFILL_MS, n)) + _flag_at(ln, n)])
    doc.table(["variant", "exact", "KV heads", "state", "ms/token exp.", "fit lengths", f"ms/token{at}",
               f"tokens/s{at}", "prefill exp.", f"prefill ms{at}"], rows)
    if not n:
        doc.p("No length ran ok on every decode line, so no common-length columns.")


def _state(doc: Doc, lines: list[Line], colours: dict, out: Path) -> None:
    doc.h(3, "State memory of the cache or state")
    path = plot_scaling(lines, R.DECODE_STATE_MB, "cache / state size (MiB)",
                        "Decoding: state memory vs context", colours, out / "decode_state.png",
                        xlabel=XLABEL, guides=(0, 1))
    if path:
        doc.figure(path, "Measured size of the cache or state tensors after n + k tokens (log-log; "
                         "dashed grey: O(1) and O(n))")
    lengths = sorted({int(v) for ln in lines for v in ln.series(R.DECODE_STATE_MB)[0]}
                     | {int(v) for ln in lines for v in ln.series(R.DECODE_STATE_MB_ANALYTIC)[0]})
    if not lengths:
        doc.p(f"No ok decode cells logged `{R.DECODE_STATE_MB}`.")
        return
    doc.p(f"Per n: measured `{R.DECODE_STATE_MB}` / analytic `{R.DECODE_STATE_MB_ANALYTIC}` "
          "(the variant's `state_bytes` for the n + k tokens), in MiB.")
    rows = []
    for ln in lines:
        row = [ln.label]
        for n in lengths:
            meas, ana = _at(ln, R.DECODE_STATE_MB, n), _at(ln, R.DECODE_STATE_MB_ANALYTIC, n)
            row.append(MISSING if meas is None and ana is None else f"{fmt(meas)} / {fmt(ana)}")
        rows.append(row)
    doc.table(["variant"] + [f"n = {n:,}" for n in lengths], rows)


def _crossovers(doc: Doc, lines: list[Line]) -> None:
    doc.h(3, "Where decoding beats exact attention")
    exact = [ln for ln in lines if ln.exact is True]
    others = [ln for ln in lines if ln.exact is False]
    pairs = [(eff, ex) for eff in others for ex in exact if eff.same_axes(ex)]
    if not pairs:
        doc.p("Crossovers need a decode line tagged exact=True and one tagged exact=False with the "
              f"same other axes (have {len(exact)} exact, {len(others)} efficient).")
        return
    doc.p("The context n beyond which each efficient line's per-token latency stays below each "
          "exact line's, interpolated in log-log space between the two measured lengths around the "
          "last sign change.")
    doc.table(["efficient", "vs exact", "faster per token"],
              [[eff.label, ex.label, latency_crossover(eff, ex).describe("faster")] for eff, ex in pairs])


def _context_at_budget(doc: Doc, lines: list[Line], budget_gb: float | None) -> None:
    doc.h(3, "Context at the memory budget (predicted)")
    doc.p(f"Predictions, not measurements: a straight line through `{R.DECODE_STATE_MB_ANALYTIC}` "
          "against the tokens held (n + k) gives bytes per token (exact attention's KV cache); "
          "solved for the memory budget, it is the longest context whose state fits. A state that "
          "does not grow with n never fills it. The state alone: the prefill's activations, the "
          f"weights and the rest of the model come on top. `{R.DECODE_CONTEXT_AT_BUDGET}` is the "
          "cells' own figure (the variant's `state_bytes` solved at the budget pre-flight used).")
    rows = []
    for ln in lines:
        budget, why = memory_budget_mb(ln, budget_gb)
        fit = line_state_fit(ln)
        logged = logged_context(ln)
        if fit is None:
            pred = "no usable fit (needs 2 lengths)"
        elif fit.constant:
            pred = "never: constant state"
        elif budget is None:
            pred = MISSING
        else:
            pred = (f"predicted ≈ {fit.tokens_at(budget):,.0f} tokens "
                    f"(fit over n + k = {fmt_lengths(fit.lengths)})")
        rows.append([ln.label, why, _state_word(fit), pred,
                     f"{logged:,.0f}" if logged is not None else MISSING])
    doc.table(["variant", "budget", "state", "context at budget", f"`{R.DECODE_CONTEXT_AT_BUDGET}`"], rows)


# deployed decoder shapes: (name, layers, query heads, key/value heads, head dim). Llama-3-8B:
# 32 layers, 32 query heads of 128, 8 KV heads (its config.json); Falcon-7B: 32 layers, 71 heads
# of 64, one KV head (multi-query)
NAMED_SHAPES = (
    ("Llama-3-8B-like, grouped (GQA)", 32, 32, 8, 128),
    ("the same, multi-head", 32, 32, 32, 128),
    ("the same, multi-query (MQA)", 32, 32, 1, 128),
    ("Falcon-7B-like, multi-query", 32, 71, 1, 64),
)


def kv_cache_bytes_per_token(layers: int, n_heads: int, n_kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> int:
    """One token's KV cache over the model's layers, from exact attention's own `state_bytes`
    (a keys and a values row of H_kv heads per layer), built on the meta device: no weights."""
    import torch

    from models.vanilla import VanillaAttention

    with torch.device("meta"):
        attn = VanillaAttention(d_model=n_heads * head_dim, n_heads=n_heads, n_kv_heads=n_kv_heads)
    return layers * attn.state_bytes(1, 1, dtype_bytes)


def _named_shapes(doc: Doc, lines: list[Line], budget_gb: float | None) -> None:
    doc.h(3, "KV cache of deployed shapes (analytic)")
    budget = 80.0 if budget_gb is None else float(budget_gb)
    doc.p("The KV cache that exact attention's decoding state implies for a few deployed decoder shapes, in "
          f"bf16, per token and at 8,192 tokens, and the context whose cache alone fills {fmt(budget)} GB "
          f"({'the report budget' if budget_gb is not None else 'an 80 GB GPU; --budget-gb sets another'}; "
          "weights and activations come on top). Grouped-query attention divides the cache by H / H_kv. "
          "The same formula is the analytic column of the state table above, which the measured "
          "cells match at small scale.")
    rows = []
    for name, layers, h, kv, k in NAMED_SHAPES:
        per_token = kv_cache_bytes_per_token(layers, h, kv, k)
        rows.append([name, f"{layers}", f"{kv} / {h}", f"{k}", f"{per_token / 2**10:,.0f} KiB",
                     f"{per_token * 8192 / 2**30:,.2f} GiB", f"{budget * 1e9 / per_token:,.0f}"])
    doc.table(["shape", "layers", "KV heads", "head dim", "KV cache per token", "at 8,192 tokens",
               "tokens at the budget"], rows)
