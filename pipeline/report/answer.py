"""The report's "The answer" section: what the time complexity of self-attention is, from the
kernel cells over lengths n, widths D and head counts H (`grid=theory`). Each classic claim gets
a row with a verdict computed from the cells with the thresholds below, and the numbers behind
it; then the two-term fits (pipeline/report/theory.py), where their terms cross, memory, and the
two worked configurations of conf/experiment/ (those tables: pipeline/report/theory_tables.py).

    section_answer(doc, cells, colours, out)   # writes nothing unless ok kernel cells span 2 widths
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import record as R
from pipeline.report.analysis import FIT_POINTS, fit_power_law, truthy
from pipeline.report.document import Doc
from pipeline.report.format import MISSING, fmt
from pipeline.report.theory import (
    PROJ_FLOPS_PER_UNIT,
    SCORE_FLOPS_PER_UNIT,
    Analysis,
    Refusal,
    analyse,
    theory_groups,
)
from pipeline.report.theory_tables import (
    MIB,
    SEEDS,
    cell_at,
    crossovers_table,
    ends,
    fits_table,
    memory_table,
    or_reason,
    pct,
    ratio_text,
    seed_rows,
    seeds_table,
    two_term_figure,
)
from pipeline.report.verdicts import FAILS, HOLDS, combine_verdicts, interval_verdict

# the thresholds of the verdicts
R2_MIN = 0.99          # the two-term model holds when it explains this much of the variance ...
RESIDUAL_MAX = 0.30    # ... and misses no cell by more than this (relative residual)
DOMINANT = 0.5         # a term dominates when it takes more than half of the measured forward
WORK_FACTOR_TOL = 2.0  # 16× the length: the measured mixing ratio within 2× of 256
HEAD_EXP_TOL = 0.25    # heads keep the complexity: exponents in n across H within 0.25
P_ZERO = 0.05          # p ≈ 0: the n² term under 5 % of the fitted peak at the largest n
MIN_CELLS = 6          # a verdict on the fit needs twice as many cells as its 3 parameters
GROWTH_TOL = 0.15      # the exponent in n over the largest lengths within this of the claim's order


# ----------------------------------------------------------------------------- the claims
def claim_fit(an: Analysis) -> tuple[str, str]:
    ft = an.time
    if isinstance(ft, Refusal):
        return f"not measured: {ft.reason}", ""
    if ft.cells < MIN_CELLS:
        return f"not measured: {ft.cells} cells, a verdict needs {MIN_CELLS}", f"R² = {ft.r2:.4f}"
    held = or_reason(an.held, lambda h: f"n = {h.n:,} held out and predicted within {pct(h.worst)}")
    # each cell's residual over its median's CI: a cell misses only if its whole interval does
    verdicts = [HOLDS if ft.r2 >= R2_MIN else FAILS]
    t = an.fit_cells.dropna(subset=["fwd"])
    for _, r in t.iterrows():
        pred = float(ft.predict(r["n"], r["D"], r["B"]))
        lo, hi = ends(r, "fwd")
        res = (pred / hi - 1, pred / lo - 1) if np.isfinite(lo) else (pred / r["fwd"] - 1,) * 2
        verdicts.append(interval_verdict(res[0], res[1], -RESIDUAL_MAX, RESIDUAL_MAX))
    misses = sum(v == FAILS for v in verdicts[1:])
    return combine_verdicts(verdicts), (f"R² = {ft.r2:.4f}, worst residual {pct(ft.worst)} over {ft.cells} cells"
                                        + (f" ({misses} beyond {RESIDUAL_MAX:.0%} over their CIs)" if misses else "")
                                        + f"; {held}")


def _mix_interval(r) -> tuple[float, float]:
    """The mixing's interval, forward minus projections, from both medians' CIs."""
    (flo, fhi), (plo, phi) = ends(r, "fwd"), ends(r, "proj")
    return flo - phi, fhi - plo


def claim_share(an: Analysis, ratio: float, part: str, where: str) -> tuple[str, str]:
    """The measured share of `part` (mix or proj) of the forward at n = ratio·D (`where`), at every
    D, with its interval from the forward's and the projections' CIs, against DOMINANT."""
    f, verdicts, texts = an.fit_cells, [], []
    for D in sorted(f["D"].unique()):
        r = cell_at(f, ratio * D, D)
        if r is None or not (np.isfinite(r["fwd"]) and np.isfinite(r["proj"])):
            continue
        (flo, fhi), (plo, phi) = ends(r, "fwd"), ends(r, "proj")
        if part == "mix" and not np.isfinite(r["mix"]):
            share, lo, hi, txt = 0.0, 0.0, 0.05, "under 5 %"  # kernel/mix_ms is logged only above 5 % of the forward
        else:
            share = r[part] / r["fwd"]
            lo, hi = (1 - phi / flo, 1 - plo / fhi) if part == "mix" else (plo / fhi, phi / flo)
            txt = pct(share) + (f" [{pct(lo)}, {pct(hi)}]" if np.isfinite(lo) and np.isfinite(hi) else "")
        if not (np.isfinite(lo) and np.isfinite(hi)):
            lo = hi = share
        verdicts.append(interval_verdict(lo, hi, DOMINANT, np.inf))
        texts.append(f"D = {D:,.0f}, n = {ratio * D:,.0f}: {txt}")
    if not verdicts:
        return f"not measured: no cell at {where} with its projections timed", ""
    return combine_verdicts(verdicts), "; ".join(texts)


def claim_work_factor(an: Analysis) -> tuple[str, str]:
    """The mixing's time from n to 16n against the 256× of its work, within WORK_FACTOR_TOL, with
    the ratio's interval from the cells' CIs."""
    f, verdicts, texts = an.fit_cells, [], []
    s = SCORE_FLOPS_PER_UNIT / (2 if an.causal else 1)
    for D in sorted(f["D"].unique()):
        at = f[f["D"] == D].set_index("n")
        pairs = [n for n in at.index if 16 * n in at.index]
        if not pairs:
            continue
        n = max(pairs)
        lo, hi = at.loc[n], at.loc[16 * n]
        work = (s * 256 * n * n * D + PROJ_FLOPS_PER_UNIT * 16 * n * D * D) / (
            s * n * n * D + PROJ_FLOPS_PER_UNIT * n * D * D)
        if np.isfinite(lo["mix"]) and np.isfinite(hi["mix"]):
            mix = hi["mix"] / lo["mix"]
            (a_lo, a_hi), (b_lo, b_hi) = _mix_interval(lo), _mix_interval(hi)
            r_lo, r_hi = (b_lo / a_hi, b_hi / a_lo) if a_lo > 0 and b_lo > 0 else (mix, mix)
            if not (np.isfinite(r_lo) and np.isfinite(r_hi)):
                r_lo = r_hi = mix
            verdicts.append(interval_verdict(r_lo, r_hi, 256 / WORK_FACTOR_TOL, 256 * WORK_FACTOR_TOL))
            mix_txt = f"mixing {ratio_text(mix)}" + (f" [{ratio_text(r_lo)}, {ratio_text(r_hi)}]" if r_lo != r_hi else "")
        else:
            mix_txt = "mixing under 5 % of the forward at n"
        texts.append(f"D = {D:,.0f}, n {n:,.0f} → {16 * n:,.0f}: {mix_txt}, whole layer "
                     f"{ratio_text(hi['fwd'] / lo['fwd'])} (its analytic work {ratio_text(work)})")
    if not verdicts:
        why = "no width with both n and 16n timed and the mixing separable at both"
        return f"not measured: {why}", "; ".join(texts)
    return combine_verdicts(verdicts), "; ".join(texts)


def _fit_with_ci(g: pd.DataFrame):
    """The forward's power law in n over the largest lengths of g, with its CI where the cells carry one."""
    if {"fwd_lo", "fwd_hi"} <= set(g) and g[["fwd_lo", "fwd_hi"]].notna().all().all():
        return fit_power_law(g["n"], g["fwd"], lo=g["fwd_lo"], hi=g["fwd_hi"])
    return fit_power_law(g["n"], g["fwd"])


def _interval(fit) -> tuple[float, float]:
    return fit.ci if fit.ci else (fit.exponent, fit.exponent)


def claim_growth(an: Analysis) -> tuple[str, str]:
    """The claim as stated, about growth in n: at each width, the exponent in n over the largest
    lengths (with its CI) against the order t = a·n²·D + b·n·D² has there, 1 + s, where s is the
    n² term's share of the time at those lengths (2 once the scores dominate, 1 while the
    projections do)."""
    ft = an.time
    if isinstance(ft, Refusal):
        return f"not measured: {ft.reason}", ""
    verdicts, texts = [], []
    for D, g in an.fit_cells.dropna(subset=["fwd"]).groupby("D"):
        fit = _fit_with_ci(g)
        if fit is None:
            continue
        n_mid = float(np.exp(np.mean(np.log(fit.lengths))))
        score, proj, _ = (float(v[0]) for v in ft.parts([n_mid], D))
        share = score / (score + proj) if score + proj > 0 else 0.0
        order = 1 + share
        lo, hi = _interval(fit)
        v = interval_verdict(lo, hi, order - GROWTH_TOL, order + GROWTH_TOL)
        verdicts.append(v)
        why = ""
        if order < 2 - GROWTH_TOL:
            top = max(fit.lengths)
            why = (f"; at n ≤ {top:,} the projections are still {pct(1 - share)} of the time, so the "
                   f"growth there is {order:.2f}, not yet n²")
        texts.append(f"D = {D:,.0f}: exponent {fit.describe()} over n = {fit.lengths[0]:,}…{fit.lengths[-1]:,}, "
                     f"the claim's order there {order:.2f} ({v}){why}")
    if not verdicts:
        return "not measured: no width with 2 lengths", ""
    return combine_verdicts(verdicts), "; ".join(texts)


def claim_heads(an: Analysis) -> tuple[str, str]:
    """Heads do not change the complexity: the exponents in n at every H (one D, the same lengths)
    agree within HEAD_EXP_TOL, each pair's difference judged with its CI. What heads do change,
    the time at one n, is reported beside it."""
    c = an.cells.dropna(subset=["fwd"])
    heads = c.groupby("D")["H"].nunique()
    if heads.empty or heads.max() < 2:
        return "not measured: one head count per width", ""
    D = float(heads.idxmax())
    at = c[c["D"] == D]
    common = set.intersection(*(set(g["n"]) for _, g in at.groupby("H")))
    if len(common) < 2:
        return f"not measured: the head counts at D = {D:,.0f} share fewer than 2 lengths", ""
    at = at[at["n"].isin(common)]  # every H over the same lengths
    fits = {h: _fit_with_ci(g) for h, g in at.groupby("H")}
    t = at[at["n"] == max(common)].set_index("H")["fwd"]
    spread = (f"what heads change, the time at n = {max(common):,.0f}: {fmt(t.min())}–{fmt(t.max())} ms, "
              f"spread {ratio_text(t.max() / t.min())} (fastest H = {t.idxmin():.0f})")
    verdicts = []
    hs = sorted(fits)
    for i, a in enumerate(hs):
        for b in hs[i + 1:]:
            fa, fb = fits[a], fits[b]
            (alo, ahi), (blo, bhi) = _interval(fa), _interval(fb)
            diff = fa.exponent - fb.exponent
            half = float(np.hypot((ahi - alo) / 2, (bhi - blo) / 2))
            verdicts.append(interval_verdict(diff - half, diff + half, -HEAD_EXP_TOL, HEAD_EXP_TOL))
    exps = [f.exponent for f in fits.values()]
    text = (f"D = {D:,.0f}, exponents in n {min(exps):.2f}…{max(exps):.2f} (over the {FIT_POINTS} largest n): "
            + ", ".join(f"H = {h:.0f}: {fits[h].describe()}" for h in hs) + f"; {spread}")
    return combine_verdicts(verdicts), text


def materialises(an: Analysis) -> bool | None:
    col = R.col(R.MATERIALISES_SCORES)
    vals = {truthy(v) for v in an.line.rows.get(col, pd.Series(dtype=str)).dropna()}
    return vals.pop() if len(vals) == 1 else None


def claim_memory(an: Analysis) -> tuple[str, str, str]:
    """(claim, verdict, numbers): O(n²) where the variant materialises the scores, else p ≈ 0."""
    mat = materialises(an)
    claim = ("memory O(n²): the score matrix materialised" if mat
             else "memory O(n): p ≈ 0 for memory-efficient exact attention")
    fm, f = an.memory, an.fit_cells.dropna(subset=["mem"])
    if mat is None:
        return "memory", f"not measured: no consistent `{R.MATERIALISES_SCORES}` tag", ""
    if isinstance(fm, Refusal):
        return claim, f"not measured: {fm.reason}", ""
    top = f.sort_values(["n", "D"]).iloc[-1]
    share = fm.n2_share(top["n"], top["D"], top["H"], top["B"])
    ok = share >= DOMINANT if mat else share < P_ZERO
    return claim, (HOLDS if ok else FAILS), (
        f"p = {fmt(fm.p * MIB)} B per score entry, q = {fmt(fm.q * MIB)} B per n·D element; the n² "
        f"term is {pct(share)} of the fitted peak at n = {top['n']:,.0f}, D = {top['D']:,.0f}")


def claim_seeds(an: Analysis) -> tuple[str, str]:
    rows = seed_rows(an)
    ran = [r for r in rows if r["fwd"] is not None and r["pred"] is not None]
    text = "; ".join(f"n = {r['n']:,}, D = {r['D']:,}: " + (
        f"{fmt(r['fwd'])} ms measured, {fmt(r['pred'])} ms fitted" if r in ran else r["status"]) for r in rows)
    if len(ran) < len(SEEDS):
        return "not measured", text
    verdicts = []
    for r in ran:  # the fit's residual there, over the measured median's CI
        lo, hi = r["fwd_ci"]
        res = (r["pred"] / hi - 1, r["pred"] / lo - 1) if np.isfinite(lo) else (r["pred"] / r["fwd"] - 1,) * 2
        verdicts.append(interval_verdict(res[0], res[1], -RESIDUAL_MAX, RESIDUAL_MAX))
    return combine_verdicts(verdicts), text


# (claim, criterion, verdict function) of the rows every exact variant gets
CLAIMS = (
    ("time O(n²·d + n·d²): its growth in n",
     f"at every D, the exponent in n over the {FIT_POINTS} largest n (95 % CI) within ±{GROWTH_TOL} of the "
     "order the two terms give there, 1 + (n² term's share): holds inside, does not hold outside, "
     "inconclusive across", claim_growth),
    ("time O(n²·d + n·d²): the two terms describe every cell",
     f"two-term fit over ≥ {MIN_CELLS} cells: R² ≥ {R2_MIN}, every cell's residual (over its median's "
     f"95 % CI) ≤ {RESIDUAL_MAX:.0%}", claim_fit),
    ("n ≫ d: the score term dominates", f"mixing (95 % interval) > {DOMINANT:.0%} of the forward at n = 8·D, every D",
     lambda an: claim_share(an, 8, "mix", "n = 8·D")),
    ("d ≫ n: the projections dominate",
     f"projections (95 % interval) > {DOMINANT:.0%} of the forward at n = D/8, every D",
     lambda an: claim_share(an, 1 / 8, "proj", "n = D/8")),
    ("16× the length → 256× the work",
     f"mixing t(16n)/t(n) (95 % interval) within {WORK_FACTOR_TOL:g}× of 256 at every D",
     claim_work_factor),
    ("multi-head attention does not change the complexity",
     f"every pair of H at one D: the difference of their exponents in n (95 % CI) within ±{HEAD_EXP_TOL}",
     claim_heads),
    ("the worked configurations n = 512, D = 768 and n = 8192, D = 1024",
     f"the two-term fit predicts each within {RESIDUAL_MAX:.0%} (over its median's 95 % CI)", claim_seeds),
)


# ----------------------------------------------------------------------------- the section
def section_answer(doc: Doc, cells: pd.DataFrame, colours: dict, out: Path) -> None:
    """The Answer section over the kernel cells; writes nothing unless they span 2 widths D."""
    groups = theory_groups(cells)
    if not groups:
        return
    analyses = [analyse(g) for g in groups]
    exact = [an for an in analyses if an.line.exact is True]
    doc.h(2, "The answer: the time complexity of self-attention, measured")
    doc.p("Kernel cells over n, D and H, fitted per variant and device to t_fwd ≈ a·n²·D + b·n·D² + c "
          "(B = 1; times B otherwise) by non-negative least squares on the medians with relative "
          "weights (each cell's residual over its own time, so small cells count as much as large "
          "ones), over the cells at the group's most common head dim d_k = D/H. a and b are "
          "reported as effective rates of useful FLOPs, 2 per multiply-add: the score term n²·D "
          "multiply-adds ×2 for QKᵀ and PV (summed over the heads, H·n²·d_k = n²·D), halved when "
          "causal; the projection term 4·n·D² multiply-adds (Q, K, V, output). R² is of the raw "
          "times. Verdicts are computed from the cells with the criteria shown: holds, does not hold "
          "here, or inconclusive where a 95 % CI straddles the criterion; a claim about growth is "
          "tested on exponents in n, never on constants. Claims are about "
          "exact attention, so only exact variants get rows; the others are fitted for contrast.")
    if not exact:
        doc.p(f"No kernel line tagged `{R.EXACT}`=True spans the widths: no verdicts.")
    rows = []
    for an in exact:
        for claim, criterion, judge in CLAIMS:
            verdict, numbers = judge(an)
            rows.append([claim, an.line.label, verdict, numbers or MISSING, criterion])
        claim, verdict, numbers = claim_memory(an)
        rows.append([claim, an.line.label, verdict, numbers or MISSING,
                     f"n² term ≥ {DOMINANT:.0%} (materialised) or < {P_ZERO:.0%} (p ≈ 0) of the fitted peak"])
    if rows:
        doc.table(["claim", "variant", "verdict", "measured", "criterion"], rows)
    two_term_figure(doc, exact + [an for an in analyses if an not in exact], out)
    fits_table(doc, analyses)
    crossovers_table(doc, analyses)
    memory_table(doc, analyses)
    seeds_table(doc, exact)


