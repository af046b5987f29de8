"""The report's side of the trust layer, from a small store with known CIs and stability flags:
the first line's counts, a stable run of a cell preferred to a newer disturbed one, exponents
with their CIs, the flagged figures marked and listed with their evidence."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import record as R
from pipeline.report import build_report
from pipeline.report.analysis import fit_power_law
from pipeline.report.load import load_runs
from tests.report.conftest import _Writer

LENGTHS = (512, 1024, 2048, 4096)


def _cell(w, model, n, ms, stability="stable", reason="", h=None, rel=0.02, attempts=1):
    lo, hi = R.ci_names(R.KERNEL_FWD_MS)
    tags = {R.MODEL: model, R.SCENARIO: "kernel", R.TASK: "mqar", R.STATUS: "ok", R.EXACT: str(model == "vanilla"),
            R.CONFIG_HASH: h or f"{model}-{n}", R.STABILITY: stability, R.STABILITY_REASON: reason,
            R.DEVICE: "cpu", R.BACKEND: "torch-matmul"}
    params = {"model.name": model, "seq_len": n, "backbone.d_model": 64, "backbone.n_heads": 1,
              "scenario.name": "kernel", R.GEMM_PEAK_TFLOPS: 0.4}
    metrics = {R.KERNEL_FWD_MS: ms, lo: ms * (1 - rel), hi: ms * (1 + rel), R.KERNEL_PEAK_MEM_MB: n / 100,
               R.CELL_ATTEMPTS: attempts}
    return w.run(f"{model}-n{n}-kernel", tags, params, metrics)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    uri = f"sqlite:///{root / 't.db'}"
    w = _Writer(uri)
    for n in LENGTHS:
        _cell(w, "ssm", n, 0.01 * n)
    for n in LENGTHS[:-1]:
        _cell(w, "vanilla", n, 1e-5 * n * n)
    # the largest vanilla cell: a stable run, then a newer contaminated one of the same cell
    stable = _cell(w, "vanilla", 4096, 1e-5 * 4096**2, h="v4096")
    _cell(w, "vanilla", 4096, 20 * 1e-5 * 4096**2, "contaminated", "kernel/fwd_ms: 9 of 9 calls waited", h="v4096",
          attempts=3)
    # a flagged cell with no stable twin: it stands, marked
    _cell(w, "ssm", 8192, 0.01 * 8192 * 3, "unstable", "kernel/fwd_ms: step of +40% between the halves",
          attempts=3)
    return uri, stable, root


def test_a_stable_run_of_a_cell_stands_before_a_newer_disturbed_one(store):
    uri, stable, _ = store
    frame = load_runs("fixture", None, uri).frame
    v = frame[(frame[R.col(R.MODEL)] == "vanilla") & (frame["params.seq_len"] == 4096)]
    assert v["run_id"].item() == stable and v[R.col(R.STABILITY)].item() == "stable"


def test_report_counts_marks_and_lists_flagged_cells(store):
    uri, _, root = store
    out = build_report("fixture", None, root / "out", None, tracking_uri=uri)
    md = (out / "report.md").read_text()
    first = [ln for ln in md.splitlines() if ln.startswith("- ")][0]
    assert "timings: 1 of 9 timed cells flagged" in first and "1 unstable" in first
    assert "1 measured again" in first
    headline = md.split("## 1.")[1].split("\n## ")[0]
    ssm_row = next(ln for ln in headline.splitlines() if ln.startswith("| ssm |"))
    vanilla_row = next(ln for ln in headline.splitlines() if ln.startswith("| vanilla |"))
    assert "†" in ssm_row and "†" not in vanilla_row  # vanilla's fit uses the stable 4096
    assert "[" in vanilla_row  # an exponent with its CI
    flagged = md.split("## 6.")[1].split("\n## ")[0]
    assert "step of +40%" in flagged and "| ssm | kernel | 8,192 | unstable | 3 |" in flagged
    assert "9 of 9 calls" not in md  # the superseded disturbed run is nowhere


def test_exponent_ci_narrows_with_the_cells_cis_and_holds_the_truth():
    n = np.array(LENGTHS, float)
    y = 1e-5 * n**2
    tight = fit_power_law(n, y, lo=y * 0.99, hi=y * 1.01)
    wide = fit_power_law(n, y, lo=y * 0.8, hi=y * 1.2)
    assert tight.ci[0] <= 2.0 <= tight.ci[1] and wide.ci[0] <= 2.0 <= wide.ci[1]
    assert tight.ci[1] - tight.ci[0] < (wide.ci[1] - wide.ci[0]) / 5
    assert fit_power_law(n, y).ci is None  # values without CIs: no interval is made up
