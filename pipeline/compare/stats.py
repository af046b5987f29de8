"""The comparison's statistics (pipeline/compare): its constants, the tests and the verdict rule
(a median's σ in log from its 95 % CI is pipeline/stability.py log_sigma).

    judge(ratio, ci_lo, ci_hi, p, threshold=0.05, alpha=0.05)   # slower, faster or same
"""
from __future__ import annotations

import math
from collections.abc import Sequence

THRESHOLD = 0.05    # changes inside ±5 % are `same` (criterion.rs' noise threshold)
ALPHA = 0.05        # significance level of the test
RUN_NOISE = 0.02    # σ of log(median) between two runs of one cell, when no rounds measure it
DRIFT = 0.035       # σ of a whole sweep's shift: back-to-back sweeps' median ratios 1.009, 1.038, 0.951 here
NU0 = 4             # degrees of freedom the pooled σ_run weighs against a cell's own rounds
MEM_FLOOR_MB = 2.0  # peak-memory changes under 2 MiB are `same`: RSS moves in 2 MiB transparent huge pages
QUALITY_FLOOR = 1e-3  # quality changes under 0.001 (nats of loss, or relative error) are `same`
VERDICTS = ("slower", "faster", "same", "unstable", "missing")


def mann_whitney_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p of the Mann-Whitney U test; NaN below 2 calls a side."""
    if len(a) < 2 or len(b) < 2:
        return math.nan
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(a, b, alternative="two-sided").pvalue)


def z_p(log_ratio: float, sigma: float) -> float:
    """Two-sided p of log_ratio against 0 with standard error sigma."""
    if not sigma > 0:
        return math.nan
    return math.erfc(abs(log_ratio) / sigma / math.sqrt(2))


def judge(ratio: float, lo: float, hi: float, p: float, threshold: float, alpha: float) -> str:
    """slower / faster: significant and the whole CI beyond ±threshold (in log: 1/(1+t) on the
    faster side); same otherwise. Without a test (p NaN) the interval alone decides."""
    significant = p < alpha if math.isfinite(p) else True
    if significant and lo > 1 + threshold:
        return "slower"
    if significant and hi < 1 / (1 + threshold):
        return "faster"
    return "same"
