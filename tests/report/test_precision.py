"""The report's Precision section (pipeline/report/precision.py) on cells with known errors."""
from __future__ import annotations

import pandas as pd

from pipeline import record as R
from pipeline.report.document import Doc
from pipeline.report.precision import precision_lines, rule_verdict, section_precision


def _cells() -> pd.DataFrame:
    rows = []
    for model, exact, factor in (("vanilla", "True", 1.0), ("sloppy", "True", 3.0), ("performer", "False", 1.4)):
        for n in (512, 1024, 2048):
            base = 4e-3 * (n / 512) ** 0.1
            rows.append({R.col(R.MODEL): model, R.col(R.STATUS): "ok", R.col(R.EXACT): exact,
                         R.col(R.SEQ_LEN, "param"): n, R.col("backbone.dtype", "param"): "bfloat16",
                         R.col(R.QUALITY_REL_ERR_VS_FP32_REF): factor * base * (1.5 if model == "sloppy" and n == 512 else 1),
                         R.col(R.QUALITY_REL_ERR_TORCH_SAME_DTYPE): base})
    rows.append({R.col(R.MODEL): "vanilla", R.col(R.STATUS): "ok", R.col(R.EXACT): "True", R.col(R.SEQ_LEN, "param"): 512,
                 R.col("backbone.dtype", "param"): "float32"})  # a float32 cell: no precision figure, no line
    return pd.DataFrame(rows)


def test_precision_lines_verdicts_and_slope(tmp_path):
    lines = {ln.model: ln for ln in precision_lines(_cells())}
    assert set(lines) == {"vanilla", "sloppy", "performer"}
    assert rule_verdict(lines["vanilla"]) == "pass at every n"
    assert rule_verdict(lines["sloppy"]) == "fails at n = 512, 1,024, 2,048"
    assert rule_verdict(lines["performer"]) == "not judged (not exact)"
    doc = Doc()
    section_precision(doc, _cells(), {"vanilla": "C0", "sloppy": "C1", "performer": "C2"}, tmp_path)
    md = doc.markdown()
    assert "## Precision" in md and "(3.00x)" in md and "[dtype=bfloat16]" in md
    assert "| 0.10 | pass at every n |" in md  # the slope over every length: errors grow as n^0.1
    assert (tmp_path / "precision_error.png").exists()


def test_no_lower_precision_cells_no_section(tmp_path):
    doc = Doc()
    section_precision(doc, _cells().iloc[-1:], {}, tmp_path)
    assert "Precision" not in doc.markdown()
