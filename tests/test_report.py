"""The report: pure analysis functions against closed-form answers, then one report built from a
small fixture MLflow store (tests/fixtures_report.py) and checked for content and self-containment.

    .venv/bin/pytest tests/test_report.py
"""

from __future__ import annotations

import base64
import re

import numpy as np
import pandas as pd
import pytest

from pipeline import report as R
from tests import fixtures_report as F

LENGTHS = np.array([256, 512, 1024, 2048, 4096, 8192])


# ----------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("order", [1.0, 2.0])
def test_fit_recovers_exponent(order):
    fit = R.fit_power_law(LENGTHS, 3e-5 * LENGTHS**order)
    assert fit.exponent == pytest.approx(order, abs=0.05)
    assert fit.lengths == (2048, 4096, 8192)  # the 3 largest
    assert fit.predict(16384) == pytest.approx(3e-5 * 16384**order, rel=1e-6)


def test_fit_with_noise_overhead_and_repeats():
    rng = np.random.default_rng(0)
    # a constant overhead dominates short lengths: only the largest lengths show the n² law
    y = 5.0 + 1e-5 * LENGTHS**2.0
    n_rep = np.repeat(LENGTHS, 3)
    y_rep = np.repeat(y, 3) * rng.uniform(0.98, 1.02, size=len(n_rep))
    fit = R.fit_power_law(n_rep, y_rep)
    assert fit.exponent == pytest.approx(2.0, abs=0.1)
    assert R.fit_power_law(LENGTHS, y, largest=len(LENGTHS)).exponent < 1.8  # why the tail is used


def test_fit_ignores_missing_and_needs_two_lengths():
    y = 1e-3 * LENGTHS.astype(float)
    y[-1] = np.nan  # the largest length failed
    y[-2] = 0.0  # a broken measurement
    fit = R.fit_power_law(LENGTHS, y)
    assert fit.lengths == (512, 1024, 2048)
    assert fit.exponent == pytest.approx(1.0, abs=1e-9)
    assert R.fit_power_law([1024], [3.0]) is None
    assert R.fit_power_law([1024, 1024], [3.0, 3.1]) is None


@pytest.mark.parametrize("k,c", [(4e-3, 2e-6), (0.05, 1e-6), (1.0, 7e-4)])
def test_crossover_of_power_laws_is_exact(k, c):
    """k·n meets c·n² at n = k/c; straight lines in log-log, so interpolation is exact."""
    n = 2.0 ** np.arange(6, 17)
    co = R.crossover(n, k * n, c * n**2)
    assert co.verdict == "crosses"
    assert co.n == pytest.approx(k / c, rel=1e-9)
    assert co.lengths[0] == 64 and co.lengths[-1] == 65536


def test_crossover_between_other_exponents():
    n = 2.0 ** np.arange(8, 15)
    # a·n^1.5 vs b·n^2 cross at (a/b)^2
    co = R.crossover(n, 0.3 * n**1.5, 0.01 * n**2)
    assert co.n == pytest.approx((0.3 / 0.01) ** 2, rel=1e-9)


def test_crossover_verdicts():
    n = np.array([512, 1024, 2048])
    assert R.crossover(n, n * 1.0, n * 2.0).verdict == "below at every n"
    assert "faster at every n measured" in R.crossover(n, n * 1.0, n * 2.0).describe("faster")
    never = R.crossover(n, 10.0 * n, 1e-3 * n**2)  # crossing at 10,000: beyond the grid
    assert never.verdict == "not reached" and never.n is None
    assert "not reached within the grid" in never.describe()
    assert R.crossover([], [], []).verdict == "no common lengths"
    # faster in the middle but slower again at the largest n: the last sign change counts
    mid = R.crossover([256, 512, 1024, 2048], [2, 1, 1, 4], [1, 2, 2, 2])
    assert mid.verdict == "not reached"


def test_ratio_at_largest_common_length():
    r = R.ratio_at_largest([256, 512, 1024], [1.0, 2.0, 4.0], [256, 512], [4.0, 10.0])
    assert (r.n, r.value) == (512, 5.0) and r.describe() == "5.00× faster (n = 512)"
    slow = R.ratio_at_largest([512], [40.0], [512], [2.0])
    assert slow.describe("smaller", "larger") == "20.0× larger (n = 512)"
    # a missing, zero or NaN value at a length does not count as measured there
    r = R.ratio_at_largest([256, 512], [1.0, float("nan")], [256, 512], [3.0, 3.0])
    assert (r.n, r.value) == (256, 3.0)
    assert (
        R.ratio_at_largest([256], [1.0], [512], [1.0]).describe()
        == "no common length that both ran ok"
    )


def test_ratio_table_with_exact_lines_only():
    """Two exact lines and no efficient one: no crossovers, but the ratio is still given, the
    faster line first."""

    def line(model, coef):
        n = np.array([1024, 2048, 4096])
        rows = pd.DataFrame(
            {
                "tags.status": "ok",
                "params.seq_len": n,
                "metrics.kernel/fwd_ms": coef * n**2.0,
                "metrics.kernel/peak_mem_mb": coef * n,
            }
        )
        return R.Line(model, {}, rows, True)

    doc = R.Doc()
    R._section_crossover(doc, [line("vanilla", 4.0), line("xformers", 1.0)])
    md = doc.markdown()
    assert "Crossovers need at least one line" in md
    assert (
        "| xformers | vanilla | 4.00× faster (n = 4,096) | no common length that both ran ok | 4.00× smaller (n = 4,096) |"
        in md
    )


def test_pareto_front():
    cost = [1.0, 2.0, 3.0, 2.5, 4.0]
    acc = [0.5, 0.8, 0.9, 0.7, 0.9]
    # (2.5, 0.7) is beaten by (2.0, 0.8); (4.0, 0.9) by (3.0, 0.9)
    assert R.pareto_front(cost, acc, higher_is_better=True).tolist() == [
        True,
        True,
        True,
        False,
        False,
    ]
    err = [0.5, 0.2, 0.1, 0.3, 0.1]
    assert R.pareto_front(cost, err, higher_is_better=False).tolist() == [
        True,
        True,
        True,
        False,
        False,
    ]
    # a point with no cost takes no part
    assert R.pareto_front([1.0, np.nan], [0.1, 0.9]).tolist() == [True, False]


def test_seed_figures_are_computed():
    s = R.seed_figures()
    (a, b) = s["rows"]
    assert (a["n"], a["d"], b["n"], b["d"]) == (512, 768, 8192, 1024)
    assert R._sci(a["score_macs"]) == "2.0·10⁸" and R._sci(a["score_entries"]) == "2.6·10⁵"
    assert R._sci(b["score_macs"]) == "6.9·10¹⁰" and R._sci(b["score_entries"]) == "6.7·10⁷"
    assert s["length_factor"] == 16 and s["work_factor"] == 256


def test_varying_axes():
    base = {
        "tags.model": "m",
        "params.backbone.d_model": 64,
        "params.seed": 0,
        "params.gemm_peak_tflops": 1.0,
    }
    rows = []
    for n in (256, 512):
        for dtype in ("float32", "bfloat16"):
            for seed in (0, 1):
                rows.append(
                    {
                        **base,
                        "params.seq_len": n,
                        "params.backbone.dtype": dtype,
                        "params.seed": seed,
                        "params.batch_size": n // 256,  # scaled with n: not an axis of its own
                        "params.gemm_peak_tflops": 1.0 + seed,
                    }
                )  # added by the scenario: not an axis
    assert R.varying_axes(pd.DataFrame(rows)) == ["params.backbone.dtype"]


def test_variant_colours_are_stable():
    a = R.variant_colours(["performer", "vanilla", "longformer"])
    b = R.variant_colours(["vanilla", "longformer", "performer", "vanilla"])
    assert a == b and len(set(a.values())) == 3


def test_html_text_never_holds_a_scheme():
    assert "://" not in R._inline("see https://example.org and `http://x`")
    assert "<code>" in R._inline("`code`")


def test_checkpointing_effect_pairs_on_and_off():
    rows = []
    for ckpt, mem, step in ((False, 200.0, 10.0), (True, 50.0, 13.0)):
        rows.append(
            {
                "tags.model": "m",
                "tags.scenario": "train",
                "tags.task": "t",
                "tags.status": "ok",
                "params.seq_len": 128,
                R.CKPT: ckpt,
                "metrics.train/peak_mem_mb": mem,
                "metrics.train/step_ms": step,
            }
        )
    eff = R.checkpointing_effect(pd.DataFrame(rows))
    assert len(eff) == 1
    assert eff["mem_saved_pct"].iloc[0] == pytest.approx(75.0)
    assert eff["time_added_pct"].iloc[0] == pytest.approx(30.0)


def test_memory_budget_sources():
    rows = pd.DataFrame(
        [{"tags.model": "m", "tags.device": "cuda", "tags.status": "ok", "params.seq_len": 1}]
    )
    line = R.Line("m", {}, rows, exact=True)
    assert R.memory_budget_mb(line, 2.0)[0] == 2048
    budget, why = R.memory_budget_mb(line, None)
    assert budget is None and "--budget-gb" in why  # no silent guess for an accelerator
    line.rows = rows.assign(**{"params.device_memory_gb": 80.0})
    assert R.memory_budget_mb(line, None)[0] == 80 * 1024
    line.rows = rows.assign(**{"tags.device": "cpu"})
    assert R.memory_budget_mb(line, None)[0] > 0  # total RAM of this machine


# ----------------------------------------------------------------------------- from a store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return F.build_fixture_store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def built(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    path = R.build_report(
        store.experiment, store.sweep_id, out, budget_gb=1.0, tracking_uri=store.uri
    )
    return (
        path,
        (path / "report.md").read_text(encoding="utf-8"),
        (path / "report.html").read_text(encoding="utf-8"),
    )


def _section(md: str, number: int) -> str:
    return md.split(f"## {number}.")[1].split("\n## ")[0]


def _row(section: str, *starts: str) -> str:
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[: len(starts)] == list(starts):
            return line
    raise AssertionError(f"no row starting {starts} in:\n{section}")


def test_sweep_selection(store):
    t = R.load_runs(store.experiment, store.sweep_id, store.uri)
    ids = set(t.frame["run_id"])
    assert len(t.frame) == store.sweep_cells
    assert store.reused_run_id in ids and store.parent_run_id not in ids
    assert t.frame.loc[t.frame["run_id"] == store.reused_run_id, "reused"].item()
    assert store.superseded_run_id not in ids  # belongs to the earlier sweep


def test_experiment_keeps_latest_per_config_hash(store):
    t = R.load_runs(store.experiment, None, store.uri)
    ids = set(t.frame["run_id"])
    assert len(t.frame) == store.experiment_cells
    assert store.superseded_run_id not in ids and store.parent_run_id not in ids
    assert t.frame["tags.config_hash"].is_unique
    v512 = t.frame[
        (t.frame["tags.model"] == "vanilla")
        & (t.frame["params.seq_len"] == 512)
        & (t.frame["tags.scenario"] == "kernel")
    ]
    assert v512["metrics.kernel/fwd_ms"].item() == pytest.approx(2e-6 * 512**2)
    assert any("superseded" in n for n in t.notes)


def test_fits_on_store_lines(store):
    lines = {
        ln.label: ln
        for ln in R.kernel_lines(R.load_runs(store.experiment, store.sweep_id, store.uri).frame)
    }
    assert set(lines) == set(F.KERNEL)
    for model, (exact, _, t_order, _, m_order) in F.KERNEL.items():
        ln = lines[model]
        assert ln.exact is exact
        assert ln.fit("kernel/fwd_ms").exponent == pytest.approx(t_order, abs=0.05)
        assert ln.fit("kernel/peak_mem_mb").exponent == pytest.approx(m_order, abs=0.05)
    # vanilla's 4096 ran out of memory: its fit stops at 2048
    assert lines["vanilla"].fit("kernel/fwd_ms").lengths == (512, 1024, 2048)


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
        "metrics.kernel/fwd_ms",
        "metrics.val/acc",
        "tags.status",
        "tags.backend",
        "tags.config_hash",
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
    assert "sdpa_flash, sdpa_math" in _row(sec, "xformers")
    assert "val/acc 0.95 ± 0.014 (2 seeds) at n = 128" in _row(sec, "vanilla")


def test_crossovers_in_report(built):
    _, md, _ = built
    sec = _section(md, 3)
    lv = _row(sec, "longformer", "vanilla")
    assert f"n ≈ {F.EXPECTED[('longformer', 'vanilla', 'fwd')]:,.0f}" in lv
    assert f"n ≈ {F.EXPECTED[('longformer', 'vanilla', 'mem')]:,.0f}" in lv
    assert f"n ≈ {F.EXPECTED[('longformer', 'xformers', 'fwd')]:,.0f}" in _row(
        sec, "longformer", "xformers"
    )
    pv = _row(sec, "performer", "vanilla")
    assert "not reached within the grid" in pv and "smaller at every n measured" in pv
    # ratios at the largest common length: vanilla ran out of memory at 4096, so 2048 there
    ratios = sec.split("Ratios at the largest length")[1]
    assert _row(ratios, "xformers", "vanilla").endswith(
        "| 2.00× faster (n = 2,048) | 2.00× faster (n = 2,048) | 16.4× smaller (n = 2,048) |"
    )
    assert "| 1.02× faster (n = 4,096) |" in _row(ratios, "longformer", "xformers")
    assert not any(line.startswith("| vanilla | xformers |") for line in ratios.splitlines())


def test_theory_section(built):
    _, md, _ = built
    sec = _section(md, 4)
    for figure in ("2.0·10⁸", "2.6·10⁵", "6.9·10¹⁰", "6.7·10⁷", "256×"):
        assert figure in sec, figure
    # a counted 0 (performer) and an absent count (xformers) both read "not counted"
    for model in ("performer", "xformers"):
        assert "not counted" in _row(sec, model, "1,024")
    assert "not counted" not in _row(sec, "vanilla", "1,024")
    assert "| 20.0% | 80.0% |" in _row(sec, "vanilla", "1,024")  # projection vs mixing share


def test_memory_wall_and_checkpointing(built):
    _, md, _ = built
    wall = _row(_section(md, 5), "vanilla")
    assert (
        f"predicted n ≈ {F.EXPECTED[('vanilla', 'wall_1gb')]:,.0f}" in wall
        and "--budget-gb" in wall
    )
    ck = md.split("### Gradient checkpointing")[1].split("\n## ")[0]
    assert "40.0%" in _row(ck, "vanilla") and "+30.0%" in _row(ck, "vanilla")
    assert "25.0%" in _row(ck, "longformer") and "+20.0%" in _row(ck, "longformer")


def test_pareto_in_report(built):
    _, md, _ = built
    sec = _section(md, 2)
    # mqar at n=128: xformers matches vanilla's accuracy for less time, longformer is cheapest
    assert (
        _row(sec, "mqar", "128", "full", "val/acc", "training time per token (µs)")
        .rstrip(" |")
        .endswith("longformer, xformers")
    )


def test_unknown_experiment(store):
    with pytest.raises(ValueError, match="no MLflow experiment"):
        R.load_runs("no-such-experiment", None, store.uri)
    with pytest.raises(ValueError, match="no runs with sweep_id"):
        R.load_runs(store.experiment, "no-such-sweep", store.uri)


def test_cli_arguments(monkeypatch, tmp_path, capsys):
    seen = {}
    monkeypatch.setattr(R, "build_report", lambda *a: seen.setdefault("args", a) and tmp_path)
    assert (
        R.main(["--experiment", "e", "--sweep", "s", "--out", str(tmp_path), "--budget-gb", "8"])
        == 0
    )
    assert seen["args"] == ("e", "s", tmp_path, 8.0, None)
    assert str(tmp_path) in capsys.readouterr().out


def test_failures_section_lists_ok_cells_without_forward_backward():
    cells = pd.DataFrame({
        "tags.status": ["ok", "ok", "oom"],
        "tags.model": ["vanilla", "xformers", "vanilla"],
        "tags.scenario": ["kernel"] * 3,
        "tags.task": ["mqar"] * 3,
        "params.seq_len": [65536, 65536, 131072],
        "params.backbone.dtype": ["bfloat16"] * 3,
        "tags.failure_reason": [None, None, "OutOfMemoryError: CUDA out of memory"],
        "tags.fwdbwd_skipped": ["out of memory in forward+backward: OutOfMemoryError: CUDA out of memory", None, None],
        "run_name": ["vanilla-n65536-kernel", "xformers-n65536-kernel", "vanilla-n131072-kernel"],
        "run_id": ["aaaaaaaa11", "bbbbbbbb22", "cccccccc33"],
    })
    doc = R.Doc()
    R._section_failures(doc, cells)
    md = doc.markdown()
    assert ("| vanilla | kernel | mqar | 131,072 | oom | OutOfMemoryError: CUDA out of memory |"
            " vanilla-n131072-kernel `cccccccc` |") in md
    assert "without a forward + backward figure" in md
    assert ("| vanilla | 65,536 | bfloat16 | out of memory in forward+backward: OutOfMemoryError: CUDA out of memory |"
            " vanilla-n65536-kernel `aaaaaaaa` |") in md
    assert "xformers-n65536" not in md


def test_provenance_when_no_cell_got_as_far_as_a_backend():
    # every cell failed before its mixer ran (e.g. a GPU grid on a machine without CUDA)
    cells = pd.DataFrame({"tags.status": ["error", "error"], "tags.model": ["ssm", "xformers"],
                          "tags.scenario": ["kernel", "kernel"], "tags.device": ["cpu", "cpu"]})
    doc = R.Doc()
    R._section_provenance(doc, cells)
    md = doc.markdown()
    assert "| ssm | not logged | — | — |" in md and "| xformers | not logged | — | — |" in md
    assert "| device | cpu |" in md
