"""The two-term fit of the report's Answer section (pipeline/report/theory.py, answer.py) on
synthetic stores with known answers: kernel times t = a·n²·D + b·n·D² + c and peaks
m = p·H·n² + q·n·D + r, noise-free and with 5 % noise, cells missing, and fits refused with a
one-line reason the report prints.

    .venv/bin/pytest tests/report/test_theory.py
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline import record as R
from pipeline.report import build_report
from pipeline.report.answer import HOLDS, MIB, section_answer
from pipeline.report.document import Doc
from pipeline.report.load import load_runs
from pipeline.report.theory import (
    Refusal,
    analyse,
    fit_memory,
    fit_time,
    held_out,
    nnls,
    theory_groups,
)
from tests.report.conftest import EXPERIMENT, _Writer

LENGTHS = (128, 256, 512, 1024, 2048, 4096, 8192)
WIDTHS = (64, 128, 256, 512, 1024)
HEADS_AT_512 = (1, 2, 4, 8, 16)
HEAD_LENGTHS = (1024, 2048, 4096)
# score term at 50 GFLOP/s of useful causal FLOPs (2 per unit of n²·D), projections at 100 GFLOP/s
# (8 per unit of n·D²): a = 2 / 50e6, b = 8 / 100e6 ms per unit; n* = (b/a)·D = 2·D
A, B_, C = 4e-8, 8e-8, 0.05
# memory in bytes: vanilla keeps 3 fp32 score tensors (12 B per entry), xformers none
MEM = {"vanilla": (12.0, 16.0, 2.0 * MIB), "xformers": (0.0, 24.0, 2.0 * MIB)}
SKIPPED = ("vanilla", 8192, 1024)  # pre-flight's skip: the fits use what ran
SKIP_REASON = "predicted peak 12.02 GiB exceeds the memory budget 10.00 GiB"


def _time(n, D):
    return A * n * n * D + B_ * n * D * D + C


def _noise(rng, scale):
    return 1.0 + scale * rng.uniform(-1, 1) if scale else 1.0


def write_theory_store(root, noise: float = 0.0, seed: int = 0) -> str:
    """vanilla and xformers over LENGTHS x WIDTHS (head dim 64), heads at D = 512, the seed cell
    n = 512, D = 768; performer with two cells only (its fit is refused)."""
    uri = f"sqlite:///{root / 'theory.db'}"
    w, rng, i = _Writer(uri), np.random.default_rng(seed), 0

    def cell(model, n, D, H, status="ok", metrics=None, reason=""):
        nonlocal i
        i += 1
        exact, mat = model != "performer", model == "vanilla"
        tags = {R.MODEL: model, R.SCENARIO: "kernel", R.TASK: "mqar", R.STATUS: status, R.DEVICE: "cpu",
                R.EXACT: exact, R.MATERIALISES_SCORES: mat, R.CONFIG_HASH: f"h{i}"}
        if reason:
            tags[R.FAILURE_REASON] = reason
        params = {R.SEQ_LEN: n, R.BATCH_SIZE: 1, R.D_MODEL: D, R.N_HEADS: H, R.DTYPE: "float32",
                  R.CAUSAL: True, "model.name": model, "scenario.name": "kernel", R.KERNEL_FWDBWD: False}
        w.run(f"{model}-n{n}-kernel", tags, params, metrics or {})

    def measured(model, n, D, H):
        score, proj = A * n * n * D * _noise(rng, noise), B_ * n * D * D * _noise(rng, noise)
        fwd = score + proj + C
        p, q, r = MEM.get(model, (0.0, 8.0, MIB))
        m = {R.KERNEL_FWD_MS: fwd, R.KERNEL_PROJ_MS: proj + C / 2,
             R.KERNEL_PEAK_MEM_MB: (p * H * n * n + q * n * D + r) / MIB * _noise(rng, noise)}
        if fwd - m[R.KERNEL_PROJ_MS] > 0.05 * fwd:  # as the kernel scenario logs it
            m[R.KERNEL_MIX_MS] = fwd - m[R.KERNEL_PROJ_MS]
        return m

    for model in ("vanilla", "xformers"):
        for D in WIDTHS:
            for n in LENGTHS:
                if (model, n, D) == SKIPPED:
                    cell(model, n, D, D // 64, "skipped", reason=SKIP_REASON)
                else:
                    cell(model, n, D, D // 64, metrics=measured(model, n, D, D // 64))
        for H in HEADS_AT_512:
            for n in HEAD_LENGTHS:
                if H != 512 // 64:
                    cell(model, n, 512, H, metrics=measured(model, n, 512, H))
        cell(model, 512, 768, 12, metrics=measured(model, 512, 768, 12))
    for n, D in ((1024, 64), (1024, 256)):
        cell("performer", n, D, D // 64, metrics=measured("performer", n, D, D // 64))
    return uri


@pytest.fixture(scope="module")
def clean_uri(tmp_path_factory):
    return write_theory_store(tmp_path_factory.mktemp("theory"))


@pytest.fixture(scope="module")
def noisy_uri(tmp_path_factory):
    return write_theory_store(tmp_path_factory.mktemp("theory_noisy"), noise=0.05, seed=1)


def _analyses(uri):
    frame = load_runs(EXPERIMENT, None, uri).frame
    return {an.line.model: an for an in map(analyse, theory_groups(frame))}


@pytest.fixture(scope="module")
def report(clean_uri, tmp_path_factory):
    out = build_report(EXPERIMENT, None, tmp_path_factory.mktemp("report"), tracking_uri=clean_uri)
    md = (out / "report.md").read_text(encoding="utf-8")
    return out, md.split("\n## The answer")[1].split("\n## ")[0]


# ----------------------------------------------------------------------------- pure fits
def _grid(lengths=LENGTHS, widths=WIDTHS):
    n, D = np.meshgrid(np.array(lengths, float), np.array(widths, float))
    return n.ravel(), D.ravel()


def test_nnls_is_exact_on_small_problems():
    rng = np.random.default_rng(3)
    for _ in range(50):
        X, y = rng.normal(size=(12, 3)), rng.normal(size=12)
        x = nnls(X, y)
        assert np.all(x >= 0)
        res = np.sum((X @ x - y) ** 2)
        for _ in range(200):  # no feasible point does better
            z = np.abs(x + rng.normal(scale=0.3, size=3)) * rng.integers(0, 2, size=3)
            assert res <= np.sum((X @ z - y) ** 2) + 1e-9
    opt = pytest.importorskip("scipy.optimize")
    X, y = rng.normal(size=(20, 3)), rng.normal(size=20)
    np.testing.assert_allclose(nnls(X, y), opt.nnls(X, y)[0], atol=1e-9)


def test_fit_time_recovers_closed_form():
    n, D = _grid()
    fit = fit_time(n, D, 1, _time(n, D), causal=True)
    assert fit.a == pytest.approx(A, rel=1e-9) and fit.b == pytest.approx(B_, rel=1e-9)
    assert fit.c == pytest.approx(C, rel=1e-6)
    assert fit.score_gflops() == pytest.approx(50.0) and fit.proj_gflops() == pytest.approx(100.0)
    assert fit.crossover_n(256) == pytest.approx(512.0)
    assert fit.r2 == pytest.approx(1.0) and fit.worst < 1e-9
    bidirectional = fit_time(n, D, 1, _time(n, D), causal=False)
    assert bidirectional.score_gflops() == pytest.approx(100.0)  # twice the useful FLOPs


def test_fit_time_with_5_percent_noise():
    rng = np.random.default_rng(7)
    n, D = _grid()
    t = np.array([_time(a, d) * (1 + 0.05 * rng.uniform(-1, 1)) for a, d in zip(n, D)])
    fit = fit_time(n, D, 1, t)
    assert fit.a == pytest.approx(A, rel=0.05) and fit.b == pytest.approx(B_, rel=0.05)
    assert fit.c == pytest.approx(C, rel=0.15)
    assert fit.worst < 0.12 and fit.r2 > 0.99


def test_fit_tolerates_missing_cells():
    n, D = _grid()
    keep = np.random.default_rng(0).permutation(len(n))[: len(n) // 3]  # two thirds missing
    fit = fit_time(n[keep], D[keep], 1, _time(n[keep], D[keep]))
    assert fit.cells == len(keep)
    assert (fit.a, fit.b, fit.c) == pytest.approx((A, B_, C), rel=1e-6)


def test_fit_refuses_fewer_points_than_parameters():
    got = fit_time([128, 256], [64, 64], 1, [1.0, 2.0])
    assert isinstance(got, Refusal)
    assert got.reason == "2 cell(s) for 3 parameters: the fit needs at least 3"
    assert "\n" not in got.reason
    assert isinstance(fit_memory([128], [64], [1], 1, [3.0]), Refusal)
    one_point_thrice = fit_time([256] * 3, [64] * 3, 1, [1.0, 1.1, 0.9])
    assert isinstance(one_point_thrice, Refusal) and "cannot tell the 3 terms apart" in one_point_thrice.reason


def test_fit_memory_recovers_p_q_r_and_p_zero():
    n, D = _grid()
    H = D / 64
    for p, q, r in MEM.values():
        fit = fit_memory(n, D, H, 1, (p * H * n * n + q * n * D + r) / MIB)
        assert fit.p * MIB == pytest.approx(p, abs=1e-9) and fit.q * MIB == pytest.approx(q, rel=1e-6)
        assert fit.r * MIB == pytest.approx(r, rel=1e-4)
    assert fit.p == 0.0 and fit.n2_share(8192, 1024, 16) == 0.0  # xformers: exactly no n² term


def test_held_out_predicts_the_largest_length():
    n, D = _grid()
    h = held_out(n, D, 1, _time(n, D))
    assert h.n == max(LENGTHS) and len(h.errors) == len(WIDTHS) and h.worst < 1e-6
    few = held_out(np.array([128.0, 256.0, 512.0]), np.array([64.0] * 3), 1, np.ones(3))
    assert isinstance(few, Refusal) and few.reason.startswith("without n = 512: 2 cell(s)")


# ----------------------------------------------------------------------------- from a store
def test_groups_span_widths_and_heads(clean_uri):
    ans = _analyses(clean_uri)
    assert set(ans) == {"vanilla", "xformers", "performer"}
    van = ans["vanilla"]
    assert van.head_dim == 64 and set(van.cells["H"]) == set(HEADS_AT_512) | {12}
    assert len(van.fit_cells) == len(LENGTHS) * len(WIDTHS) - 1 + 1  # one skipped, the seed cell in
    assert (8192, 1024) not in set(zip(van.fit_cells["n"], van.fit_cells["D"]))


@pytest.mark.parametrize("store,rel", [("clean_uri", 1e-6), ("noisy_uri", 0.06)])
def test_store_fit_recovers_known_a_b_c(store, rel, request):
    ans = _analyses(request.getfixturevalue(store))
    for model in ("vanilla", "xformers"):
        fit = ans[model].time
        assert fit.a == pytest.approx(A, rel=rel) and fit.b == pytest.approx(B_, rel=rel), model
        assert fit.c == pytest.approx(C, rel=max(rel, 1e-4) * 3), model
        p, q, _ = MEM[model]
        mem = ans[model].memory
        assert mem.q * MIB == pytest.approx(q, rel=max(rel, 1e-4) * 2)
        assert mem.p * MIB == pytest.approx(p, rel=rel * 2, abs=0.5 if rel > 1e-3 else 1e-6)
    assert isinstance(ans["performer"].time, Refusal)


def test_answer_section_verdicts(report):
    out, sec = report
    rows = [ln for ln in sec.splitlines() if ln.startswith("| ") and " | xformers | " in ln]
    assert len(rows) == 8
    for row in rows:
        assert f"| {HOLDS} |" in row, row
    ns = np.array(HEAD_LENGTHS, float)
    slope = np.polyfit(np.log(ns), np.log(_time(ns, 512)), 1)[0]  # the same at every H
    assert f"exponents in n {slope:.2f}…{slope:.2f}" in sec and "spread 1.00×" in sec
    assert "memory O(n): p ≈ 0" in sec and "memory O(n²): the score matrix materialised" in sec
    assert (out / "theory_two_term.png").stat().st_size > 0


def test_answer_section_numbers(report):
    _, sec = report
    fits = sec.split("### The two-term fit")[1].split("\n### ")[0]
    # exact cells: the bootstrap intervals close on the fitted values
    assert "| xformers | 36 (d_k = 64) | 50 [50, 50] | 100 [100, 100] | 0.05 | 1.0000 |" in fits
    assert "| performer | 2 (d_k = 64) | no fit: 2 cell(s) for 3 parameters: the fit needs at least 3 |" in fits
    cross = sec.split("### Where the two terms cross")[1].split("\n### ")[0]
    assert "| vanilla | 256 | n* ≈ 512 [512, 512] |" in cross
    seeds = sec.split("### The two worked configurations")[1]
    assert "| vanilla | 512 | 768 | 2.0·10⁸ | 1.2·10⁹ | ok |" in seeds
    assert f"| vanilla | 8,192 | 1,024 | 6.9·10¹⁰ | 3.4·10¹⁰ | skipped: {SKIP_REASON} |" in seeds
    mem = sec.split("### Memory")[1].split("\n### ")[0]
    assert "| vanilla | 12 | 16 |" in mem and "| xformers | 0 | 24 |" in mem


def test_vanilla_seed_claim_not_measured_when_skipped(report):
    _, sec = report
    row = next(ln for ln in sec.splitlines() if ln.startswith("| the worked configurations") and "| vanilla |" in ln)
    assert "| not measured |" in row and "skipped" in row


def test_no_section_at_one_width(store, tmp_path):
    """The main fixture store has kernel cells at one width only: no Answer section."""
    frame = load_runs(store.experiment, store.sweep_id, store.uri).frame
    assert theory_groups(frame) == []
    doc = Doc()
    section_answer(doc, frame, {}, tmp_path)
    assert doc.blocks == []


# ----------------------------------------------------------------------------- verdicts with CIs
def test_interval_verdicts_have_three_outcomes():
    from pipeline.report.verdicts import FAILS, INCONCLUSIVE, combine_verdicts, interval_verdict

    assert interval_verdict(1.9, 2.0, 1.85, 2.15) == HOLDS
    assert interval_verdict(1.2, 1.4, 1.85, 2.15) == FAILS
    assert interval_verdict(1.8, 1.9, 1.85, 2.15) == INCONCLUSIVE
    assert combine_verdicts([HOLDS, HOLDS]) == HOLDS
    assert combine_verdicts([HOLDS, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine_verdicts([INCONCLUSIVE, FAILS]) == FAILS


def _analysis_from(cells: pd.DataFrame):
    from pipeline.report.theory import Analysis, fit_time

    cells = cells.assign(B=1.0, hd=cells["D"] / cells["H"])
    f = cells[cells["H"] == cells["H"].min()]
    return Analysis(line=None, cells=cells, head_dim=float(f["hd"].iloc[0]),
                    time=fit_time(f["n"], f["D"], 1, f["fwd"]), memory=None, held=None, causal=True)


def _cells(rel_ci: float, heads=(1,), slope_per_h=None):
    rows = []
    for H in heads:
        for D in (256, 512):
            for n in (1024, 2048, 4096, 8192):
                t = _time(n, D) * (1 if slope_per_h is None else (n / 1024) ** slope_per_h.get(H, 0))
                rows.append({"n": float(n), "D": float(D), "H": float(H), "fwd": t,
                             "fwd_lo": t * (1 - rel_ci), "fwd_hi": t * (1 + rel_ci)})
    return pd.DataFrame(rows)


def test_growth_claim_on_exponents_with_cis():
    from pipeline.report.answer import claim_growth
    from pipeline.report.verdicts import INCONCLUSIVE

    verdict, text = claim_growth(_analysis_from(_cells(0.01)))
    assert verdict == HOLDS and "exponent 1." in text and "[" in text  # the CI is shown
    # medians known only to ±60 %: the exponent's CI is too wide to say
    verdict, _ = claim_growth(_analysis_from(_cells(0.6)))
    assert verdict == INCONCLUSIVE


def test_heads_claim_compares_exponents_with_their_cis():
    from pipeline.report.answer import claim_heads
    from pipeline.report.verdicts import FAILS, INCONCLUSIVE

    same = _analysis_from(_cells(0.01, heads=(1, 4)))
    verdict, text = claim_heads(same)
    assert verdict == HOLDS and "H = 1: " in text and "what heads change" in text
    apart = _analysis_from(_cells(0.01, heads=(1, 4), slope_per_h={4: 0.6}))
    assert claim_heads(apart)[0] == FAILS
    wide = _analysis_from(_cells(0.5, heads=(1, 4), slope_per_h={4: 0.2}))
    assert claim_heads(wide)[0] == INCONCLUSIVE


def test_two_term_intervals_cover_the_truth_and_widen_with_the_cells_cis():
    from pipeline.report.theory import fit_time_intervals

    rng = np.random.default_rng(11)
    n, D = _grid()
    t = _time(n, D) * np.exp(rng.normal(0, 0.03, len(n)))
    narrow = fit_time_intervals(n, D, 1, t, t * 0.99, t * 1.01)
    wide = fit_time_intervals(n, D, 1, t, t * 0.8, t * 1.2)
    for iv in (narrow, wide):
        assert iv.a[0] <= A <= iv.a[1] and iv.b[0] <= B_ <= iv.b[1]
    assert wide.a[1] - wide.a[0] > narrow.a[1] - narrow.a[0]
    lo, hi = narrow.crossover_n(256)
    assert lo <= B_ / A * 256 <= hi
    assert fit_time_intervals(n[:4], D[:4], 1, t[:4]) is None  # under 6 cells: no interval


def test_cell_medians_span_the_rounds_of_a_cell():
    """Two rounds of one cell: the figure is their median and the interval spans both rounds'
    CIs (the run-to-run spread reaches the fits); a cell run once keeps its own CI."""
    from pipeline.report.lines import SEQ_LEN, STATUS, Line
    from pipeline.report.theory import B_COL, D_COL, H_COL, cell_medians

    lo, hi = (R.col(m) for m in R.ci_names(R.KERNEL_FWD_MS))
    rows = pd.DataFrame({SEQ_LEN: [1024, 1024, 2048], D_COL: 64, H_COL: 1, B_COL: 1, STATUS: "ok",
                         R.col(R.KERNEL_FWD_MS): [10.0, 11.0, 40.0], lo: [9.9, 10.8, 39.0],
                         hi: [10.1, 11.3, 41.0]})
    got = cell_medians(Line("vanilla", {}, rows, True)).set_index("n")
    assert got.loc[1024, "fwd"] == pytest.approx(10.5)
    assert (got.loc[1024, "fwd_lo"], got.loc[1024, "fwd_hi"]) == (9.9, 11.3)
    assert (got.loc[2048, "fwd_lo"], got.loc[2048, "fwd_hi"]) == (39.0, 41.0)


@pytest.mark.parametrize("proj_share,rel_ci,want", [(0.40, 0.01, "holds"), (0.40, 0.25, "inconclusive"),
                                                    (0.70, 0.01, "does not hold here")])
def test_share_claim_judges_the_interval_of_the_share(proj_share, rel_ci, want):
    """The mixing's share at n = 8·D from the forward's and the projections' CIs: inside the
    criterion holds, straddling 50 % is inconclusive, wholly below does not hold."""
    from pipeline.report.answer import claim_share

    cells = _cells(rel_ci)
    cells = cells.assign(proj=cells["fwd"] * proj_share, mix=cells["fwd"] * (1 - proj_share),
                         proj_lo=cells["fwd"] * proj_share * (1 - rel_ci),
                         proj_hi=cells["fwd"] * proj_share * (1 + rel_ci))
    verdict, text = claim_share(_analysis_from(cells), 8, "mix", "n = 8·D")
    assert verdict == want and "D = 256, n = 2,048: " in text and "[" in text
