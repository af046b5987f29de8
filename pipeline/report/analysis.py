"""Pure analysis, arrays in and numbers out: power-law fits over the largest lengths, where one
curve crosses below another, ratios at the largest common length, the Pareto front of cost
against quality, and the seed's worked figures. No pandas, MLflow or matplotlib here.

    fit_power_law(n, ms).exponent; crossover(n, cand, ref).n; ratio_at_largest(n, c, n, r).value
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.report.format import span
from pipeline.stability import Z95

FIT_POINTS = 3  # exponents are fitted over this many of the largest lengths that ran ok


BOOTSTRAP_DRAWS = 2000


@dataclass(frozen=True)
class PowerFit:
    """y ≈ prefactor · n^exponent, fitted in log-log space over `lengths`; `ci` is the exponent's
    95 % interval where the values carried CIs of their own (None otherwise)."""

    exponent: float
    prefactor: float
    lengths: tuple[int, ...]
    ci: tuple[float, float] | None = None

    def describe(self) -> str:
        """`1.93 [1.88, 1.98]`, or `1.93` without a CI."""
        return f"{self.exponent:.2f}" + (f" [{self.ci[0]:.2f}, {self.ci[1]:.2f}]" if self.ci else "")

    def predict(self, n: float) -> float:
        return self.prefactor * n**self.exponent

    def solve(self, y: float) -> float:
        """The n at which the fitted curve reaches y."""
        return (y / self.prefactor) ** (1.0 / self.exponent)


def median_per_n(n: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distinct lengths (sorted) and the median of the finite, positive values at each."""
    n_arr, y_arr = np.asarray(n, dtype=float), np.asarray(y, dtype=float)
    good = np.isfinite(n_arr) & np.isfinite(y_arr) & (y_arr > 0) & (n_arr > 0)
    n_arr, y_arr = n_arr[good], y_arr[good]
    lengths = np.unique(n_arr)
    return lengths, np.array([np.median(y_arr[n_arr == v]) for v in lengths])


def fit_power_law(n: Sequence[float], y: Sequence[float], largest: int = FIT_POINTS,
                  lo: Sequence[float] | None = None, hi: Sequence[float] | None = None) -> PowerFit | None:
    """Least-squares line through (log n, log y) over the `largest` distinct lengths with a
    finite positive value (repeats at one length -> their median). None below 2 lengths.

    With `lo` and `hi`, each value's 95 % CI (a timed median's), the exponent gets a 95 % CI by
    a parametric bootstrap: every draw moves each length's value within its own uncertainty (log
    normal, σ = log(hi/lo) / 3.92) and refits; the interval is the draws' 2.5th-97.5th
    percentiles. Resampling the lengths themselves would mean little over 3 points; this is the
    uncertainty the measurement leaves, not how well a power law describes the curve. Where a
    length has repeats (rounds in separate processes), the standard error of their mean log
    stands in for the CI when it is the larger: it carries the run-to-run variance."""
    lengths, values = median_per_n(n, y)
    lengths, values = lengths[-largest:], values[-largest:]
    if len(lengths) < 2:
        return None
    x = np.log(lengths)
    slope, intercept = np.polyfit(x, np.log(values), 1)
    ci = None
    if lo is not None and hi is not None:
        sigma = _log_sigma_per_n(n, y, lo, hi, lengths)
        if sigma is not None:
            rng = np.random.default_rng(0)
            draws = np.log(values)[None, :] + rng.standard_normal((BOOTSTRAP_DRAWS, len(x))) * sigma[None, :]
            xc = x - x.mean()
            slopes = (draws - draws.mean(axis=1, keepdims=True)) @ xc / (xc @ xc)
            ci = (float(np.percentile(slopes, 2.5)), float(np.percentile(slopes, 97.5)))
    return PowerFit(float(slope), float(np.exp(intercept)), tuple(int(v) for v in lengths), ci)


def _log_sigma_per_n(n, y, lo, hi, lengths) -> np.ndarray | None:
    """Each length's σ of log(value) from its cells' CIs (the median over repeats); None when a
    length has no usable CI."""
    n_a, y_a = np.asarray(n, dtype=float), np.asarray(y, dtype=float)
    lo_a, hi_a = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
    good = np.isfinite(lo_a) & np.isfinite(hi_a) & (lo_a > 0) & (hi_a >= lo_a) & np.isfinite(y_a) & (y_a > 0)
    out = []
    for v in lengths:
        at = good & (n_a == v)
        if not at.any():
            return None
        sigma = float(np.median(np.log(hi_a[at] / lo_a[at]))) / (2 * Z95)
        if at.sum() >= 2:  # repeats (rounds, seeds): their spread is run-to-run variance, usually the larger
            sigma = max(sigma, float(np.std(np.log(y_a[at]), ddof=1)) / np.sqrt(at.sum()))
        out.append(sigma)
    return np.array(out)


@dataclass(frozen=True)
class Crossover:
    """Where a candidate curve drops below a reference curve (both measured at common n)."""

    n: float | None  # interpolated crossing length, when there is one
    verdict: str  # "crosses", "below at every n", "not reached", "no common lengths"
    lengths: tuple[int, ...] = ()

    def describe(self, below: str = "faster") -> str:
        if self.verdict == "crosses":
            return f"n ≈ {self.n:,.0f}"
        if self.verdict == "below at every n":
            return f"{below} at every n measured ({span(self.lengths)})"
        if self.verdict == "not reached":
            return f"not reached within the grid ({span(self.lengths)})"
        return "no common lengths that both ran ok"


def crossover(n: Sequence[float], candidate: Sequence[float], reference: Sequence[float]) -> Crossover:
    """The length beyond which `candidate` stays below `reference`, interpolated linearly in
    log-log space between the two measured lengths around the last sign change (a power law
    is a straight line there, so two power laws cross exactly where the interpolation says)."""
    n_arr = np.asarray(n, dtype=float)
    c, r = np.asarray(candidate, dtype=float), np.asarray(reference, dtype=float)
    good = np.isfinite(n_arr) & np.isfinite(c) & np.isfinite(r) & (c > 0) & (r > 0) & (n_arr > 0)
    order = np.argsort(n_arr[good])
    n_arr, diff = n_arr[good][order], (np.log(c[good]) - np.log(r[good]))[order]
    lengths = tuple(int(v) for v in n_arr)
    if len(n_arr) == 0:
        return Crossover(None, "no common lengths")
    if np.all(diff < 0):
        return Crossover(None, "below at every n", lengths)
    last_above = int(np.nonzero(diff >= 0)[0][-1])
    if last_above == len(n_arr) - 1:
        return Crossover(None, "not reached", lengths)
    x0, x1 = np.log(n_arr[last_above]), np.log(n_arr[last_above + 1])
    d0, d1 = diff[last_above], diff[last_above + 1]
    x = x0 + (0.0 - d0) * (x1 - x0) / (d1 - d0)
    return Crossover(float(np.exp(x)), "crosses", lengths)


@dataclass(frozen=True)
class Ratio:
    """reference / candidate at the largest length where both have a positive value."""

    n: int | None
    value: float | None

    def describe(self, more: str = "faster", less: str = "slower") -> str:
        if self.value is None or self.n is None:
            return "no common length that both ran ok"
        word, x = (more, self.value) if self.value >= 1 else (less, 1.0 / self.value)
        digits = 2 if x < 10 else 1 if x < 100 else 0
        return f"{x:,.{digits}f}× {word} (n = {self.n:,})"


def ratio_at_largest(n_cand: Sequence[float], cand: Sequence[float],
                     n_ref: Sequence[float], ref: Sequence[float]) -> Ratio:
    """ref / cand at the largest length both series hold with a finite positive value (so a
    quantity where smaller is better reads as "x times better" when the ratio is above 1)."""
    def usable(n, y):
        n_a, y_a = np.asarray(n, dtype=float), np.asarray(y, dtype=float)
        keep = np.isfinite(n_a) & np.isfinite(y_a) & (y_a > 0)
        return dict(zip(n_a[keep].astype(int), y_a[keep]))

    c, r = usable(n_cand, cand), usable(n_ref, ref)
    common = sorted(set(c) & set(r))
    if not common:
        return Ratio(None, None)
    n = common[-1]
    return Ratio(int(n), float(r[n] / c[n]))


def pareto_front(cost: Sequence[float], quality: Sequence[float], higher_is_better: bool = True) -> np.ndarray:
    """Boolean mask of the points no other point beats: one is dominated when another costs no
    more and is no worse, and is strictly better in at least one of the two."""
    cost_a = np.asarray(cost, dtype=float)
    q = np.asarray(quality, dtype=float) * (1.0 if higher_is_better else -1.0)
    front = np.zeros(len(cost_a), dtype=bool)
    for i in range(len(cost_a)):
        if not (np.isfinite(cost_a[i]) and np.isfinite(q[i])):
            continue
        dominated = (cost_a <= cost_a[i]) & (q >= q[i]) & ((cost_a < cost_a[i]) | (q > q[i]))
        front[i] = not np.any(dominated & np.isfinite(cost_a) & np.isfinite(q))
    return front


def within_tolerance(quality: Sequence[float], reference: float, tol: float, higher_is_better: bool = True,
                     absolute: bool = False) -> np.ndarray:
    """Boolean mask of the qualities within `tol` of `reference`: a fraction of |reference|
    (higher is better: q >= ref - tol·|ref|; lower: q <= ref + tol·|ref|), or, when `absolute`
    (a metric that is itself an error relative to the exact output), q <= tol. NaN never is."""
    q = np.asarray(quality, dtype=float)
    if absolute:
        return np.isfinite(q) & (q <= tol)
    slack = tol * abs(reference)
    ok = q >= reference - slack if higher_is_better else q <= reference + slack
    return np.isfinite(q) & ok


def cheapest_below_exact(cost: Sequence[float], qualifies: Sequence[bool], exact: Sequence[bool]) -> int | None:
    """Index of the cheapest point that qualifies, is not exact and costs less than every exact
    point with a cost; None when there is none (exact attention is then the cheapest choice).
    Points without a finite cost never win; with no exact cost at all, nothing is cheaper."""
    c = np.asarray(cost, dtype=float)
    q, ex = np.asarray(qualifies, dtype=bool), np.asarray(exact, dtype=bool)
    finite = np.isfinite(c)
    if not np.any(ex & finite):
        return None
    floor = c[ex & finite].min()
    cand = np.nonzero(q & ~ex & finite & (c < floor))[0]
    return int(cand[np.argmin(c[cand])]) if len(cand) else None


def seed_figures() -> dict[str, Any]:
    """The seed's worked figures (DESIGN §1), recomputed with the measurement's own formulas."""
    from pipeline.analytic import score_entries, score_macs

    cases = [(512, 768), (8192, 1024)]
    rows = [{"n": n, "d": d, "score_macs": score_macs(n, d), "score_entries": score_entries(n)}
            for n, d in cases]
    n0, d0 = cases[0]
    ratio = score_macs(16 * n0, d0) / score_macs(n0, d0)
    return {"rows": rows, "length_factor": 16, "work_factor": ratio}


def truthy(v: Any) -> bool:
    """A logged flag ("True", "1", "yes", True) as a bool."""
    return str(v).strip().lower() in ("true", "1", "yes")
