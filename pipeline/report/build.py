"""Building one report: read the runs, run every section into one Doc, write report.md,
report.html, results.csv and the figures into the output folder; and the command line for it.

    build_report("attnbench", sweep_id=None, out_dir=None, budget_gb=None, tracking_uri=None)
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import pandas as pd

from pipeline import record as R
from pipeline.registry import REPO_ROOT
from pipeline.report import sections as S
from pipeline.report.answer import section_answer
from pipeline.report.decoding import section_decoding
from pipeline.report.document import Doc
from pipeline.report.figures import variant_colours
from pipeline.report.lines import MODEL, kernel_lines, quality_groups
from pipeline.report.load import load_runs
from pipeline.report.precision import section_precision
from pipeline.report.tradeoff import section_tradeoff


def _device_slug(cells: pd.DataFrame) -> str:
    devs = sorted(set(cells.get(R.col(R.DEVICE), pd.Series(dtype=str)).dropna()))
    return "+".join(devs) if devs else "unknown-device"


def build_report(experiment: str, sweep_id: str | None = None, out_dir: Path | None = None,
                 budget_gb: float | None = None, tracking_uri: str | None = None) -> Path:
    """Read the runs, write report.md, report.html, results.csv and the figures; returns the
    output folder (default reports/<experiment>/<date>-<device>/ under the repo, with the
    sweep's grid appended for a sweep, so two sweeps of a day do not overwrite each other).
    `budget_gb` overrides the memory budget the cells logged (section 5 and Decoding)."""
    table = load_runs(experiment, sweep_id, tracking_uri)
    cells = table.frame
    if out_dir is None:
        name = f"{datetime.now():%Y-%m-%d}-{_device_slug(cells)}"
        if sweep_id is not None:
            name += f"-{table.grid or 'sweep'}-{sweep_id.rsplit('-', 1)[-1]}"
        out_dir = REPO_ROOT / "reports" / experiment / name
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells.to_csv(out_dir / "results.csv", index=False)

    doc = Doc()
    title = f"attnbench report — {experiment}" + (f", sweep {sweep_id}" if sweep_id else "")
    S.section_header(doc, title, table)
    lines = kernel_lines(cells)
    colours = variant_colours(cells[MODEL].dropna().astype(str))
    qgroups = quality_groups(cells)
    S.section_headline(doc, lines, qgroups)
    S.section_figures(doc, lines, qgroups, cells, colours, out_dir)
    S.section_crossover(doc, lines)
    S.section_theory(doc, lines, colours, out_dir)
    section_answer(doc, cells, colours, out_dir)  # kernel cells at under 2 widths D: no section
    S.section_memory_wall(doc, lines, budget_gb)
    section_decoding(doc, kernel_lines(cells, "decode"), budget_gb, colours, out_dir)  # none: no section
    section_tradeoff(doc, cells, qgroups, colours, out_dir)
    section_precision(doc, cells, colours, out_dir)  # no lower-precision fidelity cells: no section
    S.section_failures(doc, cells)
    S.section_provenance(doc, cells)

    (out_dir / "report.md").write_text(doc.markdown(), encoding="utf-8")
    (out_dir / "report.html").write_text(doc.html(title), encoding="utf-8")
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline import report

    ap = argparse.ArgumentParser(prog="python -m pipeline.report", description=report.__doc__.splitlines()[0])
    ap.add_argument("--experiment", required=True, help="MLflow experiment name")
    ap.add_argument("--sweep", default=None, help="report only this sweep_id (plus the cells it reused)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default reports/<experiment>/<date>-<device>/)")
    ap.add_argument("--budget-gb", type=float, default=None,
                    help="memory budget for the memory wall (default: the one the cells logged)")
    ap.add_argument("--tracking-uri", default=None, help="override MLFLOW_TRACKING_URI / the default store")
    args = ap.parse_args(argv)
    try:
        out = build_report(args.experiment, args.sweep, args.out, args.budget_gb, args.tracking_uri)
    except ValueError as e:
        ap.exit(2, f"report: {e}\n")
    print(f"report written to {out}/report.html (and report.md, results.csv)")
    return 0
