"""The tables and the figure under "The answer" (pipeline/report/answer.py): the two-term fits,
where their terms cross, memory, the two worked configurations, and the plot of the fits; with
the small formatting helpers the claims share with them.

    fits_table(doc, analyses); seeds_table(doc, exact)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import record as R
from pipeline.analytic import score_macs
from pipeline.report.analysis import crossover
from pipeline.report.document import Doc
from pipeline.report.figures import plot_two_term
from pipeline.report.format import MISSING, fmt, sci
from pipeline.report.lines import FLAG, SEQ_LEN, STATUS
from pipeline.report.theory import BOOT_DRAWS, D_COL, Analysis, Refusal

MIB = 2**20
SEEDS = ((512, 768), (8192, 1024))  # the two worked configurations (conf/experiment/seed_*.yaml)
MAX_PANELS = 6


def flags(f: pd.DataFrame) -> np.ndarray:
    """Which of these cells have a run whose timings are not `stable`."""
    return f["flagged"].fillna(False).to_numpy(bool) if "flagged" in f else np.zeros(len(f), bool)


def or_reason(fit, text) -> str:
    return f"no fit: {fit.reason}" if isinstance(fit, Refusal) else text(fit)


def pct(x: float | None) -> str:
    return MISSING if x is None or not np.isfinite(x) else f"{100 * x:.0f} %"


def ratio_text(x: float) -> str:
    return f"{x:,.0f}×" if x >= 10 else f"{x:.2f}×"


def range_text(ci) -> str:
    """` [lo, hi]` of a 95 % interval, or nothing."""
    if ci is None or not all(np.isfinite(ci)):
        return ""
    return f" [{fmt(ci[0])}, {fmt(ci[1])}]"


def cell_at(f: pd.DataFrame, n: float, D: float):
    hit = f[(f["n"] == n) & (f["D"] == D)]
    return hit.iloc[0] if len(hit) else None


def ends(r, col: str) -> tuple[float, float]:
    """A cell's 95 % interval of a timed median (NaN, NaN where it has none)."""
    lo, hi = r.get(f"{col}_lo", np.nan), r.get(f"{col}_hi", np.nan)
    ok = np.isfinite(lo) and np.isfinite(hi) and 0 < lo <= hi
    return (float(lo), float(hi)) if ok else (np.nan, np.nan)


def seed_rows(an: Analysis) -> list[dict]:
    """The two worked configurations as this group recorded them (any status)."""
    rows = []
    for n, D in SEEDS:
        rec = an.line.rows[(an.line.rows[SEQ_LEN] == n) & (an.line.rows[D_COL] == D)]
        r = cell_at(an.cells, n, D) if (rec[STATUS] == "ok").any() else None
        why = rec.get(R.col(R.FAILURE_REASON), pd.Series(dtype=str)).dropna()
        status = "ok" if r is not None else (", ".join(sorted(set(rec[STATUS]))) or "not in the grid")
        if r is None and len(why) and str(why.iloc[0]):
            status += f": {why.iloc[0]}"
        pred = None if isinstance(an.time, Refusal) else float(an.time.predict(n, D))
        rows.append({"n": n, "D": D, "status": status, "pred": pred, "flagged": r is not None and bool(r.get("flagged")),
                     "fwd": None if r is None else r["fwd"], "mem": None if r is None else r["mem"],
                     "fwd_ci": (np.nan, np.nan) if r is None else ends(r, "fwd")})
    return rows


# ----------------------------------------------------------------------------- the tables
def two_term_figure(doc: Doc, analyses: list[Analysis], out: Path) -> None:
    panels = []
    for an in analyses[:MAX_PANELS]:
        series = []
        for D, g in an.fit_cells.dropna(subset=["fwd"]).groupby("D"):
            s = {"D": D, "n": g["n"].to_numpy(), "t": g["fwd"].to_numpy(), "flagged": flags(g)}
            if not isinstance(an.time, Refusal):
                grid = np.geomspace(g["n"].min(), g["n"].max(), 40)
                score, proj, const = an.time.parts(grid, D)
                s.update(grid=grid, score=score, proj=proj, total=score + proj + const)
            series.append(s)
        if series:
            panels.append({"title": an.line.label, "series": series})
    path = plot_two_term(panels, out / "theory_two_term.png")
    if path:
        doc.figure(path, "Forward time vs n, one colour per width D: measured medians (points), "
                         "the fitted a·n²·D + b·n·D² + c (solid) and its two terms (dashed: scores, "
                         "dotted: projections)")


def fits_table(doc: Doc, analyses: list[Analysis]) -> None:
    doc.h(3, "The two-term fit")
    rows = []
    for an in analyses:
        ft = an.time
        bad = int(flags(an.fit_cells).sum())
        head = [an.line.label, (f"{len(an.fit_cells)} (d_k = {an.head_dim:g})" + (f", {bad} {FLAG}" if bad else ""))
                if len(an.cells) else "0"]
        if isinstance(ft, Refusal):
            rows.append(head + [f"no fit: {ft.reason}"] + [MISSING] * 5)
            continue
        held = or_reason(an.held, lambda h: f"n = {h.n:,}: worst {pct(h.worst)} ("
                          + ", ".join(f"D = {d:,}: {e:+.0%}" for d, e in h.errors) + ")")
        iv = an.intervals
        rows.append(head + [fmt(ft.score_gflops()) + range_text(iv.score_gflops() if iv else None) if ft.a > 0
                            else "0 (no n²·D term)",
                            fmt(ft.proj_gflops()) + range_text(iv.proj_gflops() if iv else None) if ft.b > 0
                            else "0 (no n·D² term)",
                            fmt(ft.c), f"{ft.r2:.4f}", pct(ft.worst), held])
    doc.p("In brackets: 95 % intervals from a bootstrap (cells resampled with replacement, each median "
          f"moved within its own CI, the fit repeated {BOOT_DRAWS} times). {FLAG}: cells of the fit whose "
          "timings are not `stable` (section 6; red rings in the figure above).")
    doc.table(["variant", "cells (head dim)", "score term GFLOP/s", "projection term GFLOP/s", "c (ms)",
               "R²", "worst residual", "held out: largest n predicted from the rest"], rows)


def crossovers_table(doc: Doc, analyses: list[Analysis]) -> None:
    doc.h(3, "Where the two terms cross")
    doc.p("Predicted: n*(D) = (b/a)·D, where a·n²·D = b·n·D². Measured: the n beyond which "
          f"`{R.KERNEL_PROJ_MS}` (the projections run alone) stays below `{R.KERNEL_MIX_MS}` (the "
          "forward minus them), interpolated in log-log space; where the mixing is under 5 % of the "
          "forward (no `kernel/mix_ms`) it is taken as 5 %, an upper bound.")
    rows = []
    for an in analyses:
        if isinstance(an.time, Refusal):
            continue
        for D, g in an.fit_cells.dropna(subset=["fwd", "proj"]).groupby("D"):
            if len(g) < 2:  # one length: nothing to cross
                continue
            pred = an.time.crossover_n(D)
            pred_ci = an.intervals.crossover_n(D) if an.intervals and pred else None
            mix = g["mix"].where(g["mix"].notna(), 0.05 * g["fwd"])
            co = crossover(g["n"], g["proj"], mix)
            measured = {"crosses": f"n ≈ {fmt(co.n)}", "below at every n": "mixing dominates at every n measured",
                        "not reached": "projections dominate at every n measured"}.get(co.verdict, MISSING)
            measured += FLAG if flags(g).any() else ""
            rows.append([an.line.label, f"{D:,.0f}", f"n* ≈ {fmt(pred)}{range_text(pred_ci)}" if pred
                         else "never (a term fitted 0)",
                         measured])
    if rows:
        doc.table(["variant", "D", "predicted (b/a)·D", "measured (projections vs mixing)"], rows)
    else:
        doc.p(f"No time fit with `{R.KERNEL_PROJ_MS}` logged.")


def memory_table(doc: Doc, analyses: list[Analysis]) -> None:
    doc.h(3, "Memory")
    doc.p(f"`{R.KERNEL_PEAK_MEM_MB}` fitted to p·H·n² + q·n·D + r (non-negative, relative weights "
          "floored at 1 MiB): p per score entry (H per pair of positions, so at one H this is the "
          "p·n² of the claim), q per element of an n×D activation. A materialised fp32 score matrix "
          "costs p ≈ 4 B per entry for each copy alive; memory-efficient exact attention should give p ≈ 0.")
    rows = []
    for an in analyses:
        fm, f = an.memory, an.fit_cells.dropna(subset=["mem"])
        if isinstance(fm, Refusal):
            rows.append([an.line.label, f"no fit: {fm.reason}"] + [MISSING] * 5)
            continue
        top = f.sort_values(["n", "D"]).iloc[-1]
        rows.append([an.line.label, fmt(fm.p * MIB), fmt(fm.q * MIB), fmt(fm.r), f"{fm.r2:.4f}", pct(fm.worst),
                     f"{pct(fm.n2_share(top['n'], top['D'], top['H'], top['B']))} "
                     f"(n = {top['n']:,.0f}, D = {top['D']:,.0f})"])
    doc.table(["variant", "p (B per score entry)", "q (B per n·D element)", "r (MiB)", "R²",
               "worst residual", "n² term of the fitted peak, largest n"], rows)


def seeds_table(doc: Doc, exact: list[Analysis]) -> None:
    doc.h(3, "The two worked configurations")
    rows = []
    for an in exact:
        for r in seed_rows(an):
            n, D = r["n"], r["D"]
            rows.append([an.line.label, f"{n:,}", f"{D:,}", sci(score_macs(n, D)), sci(4 * n * D * D),
                         r["status"], fmt(r["fwd"]) + (FLAG if r["flagged"] else ""), fmt(r["pred"]),
                         fmt(r["mem"])])
    if not rows:
        doc.p("No exact variant among the fitted kernel cells.")
        return
    doc.p("The seed's figures (conf/experiment/seed_512x768.yaml, seed_8192x1024.yaml; 16× the "
          "length, 256× the score work at equal width): analytic multiply-adds of one forward (B = 1) "
          "next to what this machine measured, and what the two-term fit predicts there.")
    doc.table(["variant", "n", "D", "score multiply-adds n²·D", "projection multiply-adds 4·n·D²",
               "status", "forward ms", "fit predicts ms", "peak MiB"], rows)
