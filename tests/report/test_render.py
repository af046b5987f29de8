"""The report's rendering: the document model's HTML (pipeline/report/document.py) and sections
(pipeline/report/sections.py) built from small hand-made tables.

    .venv/bin/pytest tests/report/test_render.py
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline import record as R
from pipeline.report.document import Doc, inline
from pipeline.report.format import fmt
from pipeline.report.lines import Line
from pipeline.report.sections import section_crossover, section_failures, section_provenance


def test_html_text_never_holds_a_scheme():
    assert "://" not in inline("see https://example.org and `http://x`")
    assert "<code>" in inline("`code`")


def test_number_format():
    assert (fmt(1234.5), fmt(0.5), fmt(2.5e8), fmt(None), fmt(float("nan")), fmt(0)) == \
        ("1,234", "0.5", "2.50·10⁸", "—", "—", "0")
    assert fmt(1073.7, thousands="", missing="-") == "1074" and fmt(None, missing="-") == "-"


def test_ratio_table_with_exact_lines_only():
    """Two exact lines and no efficient one: no crossovers, but the ratio is still given, the
    faster line first."""

    def line(model, coef):
        n = np.array([1024, 2048, 4096])
        rows = pd.DataFrame(
            {
                R.col(R.STATUS): "ok",
                "params.seq_len": n,
                R.col(R.KERNEL_FWD_MS): coef * n**2.0,
                R.col(R.KERNEL_PEAK_MEM_MB): coef * n,
            }
        )
        return Line(model, {}, rows, True)

    doc = Doc()
    section_crossover(doc, [line("vanilla", 4.0), line("xformers", 1.0)])
    md = doc.markdown()
    assert "Crossovers need at least one line" in md
    assert (
        "| xformers | vanilla | 4.00× faster (n = 4,096) | no common length that both ran ok | 4.00× smaller (n = 4,096) |"
        in md
    )


def test_failures_section_lists_ok_cells_without_forward_backward():
    cells = pd.DataFrame({
        R.col(R.STATUS): ["ok", "ok", "oom"],
        R.col(R.MODEL): ["vanilla", "xformers", "vanilla"],
        R.col(R.SCENARIO): ["kernel"] * 3,
        R.col(R.TASK): ["mqar"] * 3,
        "params.seq_len": [65536, 65536, 131072],
        "params.backbone.dtype": ["bfloat16"] * 3,
        R.col(R.FAILURE_REASON): [None, None, "OutOfMemoryError: CUDA out of memory"],
        R.col(R.FWDBWD_SKIPPED): ["out of memory in forward+backward: OutOfMemoryError: CUDA out of memory", None, None],
        "run_name": ["vanilla-n65536-kernel", "xformers-n65536-kernel", "vanilla-n131072-kernel"],
        "run_id": ["aaaaaaaa11", "bbbbbbbb22", "cccccccc33"],
    })
    doc = Doc()
    section_failures(doc, cells)
    md = doc.markdown()
    assert ("| vanilla | kernel | mqar | 131,072 | oom | OutOfMemoryError: CUDA out of memory |"
            " vanilla-n131072-kernel `cccccccc` |") in md
    assert "without a forward + backward figure" in md
    assert ("| vanilla | 65,536 | bfloat16 | out of memory in forward+backward: OutOfMemoryError: CUDA out of memory |"
            " vanilla-n65536-kernel `aaaaaaaa` |") in md
    assert "xformers-n65536" not in md


def test_provenance_when_no_cell_got_as_far_as_a_backend():
    # every cell failed before its mixer ran (e.g. a GPU grid on a machine without CUDA)
    cells = pd.DataFrame({R.col(R.STATUS): ["error", "error"], R.col(R.MODEL): ["ssm", "xformers"],
                          R.col(R.SCENARIO): ["kernel", "kernel"], R.col(R.DEVICE): ["cpu", "cpu"]})
    doc = Doc()
    section_provenance(doc, cells)
    md = doc.markdown()
    assert "| ssm | not logged | — | — |" in md and "| xformers | not logged | — | — |" in md
    assert "| device | cpu |" in md
