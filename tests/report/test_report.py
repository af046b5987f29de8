"""The report built from a small fixture MLflow store (tests/report/conftest.py): which runs it
selects, the lines it fits, and the content and self-containment of what it writes.

    .venv/bin/pytest tests/report/test_report.py
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys

import pandas as pd
import pytest

from pipeline import record as R
from pipeline.registry import REPO_ROOT
from pipeline.report import build
from pipeline.report.lines import kernel_lines, memory_budget_mb
from pipeline.report.load import load_runs
from tests.support import table_row


def _section(md: str, number: int) -> str:
    return md.split(f"## {number}.")[1].split("\n## ")[0]


def test_sweep_selection(store):
    t = load_runs(store.experiment, store.sweep_id, store.uri)
    ids = set(t.frame["run_id"])
    assert len(t.frame) == store.sweep_cells
    assert store.reused_run_id in ids and store.parent_run_id not in ids
    assert t.frame.loc[t.frame["run_id"] == store.reused_run_id, "reused"].item()
    assert store.superseded_run_id not in ids  # belongs to the earlier sweep


def test_experiment_keeps_latest_per_config_hash(store):
    t = load_runs(store.experiment, None, store.uri)
    ids = set(t.frame["run_id"])
    assert len(t.frame) == store.experiment_cells
    assert store.superseded_run_id not in ids and store.parent_run_id not in ids
    assert t.frame[R.col(R.CONFIG_HASH)].is_unique
    v512 = t.frame[
        (t.frame[R.col(R.MODEL)] == "vanilla")
        & (t.frame["params.seq_len"] == 512)
        & (t.frame[R.col(R.SCENARIO)] == "kernel")
    ]
    assert v512[R.col(R.KERNEL_FWD_MS)].item() == pytest.approx(2e-6 * 512**2)
    assert any("superseded" in n for n in t.notes)


def test_fits_on_store_lines(store):
    lines = {
        ln.label: ln
        for ln in kernel_lines(load_runs(store.experiment, store.sweep_id, store.uri).frame)
    }
    assert set(lines) == set(store.kernel)
    for model, (exact, _, t_order, _, m_order) in store.kernel.items():
        ln = lines[model]
        assert ln.exact is exact
        assert ln.fit(R.KERNEL_FWD_MS).exponent == pytest.approx(t_order, abs=0.05)
        assert ln.fit(R.KERNEL_PEAK_MEM_MB).exponent == pytest.approx(m_order, abs=0.05)
    # vanilla's 4096 ran out of memory: its fit stops at 2048
    assert lines["vanilla"].fit(R.KERNEL_FWD_MS).lengths == (512, 1024, 2048)


def test_output_files(built):
    path, _, _ = built
    for name in (
        "report.md",
        "report.html",
        "results.csv",
        "time_fwd.png",
        "time_fwdbwd.png",
        "memory_fwd.png",
        "flops.png",
        "quality_vs_time.png",
        "quality_vs_memory.png",
        "checkpointing.png",
    ):
        assert (path / name).stat().st_size > 0, name


def test_results_csv_one_row_per_cell(built, store):
    path, _, _ = built
    df = pd.read_csv(path / "results.csv")
    assert len(df) == store.sweep_cells and df["run_id"].is_unique
    for col in (
        "params.seq_len",
        "params.backbone.dtype",
        R.col(R.KERNEL_FWD_MS),
        R.col(R.VAL_ACC),
        R.col(R.STATUS),
        R.col(R.BACKEND),
        R.col(R.CONFIG_HASH),
    ):
        assert col in df.columns, col


def test_html_is_self_contained(built):
    path, _, html = built
    assert "http://" not in html and "https://" not in html and 'src="//' not in html
    assert "<link" not in html and "<script" not in html
    srcs = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert len(srcs) == len(list(path.glob("*.png")))
    for s in srcs:
        assert s.startswith("data:image/png;base64,")
        assert base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_failures_listed_with_reasons(built, store):
    _, md, _ = built
    sec = _section(md, 6)
    assert len(store.failures) == 3
    for run_id, (status, reason) in store.failures.items():
        line = next(ln for ln in sec.splitlines() if run_id[:8] in ln)
        assert f"| {status} |" in line and reason.split(":")[0] in line
    assert "ok |" not in sec


def test_headline(built):
    _, md, _ = built
    sec = _section(md, 1)
    assert "n = 2,048" in sec  # largest length every line ran ok
    assert "| vanilla | yes | 2.00 | 2.00 | 2.00 | 512, 1,024, 2,048 |" in sec
    assert "| longformer | no | 1.00 | 1.00 | 1.00 | 1,024, 2,048, 4,096 |" in sec
    assert "sdpa_flash, sdpa_math" in table_row(sec, "xformers")
    assert "val/acc 0.95 ± 0.014 (2 seeds) at n = 128" in table_row(sec, "vanilla")


def test_crossovers_in_report(built, store):
    _, md, _ = built
    sec = _section(md, 3)
    lv = table_row(sec, "longformer", "vanilla")
    assert f"n ≈ {store.expected[('longformer', 'vanilla', 'fwd')]:,.0f}" in lv
    assert f"n ≈ {store.expected[('longformer', 'vanilla', 'mem')]:,.0f}" in lv
    assert f"n ≈ {store.expected[('longformer', 'xformers', 'fwd')]:,.0f}" in table_row(
        sec, "longformer", "xformers"
    )
    pv = table_row(sec, "performer", "vanilla")
    assert "not reached within the grid" in pv and "smaller at every n measured" in pv
    # ratios at the largest common length: vanilla ran out of memory at 4096, so 2048 there
    ratios = sec.split("Ratios at the largest length")[1]
    assert table_row(ratios, "xformers", "vanilla").endswith(
        "| 2.00× faster (n = 2,048) | 2.00× faster (n = 2,048) | 16.4× smaller (n = 2,048) |"
    )
    assert "| 1.02× faster (n = 4,096) |" in table_row(ratios, "longformer", "xformers")
    assert not any(line.startswith("| vanilla | xformers |") for line in ratios.splitlines())


def test_theory_section(built):
    _, md, _ = built
    sec = _section(md, 4)
    for figure in ("2.0·10⁸", "2.6·10⁵", "6.9·10¹⁰", "6.7·10⁷", "256×"):
        assert figure in sec, figure
    # a counted 0 (performer) and an absent count (xformers) both read "not counted"
    for model in ("performer", "xformers"):
        assert "not counted" in table_row(sec, model, "1,024")
    assert "not counted" not in table_row(sec, "vanilla", "1,024")
    assert "| 20.0% | 80.0% |" in table_row(sec, "vanilla", "1,024")  # projection vs mixing share


def test_memory_wall_and_checkpointing(built, store):
    _, md, _ = built
    wall = table_row(_section(md, 5), "vanilla")
    assert (
        f"predicted n ≈ {store.expected[('vanilla', 'wall_1gb')]:,.0f}" in wall
        and "--budget-gb" in wall
    )
    ck = md.split("### Gradient checkpointing")[1].split("\n## ")[0]
    assert "40.0%" in table_row(ck, "vanilla") and "+30.0%" in table_row(ck, "vanilla")
    assert "25.0%" in table_row(ck, "longformer") and "+20.0%" in table_row(ck, "longformer")


def test_pareto_in_report(built):
    _, md, _ = built
    sec = _section(md, 2)
    # mqar at n=128: xformers matches vanilla's accuracy for less time, longformer is cheapest
    assert (
        table_row(sec, "mqar", "128", "full", R.VAL_ACC, "training time per token (µs)")
        .rstrip(" |")
        .endswith("longformer, xformers")
    )


def test_unknown_experiment(store):
    with pytest.raises(ValueError, match="no MLflow experiment"):
        load_runs("no-such-experiment", None, store.uri)
    with pytest.raises(ValueError, match="no runs with sweep_id"):
        load_runs(store.experiment, "no-such-sweep", store.uri)


def test_cli_arguments(monkeypatch, tmp_path, capsys):
    seen = {}
    monkeypatch.setattr(build, "build_report", lambda *a: seen.setdefault("args", a) and tmp_path)
    assert (
        build.main(["--experiment", "e", "--sweep", "s", "--out", str(tmp_path), "--budget-gb", "8"])
        == 0
    )
    assert seen["args"] == ("e", "s", tmp_path, 8.0, None)
    assert str(tmp_path) in capsys.readouterr().out


def test_memory_wall_uses_the_budget_the_cells_logged(store):
    lines = {ln.label: ln for ln in kernel_lines(load_runs(store.experiment, store.sweep_id, store.uri).frame)}
    assert memory_budget_mb(lines["vanilla"], None) == (2048.0, "2.00 GiB (logged budget_mem_mb)")


def test_module_entry_point(store, tmp_path):
    """`python -m pipeline.report` as a user runs it; without --budget-gb the memory wall is
    judged against the budget the cells logged."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.uri}
    r = subprocess.run([sys.executable, "-m", "pipeline.report", "--experiment", store.experiment,
                        "--sweep", store.sweep_id, "--out", str(tmp_path)], cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"report written to {tmp_path}/report.html" in r.stdout
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    wall = table_row(_section(md, 5), "vanilla")
    assert f"predicted n ≈ {store.expected[('vanilla', 'wall_logged')]:,.0f}" in wall
    assert "2.00 GiB (logged budget_mem_mb)" in wall
    bad = subprocess.run([sys.executable, "-m", "pipeline.report", "--experiment", "no-such-experiment"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and "report: no MLflow experiment" in bad.stderr
