"""The report's trust parts: its first line (how many timed cells are flagged, how many were
measured again), the table of flagged cells with their evidence, and the run-to-run spread of
cells measured in rounds. The rules behind the flags: pipeline/stability.py.

    doc.bullets([trust_line(cells), ...]); flagged_table(doc, cells); rounds_table(doc, lines)
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline import record as R
from pipeline.report.document import Doc
from pipeline.report.format import fmt, fmt_n, run_ref
from pipeline.report.lines import FLAG, MODEL, SCENARIO, SEQ_LEN, STATUS, Line, flagged


def trust_line(cells: pd.DataFrame) -> str:
    """The report's first line: how many timed cells are not `stable`, and how many were measured again."""
    col = R.col(R.STABILITY)
    timed = cells[(cells[STATUS] == "ok") & cells[col].notna()] if col in cells else cells.iloc[0:0]
    if timed.empty:
        return "**timings:** no cell carries a stability verdict (recorded before it existed, or nothing timed)"
    bad = flagged(timed)
    counts = bad[col].value_counts()
    attempts = pd.to_numeric(timed.get(R.col(R.CELL_ATTEMPTS), pd.Series(dtype=float)), errors="coerce")
    again = int((attempts > 1).sum())
    head = (f"**timings: {len(bad)} of {len(timed)} timed cells flagged** ("
            + ", ".join(f"{v} {k}" for k, v in counts.items()) + f"; marked {FLAG} below, listed in section 6)"
            if len(bad) else f"**timings:** all {len(timed)} timed cells stable")
    untimed = len(cells[cells[STATUS] == "ok"]) - len(timed)
    return head + f"; {again} measured again in a new process" + (
        f"; {untimed} ok cell(s) time nothing or predate the verdicts (no `{R.STABILITY}` tag)" if untimed else "")


def flagged_table(doc: Doc, cells: pd.DataFrame) -> None:
    """Cells that finished ok but whose timings are not `stable`, with the evidence."""
    bad = flagged(cells[cells[STATUS] == "ok"])
    if bad.empty:
        return
    doc.p(f"Cells that finished ok but whose timings are not `stable` ({FLAG} in the tables; the "
          "evidence is the OS's: calls that waited for a CPU, other processes' CPU use, the spread; "
          "docs/measurement.md gives the rules). Their figures stand in the tables, marked, where no "
          "stable measurement of the same cell exists:")
    attempts = R.col(R.CELL_ATTEMPTS)
    doc.table(["variant", "scenario", "n", "stability", "attempts", "evidence", "run"],
              [[r.get(MODEL), r.get(SCENARIO), fmt_n(r.get(SEQ_LEN)), r[R.col(R.STABILITY)],
                fmt_n(r.get(attempts)) if pd.notna(r.get(attempts)) else "1",
                str(r.get(R.col(R.STABILITY_REASON)) or "—")[:400], run_ref(r)]
               for _, r in bad.iterrows()])


def rounds_table(doc: Doc, lines: list[Line]) -> None:
    """Where kernel cells ran in several rounds (`rounds` > 1): each line and length's rounds,
    their median (the figure the tables use), their spread, and the spread inside one run."""
    col = R.col(R.ROUND, "param")
    rows = []
    for ln in lines:
        ok = ln.ok()
        if col not in ok or ok[col].notna().sum() == 0:
            continue
        fwd = R.col(R.KERNEL_FWD_MS)
        lo, hi = (R.col(c) for c in R.ci_names(R.KERNEL_FWD_MS))
        for n, g in ok.groupby(SEQ_LEN):
            v = pd.to_numeric(g[fwd], errors="coerce").dropna()
            if len(v) < 2:
                continue
            med = float(v.median())
            within = ((pd.to_numeric(g[hi], errors="coerce") - pd.to_numeric(g[lo], errors="coerce")) / 2
                      / pd.to_numeric(g[fwd], errors="coerce")).median() if lo in g and hi in g else np.nan
            rows.append([ln.label, fmt_n(n), str(len(v)), fmt(med), f"{fmt(v.min())}–{fmt(v.max())}",
                         f"{(v.max() - v.min()) / med:.1%}", f"±{within:.1%}" if np.isfinite(within) else "—"])
    if rows:
        doc.h(3, "Rounds: run-to-run spread")
        doc.p("Kernel cells measured in several rounds, each in its own process, the rounds interleaved "
              "across the sweep in shuffled order. The tables and fits use the median of the rounds; the "
              "spread across rounds is the run-to-run variance that a CI from one run does not carry.")
        doc.table(["line", "n", "rounds", "fwd ms (median of rounds)", "range", "range / median",
                   "CI half-width inside one run (median)"], rows)
