"""The report's sections, one function each, in the order they appear: each appends its heading,
text, tables and figures to a Doc from the run table and the lines and groups built from it.

    section_headline(doc, kernel_lines(cells), quality_groups(cells))
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import record as R
from pipeline.report.analysis import FIT_POINTS, crossover, ratio_at_largest, seed_figures
from pipeline.report.document import Doc
from pipeline.report.figures import plot_checkpointing, plot_flops, plot_pareto, plot_scaling
from pipeline.report.format import fmt, fmt_lengths, fmt_n, mean_std, run_ref, sci
from pipeline.report.lines import (
    FLAG,
    MEMORY_COSTS,
    MODEL,
    QUALITY_METRICS,
    QUALITY_REFERENCES,
    SCENARIO,
    SEQ_LEN,
    STATUS,
    TIME_COSTS,
    Line,
    checkpointing_effect,
    memory_budget_mb,
    pareto_panels,
)
from pipeline.report.load import RunTable, redact_uri
from pipeline.report.trust import flagged_table, rounds_table, trust_line

PROVENANCE_TAGS = (R.DEVICE, R.DEVICE_NAME, R.NUM_THREADS, R.TORCH_VERSION, R.XFORMERS_VERSION,
                   R.GIT_SHA, R.HOST, R.MEMORY_METHOD, R.ALLOCATOR, R.FP32_MATMUL)
GEMM_PEAK = R.col(R.GEMM_PEAK_TFLOPS)


def section_header(doc: Doc, title: str, table: RunTable) -> None:
    cells = table.frame
    doc.h(1, title)
    counts = cells[STATUS].value_counts()
    facts = [f"store: `{redact_uri(table.uri)}`", f"experiment: `{table.experiment}`",
             f"cells: {len(cells)} ({', '.join(f'{v} {k}' for k, v in counts.items())})",
             f"generated: {datetime.now():%Y-%m-%d %H:%M}"]
    if table.sweep_id:
        facts.append(f"sweep: `{table.sweep_id}`; parent run(s): "
                     + (", ".join(f"`{p['run_id']}` ({p['reused']} reused)" for p in table.parents) or "none"))
        facts.append(f"reused from earlier runs: {int(cells['reused'].sum())} cell(s)")
    if cells["start_time"].notna().any():
        first, last = cells["start_time"].min(), cells["start_time"].max()
        facts.append(f"runs started {first:%Y-%m-%d %H:%M} … {last:%Y-%m-%d %H:%M}")
    doc.bullets([trust_line(cells)] + facts + table.notes)


def _at(line: Line, metric: str, n: int) -> float | None:
    ns, ys = line.series(metric)
    hit = ys[ns == n]
    return float(hit[0]) if len(hit) else None


def _common_n(lines: list[Line], metric: str) -> int | None:
    sets = [set(line.series(metric)[0].astype(int)) for line in lines]
    common = set.intersection(*sets) if sets else set()
    return max(common) if common else None


def _exponent(fit, line: Line | None = None) -> str:
    """The exponent with its CI, flagged when a cell it was fitted on is not stable."""
    if not fit:
        return "—"
    mark = FLAG if line is not None and len(line.flagged(fit.lengths)) else ""
    return fit.describe() + mark


def _at_flag(line: Line, n: int | None) -> str:
    return FLAG if n and len(line.flagged([n])) else ""


def section_headline(doc: Doc, lines: list[Line], qgroups: pd.DataFrame) -> None:
    doc.h(2, "1. Headline (kernel scenario)")
    if not lines:
        doc.p("No kernel-scenario cells in this selection.")
    else:
        n_common = _common_n(lines, R.KERNEL_FWD_MS)
        m_common = _common_n(lines, R.KERNEL_PEAK_MEM_MB)
        doc.p(f"Exponents are least-squares slopes of log(value) on log(n) over the {FIT_POINTS} largest "
              "lengths that ran ok for each line (the lengths used are listed), with a 95 % CI in brackets "
              "where the cells carry CIs of their medians (a bootstrap within those CIs). "
              f"{FLAG}: a cell behind the figure is not `stable` (section 6 lists it). "
              + (f"Time is compared at the largest length every line ran: n = {n_common:,}. " if n_common
                 else "No length ran ok on every line, so no common-length column. ")
              + (f"Memory at n = {m_common:,}." if m_common else ""))
        tasks = sorted(qgroups["task"].unique()) if not qgroups.empty else []
        at_n = f" @ {n_common:,}" if n_common else ""
        at_m = f" @ {m_common:,}" if m_common else ""
        headers = ["variant", "exact", "fwd time exp.", "fwd+bwd time exp.", "memory exp.", "fit lengths",
                   f"fwd ms{at_n}", f"fwd+bwd ms{at_n}", f"peak MB{at_m}", "backend(s)"]
        headers += [f"quality: {t}" for t in tasks]
        rows = []
        for ln in lines:
            ft, fb, fm = (ln.fit(m) for m in (R.KERNEL_FWD_MS, R.KERNEL_FWDBWD_MS, R.KERNEL_PEAK_MEM_MB))
            used = sorted({v for f in (ft, fb, fm) if f for v in f.lengths})
            backends = sorted(set(ln.ok().get(R.col(R.BACKEND), pd.Series(dtype=str)).dropna()))
            row = [ln.label, {True: "yes", False: "no", None: "unknown"}[ln.exact],
                   _exponent(ft, ln), _exponent(fb, ln), _exponent(fm), fmt_lengths(used) or "—",
                   fmt(_at(ln, R.KERNEL_FWD_MS, n_common)) + _at_flag(ln, n_common) if n_common else "—",
                   fmt(_at(ln, R.KERNEL_FWDBWD_MS, n_common)) + _at_flag(ln, n_common) if n_common else "—",
                   fmt(_at(ln, R.KERNEL_PEAK_MEM_MB, m_common)) if m_common else "—",
                   ", ".join(backends) or "—"]
            row += [_headline_quality(qgroups, ln.model, t) for t in tasks]
            rows.append(row)
        doc.table(headers, rows)
        rounds_table(doc, lines)
    _quality_table(doc, qgroups)


def _headline_quality(qgroups: pd.DataFrame, model: str, task: str) -> str:
    g = qgroups[(qgroups["model"] == model) & (qgroups["task"] == task)]
    if g.empty:
        return "—"
    top = g[g["n"] == g["n"].max()].sort_values("seeds", ascending=False).iloc[0]
    m = top["metric"]
    return f"{m} {mean_std(top[R.col(m)])} at n = {top['n']:,}" + \
        ("" if top["label"] == model else f" ({top['label']})")


def _quality_table(doc: Doc, qgroups: pd.DataFrame) -> None:
    doc.h(3, "Quality per task (mean ± std over seeds)")
    if qgroups.empty:
        doc.p("No cell logged a quality metric.")
        return
    metrics = [m for m in list(QUALITY_METRICS) + list(QUALITY_REFERENCES) if R.col(m) in qgroups]
    metrics = [m for m in metrics if qgroups[R.col(m)].map(lambda s: s.notna().any()).any()]
    headers = ["task", "n", "variant", "scenario", "seeds"] + metrics
    rows = []
    for _, r in qgroups.sort_values(["task", "n", "label"]).iterrows():
        rows.append([r["task"], f"{r['n']:,}", r["label"], r["scenario"], r["seeds"]]
                    + [mean_std(r[R.col(m)]) for m in metrics])
    doc.table(headers, rows)
    refs = [m for m in QUALITY_REFERENCES if m in metrics]
    if refs:
        doc.p(f"{', '.join(refs)}: the same data scored by a unigram model, a floor any model must beat.")


# (metric, y label, title, file) of the scaling figures
SCALING_FIGURES = (
    (R.KERNEL_FWD_MS, "forward time per call (ms)", "Forward time vs length", "time_fwd.png"),
    (R.KERNEL_FWDBWD_MS, "forward + backward time per call (ms)", "Forward + backward time vs length",
     "time_fwdbwd.png"),
    (R.KERNEL_PEAK_MEM_MB, "peak memory of one forward (MB)", "Forward peak memory vs length", "memory_fwd.png"),
    (R.KERNEL_PEAK_MEM_FWDBWD_MB, "peak memory of forward + backward (MB)",
     "Forward + backward peak memory vs length", "memory_fwdbwd.png"),
)


def section_figures(doc: Doc, lines, qgroups, cells, colours, out: Path) -> None:
    doc.h(2, "2. Figures")
    for metric, ylabel, title, name in SCALING_FIGURES:
        path = plot_scaling(lines, metric, ylabel, title, colours, out / name) if lines else None
        if path:
            doc.figure(path, f"{title} (log-log; dashed grey: O(n) and O(n²) through the smallest length; "
                             "legend: fitted slope over the largest lengths)")
        else:
            doc.p(f"{title}: no ok kernel cells logged `{metric}`.")

    for kind, costs, name in (("time per token", TIME_COSTS, "quality_vs_time.png"),
                              ("peak memory", MEMORY_COSTS, "quality_vs_memory.png")):
        panels, notes = pareto_panels(qgroups, costs)
        path = plot_pareto(panels, colours, kind, out / name)
        if path:
            doc.figure(path, f"Quality vs {kind}, one panel per task and length, Pareto front outlined")
            rows = [[p["task"], f"{p['n']:,}", p["scenario"], p["metric"], p["cost_label"],
                     ", ".join(p["points"].loc[p["points"]["front"], "label"]) or "—"]
                    for p in panels if len(p["points"])]
            doc.table(["task", "n", "cells", "quality", "cost", f"on the Pareto front ({kind})"], rows)
        else:
            doc.p(f"Quality vs {kind}: no quality cells with a cost metric.")
        if notes:
            doc.bullets(notes)

    doc.h(3, "Gradient checkpointing")
    effect = checkpointing_effect(cells)
    path = plot_checkpointing(effect, colours, out / "checkpointing.png")
    if path is None:
        doc.p(f"No training cells that differ only in `{R.GRAD_CHECKPOINTING}` (both ok).")
        return
    doc.figure(path, "Gradient checkpointing on vs off: training peak memory saved and step time added")
    doc.table(["variant", "task", "n", "seeds", "peak MB off", "peak MB on", "memory saved",
               "step ms off", "step ms on", "time added"],
              [[r.variant, r.task, f"{r.n:,}", r.seeds, fmt(r.mem_off_mb), fmt(r.mem_on_mb),
                f"{r.mem_saved_pct:.1f}%", fmt(r.step_off_ms), fmt(r.step_on_ms), f"{r.time_added_pct:+.1f}%"]
               for r in effect.itertuples()])


# (metric, word when the line is better, word when worse) of the crossover and ratio columns
_CROSSOVER_METRICS = ((R.KERNEL_FWD_MS, "faster"), (R.KERNEL_FWDBWD_MS, "faster"), (R.KERNEL_PEAK_MEM_MB, "smaller"))
_RATIO_METRICS = ((R.KERNEL_FWD_MS, "faster", "slower"), (R.KERNEL_FWDBWD_MS, "faster", "slower"),
                  (R.KERNEL_PEAK_MEM_MB, "smaller", "larger"))


def section_crossover(doc: Doc, lines: list[Line]) -> None:
    doc.h(2, "3. Crossover lengths and ratios")
    exact = [ln for ln in lines if ln.exact is True]
    others = [ln for ln in lines if ln.exact is False]
    unknown = [ln.label for ln in lines if ln.exact is None]
    if unknown:
        doc.p(f"No consistent `{R.EXACT}` tag on: {', '.join(unknown)}; left out of this section.")
    if not exact or not others:
        doc.p("Crossovers need at least one line tagged exact=True and one tagged exact=False "
              f"(have {len(exact)} exact, {len(others)} efficient).")
        _ratio_table(doc, exact, others)
        return
    doc.p("Where each efficient line becomes faster (forward time) and smaller (forward peak "
          "memory) than each exact line with the same other axes, interpolated in log-log space "
          "between the two measured lengths around the last sign change; the range is where the "
          "crossing lies when each median moves within its 95 % CI.")
    rows = []
    for eff in others:
        for ex in exact:
            if not eff.same_axes(ex):
                continue
            cells = [eff.label, ex.label]
            for metric, word in _CROSSOVER_METRICS:
                ce, ye = eff.series(metric)
                cx, yx = ex.series(metric)
                common = np.intersect1d(ce, cx)
                at_e, at_x = np.isin(ce, common), np.isin(cx, common)
                co = crossover(common, ye[at_e], yx[at_x])
                text = co.describe(word)
                ci_e, ci_x = eff.ci(metric), ex.ci(metric)
                if co.verdict == "crosses" and ci_e is not None and ci_x is not None:
                    # the range the medians' CIs allow: the efficient line at its best against
                    # the exact one at its worst, and the other way round
                    early = crossover(common, ci_e[0][at_e], ci_x[1][at_x])
                    late = crossover(common, ci_e[1][at_e], ci_x[0][at_x])
                    ends = [c.n for c in (early, late) if c.verdict == "crosses"]
                    if len(ends) == 2:
                        text += f" (range {fmt(min(ends))}–{fmt(max(ends))})"
                    else:
                        text += " (range: the CIs overlap beyond the grid)"
                cells.append(text)
            rows.append(cells)
    doc.table(["efficient", "vs exact", "faster (forward)", "faster (fwd+bwd)", "smaller (forward peak)"], rows)
    _ratio_table(doc, exact, others)


def _ratio_table(doc: Doc, exact: list[Line], others: list[Line]) -> None:
    """Each line against each exact line with the same other axes, at the largest length both
    ran: the number a "how much faster is it at my length" question wants. Two exact lines are
    compared once, the one faster there first."""
    pairs = [(eff, ex) for eff in others for ex in exact]
    for i, a in enumerate(exact):
        for b in exact[i + 1:]:
            faster_b = ratio_at_largest(*b.series(R.KERNEL_FWD_MS), *a.series(R.KERNEL_FWD_MS))
            pairs.append((b, a) if (faster_b.value or 0) > 1 else (a, b))
    rows = []
    for cand, ref in pairs:
        if not cand.same_axes(ref):
            continue
        cells = [cand.label, ref.label]
        for metric, more, less in _RATIO_METRICS:
            cells.append(ratio_at_largest(*cand.series(metric), *ref.series(metric)).describe(more, less))
        rows.append(cells)
    if not rows:
        return
    doc.p("Ratios at the largest length both lines ran ok, each column on its own (a "
          "forward+backward cell skipped or out of memory at the largest n moves that column to a "
          "smaller n): the reference's median over the line's.")
    doc.table(["line", "vs", "forward time", "fwd+bwd time", "forward peak memory"], rows)


ABSENT = "absent"  # a figure from an analytic model the variant does not have


def _median_metric(rows: pd.DataFrame, metric: str) -> float | None:
    col = R.col(metric)
    return float(rows[col].median()) if col in rows and rows[col].notna().any() else None


def _share(part: float | None, total: float | None, digits: int) -> str:
    return f"{100 * part / total:.{digits}f}%" if total and part is not None else "—"


def section_theory(doc: Doc, lines: list[Line], colours: dict, out: Path) -> None:
    doc.h(2, "4. Theory next to measurement")
    seeds = seed_figures()
    doc.p("Seed figures, recomputed with the formulas the measurement uses "
          "(`pipeline.analytic.score_macs` = n²·d, `score_entries` = n²):")
    doc.table(["n", "d", "score multiply-adds n²·d", "score entries n²"],
              [[f"{r['n']:,}", f"{r['d']:,}", f"≈ {sci(r['score_macs'])} ({r['score_macs']:,})",
                f"≈ {sci(r['score_entries'])} ({r['score_entries']:,})"] for r in seeds["rows"]])
    doc.p(f"{seeds['length_factor']}× the length → {seeds['work_factor']:g}× the score work at fixed d.")
    if not lines:
        return
    path = plot_flops(lines, colours, out / "flops.png")
    if path:
        doc.figure(path, "Analytic vs counted forward FLOPs, mixing share, "
                         "achieved fraction of the measured GEMM peak")
    rows = []
    for ln in lines:
        for n, g in ln.ok().groupby(SEQ_LEN, sort=True):
            def med(m, g=g):
                return _median_metric(g, m)

            total, proj = med(R.KERNEL_FLOPS_FWD_ANALYTIC), med(R.KERNEL_FLOPS_FWD_PROJECTION)
            mix, frac = med(R.KERNEL_FLOPS_FWD_MIXING), med(R.KERNEL_PEAK_FRACTION)
            counted = med(R.KERNEL_FLOPS_FWD)
            peak = float(g[GEMM_PEAK].median()) if GEMM_PEAK in g else None
            mix_frac = med(R.KERNEL_MIXING_PEAK_FRACTION)
            if ln.lacks("flops"):  # no analytic count: every figure from one is absent, never guessed
                rows.append([ln.label, f"{int(n):,}", ABSENT, ABSENT, ABSENT, fmt(counted) if counted else "not counted",
                             ABSENT, ABSENT, fmt(peak), ABSENT, ABSENT])
                continue
            rows.append([ln.label, f"{int(n):,}", fmt(total), _share(proj, total, 1), _share(mix, total, 1),
                         fmt(counted) if counted else "not counted",
                         fmt(counted / total) if counted and total else "—",
                         fmt(med(R.KERNEL_TFLOPS)), fmt(peak),
                         _share(frac, 1, 2), _share(mix_frac, 1, 2)])
    doc.table(["line", "n", "analytic FLOPs", "projection", "mixing", "counted FLOPs", "counted / analytic",
               "achieved TFLOP/s", "GEMM peak TFLOP/s", "of peak", "mixing alone, of peak"], rows)
    doc.p("Counted FLOPs come from `torch.utils.flop_counter`; a kernel it has no formula for "
          "counts nothing, shown as \"not counted\" (never as 0). A counted/analytic ratio below 1 means "
          "part of the work ran in such a kernel (e.g. a fused attention); above 1, that the counter "
          "charged work the analytic count skips (e.g. the masked half of a causal score matrix). "
          "Achieved TFLOP/s is analytic (useful) forward FLOPs over the median forward time. "
          "\"Mixing alone\" is the mixing FLOPs (for exact attention the 4·B·H·n²·d_k of QKᵀ and PV, "
          "halved when causal; for the sliding window only the (query, key) pairs of its band; "
          "for Performer its feature maps and sums; for the SSM its FFT convolution) over the "
          "forward time minus the time of the mixer's projections run alone. "
          f"\"{ABSENT}\": the variant has no analytic FLOP count (tag `{R.ANALYTIC_ABSENT}`, e.g. a plain module "
          "run with model=custom), so the figures computed from one are not recorded.")


def section_memory_wall(doc: Doc, lines: list[Line], budget_gb: float | None) -> None:
    doc.h(2, "5. Memory wall (predicted)")
    if not lines:
        doc.p("No kernel cells.")
        return
    doc.p("Largest n whose peak memory fits the budget, extrapolated from each line's fitted "
          "memory curve (peak ≈ c·n^k over its largest ok lengths). These are predictions, not measurements.")
    rows = []
    for ln in lines:
        budget, why = memory_budget_mb(ln, budget_gb)
        row = [ln.label, why]
        for metric in (R.KERNEL_PEAK_MEM_MB, R.KERNEL_PEAK_MEM_FWDBWD_MB):
            fit = ln.fit(metric)
            if fit is None or budget is None or fit.exponent <= 0:
                row.append("—" if budget is None else "no usable fit")
                continue
            row.append(f"predicted n ≈ {fmt(fit.solve(budget))} "
                       f"(k = {fit.exponent:.2f}, fit over n = {fmt_lengths(fit.lengths)})")
        rows.append(row)
    doc.table(["line", "budget", "forward", "forward + backward"], rows)


def section_failures(doc: Doc, cells: pd.DataFrame) -> None:
    doc.h(2, "6. Cells that did not finish ok, or whose timings are not stable")
    bad = cells[cells[STATUS] != "ok"]
    reason = R.col(R.FAILURE_REASON)
    if bad.empty:
        doc.p("Every cell finished ok.")
    else:
        doc.table(["variant", "scenario", "task", "n", "status", "reason", "run"],
                  [[r.get(MODEL), r.get(SCENARIO), r.get(R.col(R.TASK)), fmt_n(r.get(SEQ_LEN)), r[STATUS],
                    r.get(reason) if isinstance(r.get(reason), str) else "—", run_ref(r)]
                   for _, r in bad.iterrows()])
    flagged_table(doc, cells)
    col = R.col(R.FWDBWD_SKIPPED)
    part = cells[(cells[STATUS] == "ok") & cells[col].notna()] if col in cells else cells.iloc[0:0]
    if not part.empty:
        doc.p("Kernel cells that finished ok without a forward + backward figure (their forward stands):")
        doc.table(["variant", "n", "dtype", "why", "run"],
                  [[r.get(MODEL), fmt_n(r.get(SEQ_LEN)), r.get(R.col(R.DTYPE, "param"), "—"), r[col], run_ref(r)]
                   for _, r in part.iterrows()])


def section_provenance(doc: Doc, cells: pd.DataFrame) -> None:
    doc.h(2, "7. Backends, hardware and versions")
    doc.h(3, "Backend that ran, per variant")
    backend = R.col(R.BACKEND)
    rows = []
    for model, g in cells.groupby(MODEL, sort=True):
        ran = g.dropna(subset=[backend]) if backend in g else None  # none: no cell got that far
        per = [] if ran is None else [f"{b} ({len(gb)}: {', '.join(sorted(set(gb[SCENARIO].astype(str))))})"
                                      for b, gb in ran.groupby(backend, sort=True)]
        notes = sorted(set(g.get(R.col(R.BACKEND_NOTE), pd.Series(dtype=str)).dropna()))
        details = sorted(set(g.get(R.col(R.BACKEND_DETAIL), pd.Series(dtype=str)).dropna()))
        flag = ["more than one backend ran"] if len(per) > 1 else []
        rows.append([model, "; ".join(per) or "not logged", "; ".join(details) or "—",
                     "; ".join(flag + notes) or "—"])
    doc.table(["variant", "backend (cells: scenarios)", "operator, build", "why not the preferred kernel"], rows)
    doc.h(3, "Hardware and software")
    rows = []
    for tag in PROVENANCE_TAGS:
        col = R.col(tag)
        vals = cells[col].dropna().value_counts() if col in cells else pd.Series(dtype=int)
        shown = ", ".join(f"{v} ({c})" if len(vals) > 1 else str(v) for v, c in vals.items())
        rows.append([tag, shown or "not logged"])
    if GEMM_PEAK in cells:
        peaks = cells[GEMM_PEAK].dropna()
        if len(peaks):
            rows.append(["GEMM peak (TFLOP/s, measured)", ", ".join(fmt(v) for v in sorted(set(peaks)))])
    doc.table(["field", "value (cells, when several)"], rows)
