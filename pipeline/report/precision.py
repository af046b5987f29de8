"""The report's "Precision" section, from fidelity cells run in a dtype other than float32
(`backbone.dtype=bfloat16` or `float16`): each variant's error in that dtype against itself in
float32, next to plain PyTorch exact attention's error in the same dtype (FlashAttention's
baseline), the error's growth with n as a fitted slope, and for exact variants the verdict of
FlashAttention's rule (at most 2x the baseline plus a floor) at every length.

    section_precision(doc, cells, colours, out)     # no such cells: no section
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline import record as R
from pipeline.fidelity import PRECISION_FACTOR, PRECISION_FLOOR, within_rule
from pipeline.report.analysis import fit_power_law
from pipeline.report.document import Doc
from pipeline.report.figures import plot_scaling
from pipeline.report.format import MISSING, fmt
from pipeline.report.lines import Line, lines_of

ERR = R.QUALITY_REL_ERR_VS_FP32_REF
BASE = R.QUALITY_REL_ERR_TORCH_SAME_DTYPE
DTYPE = R.col(R.DTYPE, "param")


def precision_lines(cells: pd.DataFrame) -> list[Line]:
    """The cells that measured a dtype's error, as lines: a variant (and its other axes, the
    dtype among them, named even when only one ran) across lengths."""
    col = R.col(ERR)
    return lines_of(cells[cells[col].notna()], always=(DTYPE,)) if col in cells else []


def rule_verdict(line: Line) -> str:
    """pass / fail of FlashAttention's rule over the line's lengths (exact variants only)."""
    if not line.exact:
        return "not judged (not exact)"
    n, err = line.series(ERR)
    nb, base = line.series(BASE)
    if len(n) == 0 or len(n) != len(nb):
        return MISSING
    failing = [int(x) for x, e, b in zip(n, err, base) if not within_rule(e, b)]
    return "pass at every n" if not failing else "fails at n = " + ", ".join(f"{x:,}" for x in failing)


def section_precision(doc: Doc, cells: pd.DataFrame, colours: dict, out: Path) -> None:
    lines = precision_lines(cells)
    if not lines:
        return
    doc.h(2, "Precision")
    doc.p(f"Fidelity cells run in a lower precision: `{ERR}` is each variant's relative error in that dtype "
          "against the same variant in float32 (the same weights, cast; the same inputs); "
          f"`{BASE}` is plain PyTorch exact attention's error in the same dtype, scores materialised "
          "(FlashAttention's baseline). An exact variant passes FlashAttention's rule where its error is at most "
          f"{PRECISION_FACTOR:g}x the baseline's plus {PRECISION_FLOOR:g}; approximate variants are shown, not judged. "
          "The slope is the error's growth with n (log-log fit over every length).")
    path = plot_scaling(lines, ERR, "relative error vs float32", "Error of the lower precision vs n",
                        colours, out / "precision_error.png", guides=(0,))
    if path:
        doc.figure(path, "Relative error in the lower precision against float32 vs n (log-log; legend: fitted slope)")
    ns = sorted({int(x) for ln in lines for x in ln.series(ERR)[0]})
    rows = []
    for ln in lines:
        n, err = ln.series(ERR)
        nb, base = ln.series(BASE)
        by_n = dict(zip(n.astype(int), err))
        base_n = dict(zip(nb.astype(int), base))
        cells_txt = [fmt(by_n[x]) + (f" ({by_n[x] / base_n[x]:.2f}x)" if base_n.get(x) else "") if x in by_n
                     else MISSING for x in ns]
        fit = fit_power_law(n, err, largest=len(n)) if len(n) >= 2 else None
        rows.append([ln.label, {True: "yes", False: "no", None: "unknown"}[ln.exact], *cells_txt,
                     f"{fit.exponent:.2f}".replace("-0.00", "0.00") if fit else MISSING, rule_verdict(ln)])
    doc.table(["variant", "exact", *(f"n = {x:,}" for x in ns), "slope", "FlashAttention's rule"], rows)
    doc.p("Each cell: the error, and in brackets its ratio to plain PyTorch's in the same dtype at that n.")
