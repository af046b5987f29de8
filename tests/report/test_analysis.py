"""The report's pure analysis (pipeline/report/analysis.py) against closed-form answers: power-law
fits, crossovers, ratios at the largest common length, the Pareto front, the seed figures.

    .venv/bin/pytest tests/report/test_analysis.py
"""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.report.analysis import (
    crossover,
    fit_power_law,
    pareto_front,
    ratio_at_largest,
    seed_figures,
)
from pipeline.report.format import sci

LENGTHS = np.array([256, 512, 1024, 2048, 4096, 8192])


@pytest.mark.parametrize("order", [1.0, 2.0])
def test_fit_recovers_exponent(order):
    fit = fit_power_law(LENGTHS, 3e-5 * LENGTHS**order)
    assert fit.exponent == pytest.approx(order, abs=0.05)
    assert fit.lengths == (2048, 4096, 8192)  # the 3 largest
    assert fit.predict(16384) == pytest.approx(3e-5 * 16384**order, rel=1e-6)


def test_fit_with_noise_overhead_and_repeats():
    rng = np.random.default_rng(0)
    # a constant overhead dominates short lengths: only the largest lengths show the n² law
    y = 5.0 + 1e-5 * LENGTHS**2.0
    n_rep = np.repeat(LENGTHS, 3)
    y_rep = np.repeat(y, 3) * rng.uniform(0.98, 1.02, size=len(n_rep))
    fit = fit_power_law(n_rep, y_rep)
    assert fit.exponent == pytest.approx(2.0, abs=0.1)
    assert fit_power_law(LENGTHS, y, largest=len(LENGTHS)).exponent < 1.8  # why the tail is used


def test_fit_ignores_missing_and_needs_two_lengths():
    y = 1e-3 * LENGTHS.astype(float)
    y[-1] = np.nan  # the largest length failed
    y[-2] = 0.0  # a broken measurement
    fit = fit_power_law(LENGTHS, y)
    assert fit.lengths == (512, 1024, 2048)
    assert fit.exponent == pytest.approx(1.0, abs=1e-9)
    assert fit_power_law([1024], [3.0]) is None
    assert fit_power_law([1024, 1024], [3.0, 3.1]) is None


@pytest.mark.parametrize("k,c", [(4e-3, 2e-6), (0.05, 1e-6), (1.0, 7e-4)])
def test_crossover_of_power_laws_is_exact(k, c):
    """k·n meets c·n² at n = k/c; straight lines in log-log, so interpolation is exact."""
    n = 2.0 ** np.arange(6, 17)
    co = crossover(n, k * n, c * n**2)
    assert co.verdict == "crosses"
    assert co.n == pytest.approx(k / c, rel=1e-9)
    assert co.lengths[0] == 64 and co.lengths[-1] == 65536


def test_crossover_between_other_exponents():
    n = 2.0 ** np.arange(8, 15)
    # a·n^1.5 vs b·n^2 cross at (a/b)^2
    co = crossover(n, 0.3 * n**1.5, 0.01 * n**2)
    assert co.n == pytest.approx((0.3 / 0.01) ** 2, rel=1e-9)


def test_crossover_verdicts():
    n = np.array([512, 1024, 2048])
    assert crossover(n, n * 1.0, n * 2.0).verdict == "below at every n"
    assert "faster at every n measured" in crossover(n, n * 1.0, n * 2.0).describe("faster")
    never = crossover(n, 10.0 * n, 1e-3 * n**2)  # crossing at 10,000: beyond the grid
    assert never.verdict == "not reached" and never.n is None
    assert "not reached within the grid" in never.describe()
    assert crossover([], [], []).verdict == "no common lengths"
    # faster in the middle but slower again at the largest n: the last sign change counts
    mid = crossover([256, 512, 1024, 2048], [2, 1, 1, 4], [1, 2, 2, 2])
    assert mid.verdict == "not reached"


def test_ratio_at_largest_common_length():
    r = ratio_at_largest([256, 512, 1024], [1.0, 2.0, 4.0], [256, 512], [4.0, 10.0])
    assert (r.n, r.value) == (512, 5.0) and r.describe() == "5.00× faster (n = 512)"
    slow = ratio_at_largest([512], [40.0], [512], [2.0])
    assert slow.describe("smaller", "larger") == "20.0× larger (n = 512)"
    # a missing, zero or NaN value at a length does not count as measured there
    r = ratio_at_largest([256, 512], [1.0, float("nan")], [256, 512], [3.0, 3.0])
    assert (r.n, r.value) == (256, 3.0)
    assert (
        ratio_at_largest([256], [1.0], [512], [1.0]).describe()
        == "no common length that both ran ok"
    )


def test_pareto_front():
    cost = [1.0, 2.0, 3.0, 2.5, 4.0]
    acc = [0.5, 0.8, 0.9, 0.7, 0.9]
    # (2.5, 0.7) is beaten by (2.0, 0.8); (4.0, 0.9) by (3.0, 0.9)
    assert pareto_front(cost, acc, higher_is_better=True).tolist() == [True, True, True, False, False]
    err = [0.5, 0.2, 0.1, 0.3, 0.1]
    assert pareto_front(cost, err, higher_is_better=False).tolist() == [True, True, True, False, False]
    # a point with no cost takes no part
    assert pareto_front([1.0, np.nan], [0.1, 0.9]).tolist() == [True, False]


def test_seed_figures_are_computed():
    s = seed_figures()
    (a, b) = s["rows"]
    assert (a["n"], a["d"], b["n"], b["d"]) == (512, 768, 8192, 1024)
    assert sci(a["score_macs"]) == "2.0·10⁸" and sci(a["score_entries"]) == "2.6·10⁵"
    assert sci(b["score_macs"]) == "6.9·10¹⁰" and sci(b["score_entries"]) == "6.7·10⁷"
    assert s["length_factor"] == 16 and s["work_factor"] == 256
