"""The report (DESIGN §7): one experiment, or one sweep of it, read back from MLflow and turned
into `report.md`, a self-contained `report.html`, `results.csv` and PNG figures. Every number in
it is computed from the runs (or, for the seed figures, from the formulas in pipeline/analytic.py).

    python -m pipeline.report --experiment attnbench [--sweep SWEEP_ID] [--out DIR] [--budget-gb 16]

Modules: load (MLflow -> one table), analysis (fits, crossovers, ratios, Pareto fronts: arrays
in, numbers out), lines (cells grouped into lines and quality groups), format (numbers as
printed), document (Markdown and HTML), figures (matplotlib), sections (one function per report
section), build (build_report and the command line), gpu_probe and gpu_summary (`make gpu-check`).
"""
from __future__ import annotations

__all__ = ["build_report"]


def __getattr__(name: str):
    # lazy: `python -m pipeline.report.gpu_summary probe` needs neither pandas nor matplotlib
    if name == "build_report":
        from pipeline.report.build import build_report

        return build_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
