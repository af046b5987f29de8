"""The time complexity of self-attention, fitted to measurement: kernel cells over lengths n,
widths D and head counts H, per variant and device (the report's "The answer" section,
pipeline/report/answer.py, gives the verdicts):

    t_fwd(n, D) ≈ a·B·n²·D + b·B·n·D² + c        (the score term, the projection term, a constant)
    m(n, D, H)  ≈ p·B·H·n² + q·B·n·D + r          (score entries, activations, a constant)

by non-negative least squares on relative residuals (weights 1/value, so a 1 ms cell counts as
much as a 10 s one). The two terms are the classic cost of exact attention (Vaswani et al. 2017,
Table 1: O(n²·d) for the scores, O(n·d²) for the projections).

    fit = fit_time(n, D, B, t_ms, causal)    # TwoTermFit, or a Refusal with a one-line .reason
    fit.score_gflops(), fit.crossover_n(256)
    [analyse(g) for g in theory_groups(cells)]   # empty unless ok kernel cells span 2 widths

Pure: arrays or frames in, numbers out.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd

from pipeline import record as R
from pipeline.report.analysis import truthy
from pipeline.report.format import fmt_n
from pipeline.report.lines import MODEL, SCENARIO, SEQ_LEN, STATUS, Line, varying_axes
from pipeline.stability import Z95

D_COL, H_COL, B_COL = (R.col(k, "param") for k in (R.D_MODEL, R.N_HEADS, R.BATCH_SIZE))
CAUSAL_COL, FWDBWD_COL = R.col(R.CAUSAL, "param"), R.col(R.KERNEL_FWDBWD, "param")
# FLOPs per unit of each term (2 FLOPs per multiply-add): QKᵀ and PV are n²·D multiply-adds each
# over all heads (H·n²·d_k), half of them useful when causal; Q, K, V and the output projection
# are 4·n·D² multiply-adds
SCORE_FLOPS_PER_UNIT, PROJ_FLOPS_PER_UNIT = 4.0, 8.0
MEM_FLOOR_MB = 1.0  # the relative weights of peak memory floor at 1 MiB (page-granular RSS)


@dataclass(frozen=True)
class Refusal:
    """A fit that was not made, with the one-line reason the report prints instead of a number."""

    reason: str


def nnls(A, y) -> np.ndarray:
    """argmin ‖A·x − y‖ subject to x ≥ 0, exactly, for a few columns: the optimum is the plain
    least-squares solution on its own support (the Karush-Kuhn-Tucker conditions; Lawson & Hanson
    1974, Solving Least Squares Problems, ch. 23), so the best feasible one over the 2^k − 1
    supports is it."""
    A, y = np.asarray(A, dtype=float), np.asarray(y, dtype=float)
    k = A.shape[1]
    best, best_res = np.zeros(k), float(y @ y)
    for size in range(1, k + 1):
        for cols in combinations(range(k), size):
            sol = np.linalg.lstsq(A[:, cols], y, rcond=None)[0]
            if np.any(sol < 0):
                continue
            x = np.zeros(k)
            x[list(cols)] = sol
            res = float(np.sum((A @ x - y) ** 2))
            if res < best_res:
                best, best_res = x, res
    return best


def fit_relative(X, y, floor: float = 0.0) -> tuple[np.ndarray, float, float] | Refusal:
    """Non-negative coefficients of y ≈ X·coef minimising the relative residuals (weights
    1/max(y, floor)): (coef, R² of the raw values, worst |relative residual|), or a Refusal."""
    X, y = np.asarray(X, dtype=float), np.asarray(y, dtype=float)
    k = X.shape[1]
    if len(y) < k:
        return Refusal(f"{len(y)} cell(s) for {k} parameters: the fit needs at least {k}")
    w = 1.0 / np.maximum(y, floor)
    Xw = X * w[:, None]
    scale = np.linalg.norm(Xw, axis=0)
    scale[scale == 0] = 1.0
    if np.linalg.matrix_rank(Xw / scale) < k:
        return Refusal(f"the {len(y)} cells cannot tell the {k} terms apart: they need more "
                       "distinct lengths and widths")
    coef = nnls(Xw / scale, y * w) / scale
    pred = X @ coef
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum((y - pred) ** 2)) / ss_tot if ss_tot > 0 else float("nan")
    return coef, r2, float(np.max(np.abs(pred - y) / y))


def _arrays(*cols):
    """Float arrays of one shape (a scalar, e.g. B = 1, broadcast to the others)."""
    return [np.array(c) for c in np.broadcast_arrays(*(np.asarray(c, dtype=float) for c in cols))]


@dataclass(frozen=True)
class TwoTermFit:
    """t ≈ a·B·n²·D + b·B·n·D² + c (ms), with its fit quality."""

    a: float  # ms per B·n²·D
    b: float  # ms per B·n·D²
    c: float  # ms
    causal: bool
    r2: float
    worst: float  # largest |relative residual|
    cells: int

    def parts(self, n, D, B=1):
        n, D, B = _arrays(n, D, B)
        return self.a * B * n * n * D, self.b * B * n * D * D, self.c + 0 * n

    def predict(self, n, D, B=1):
        return sum(self.parts(n, D, B))

    def score_gflops(self) -> float | None:
        """The score term's effective rate: useful score FLOPs per second (None: no such term)."""
        per = SCORE_FLOPS_PER_UNIT / (2 if self.causal else 1)
        return per / (self.a * 1e6) if self.a > 0 else None

    def proj_gflops(self) -> float | None:
        return PROJ_FLOPS_PER_UNIT / (self.b * 1e6) if self.b > 0 else None

    def crossover_n(self, D: float) -> float | None:
        """The n where the two terms are equal: a·n²·D = b·n·D², n* = (b/a)·D."""
        return self.b / self.a * D if self.a > 0 and self.b > 0 else None


def fit_time(n, D, B, t_ms, causal: bool = True) -> TwoTermFit | Refusal:
    n, D, B, t = _arrays(n, D, B, t_ms)
    got = fit_relative(np.column_stack([B * n * n * D, B * n * D * D, np.ones_like(n)]), t)
    if isinstance(got, Refusal):
        return got
    (a, b, c), r2, worst = got
    return TwoTermFit(float(a), float(b), float(c), bool(causal), r2, worst, len(t))


@dataclass(frozen=True)
class FitIntervals:
    """95 % intervals of a two-term fit's a and b (ms per unit) from a bootstrap: each draw
    resamples the cells with replacement and moves every median within its own CI (log-normal),
    then refits. `draws` fits succeeded of those tried."""

    a: tuple[float, float]
    b: tuple[float, float]
    ratio: tuple[float, float]  # b / a, so n*(D) = ratio · D
    draws: int
    causal: bool

    def score_gflops(self) -> tuple[float, float] | None:
        per = SCORE_FLOPS_PER_UNIT / (2 if self.causal else 1)
        return (per / (self.a[1] * 1e6), per / (self.a[0] * 1e6)) if self.a[0] > 0 else None

    def proj_gflops(self) -> tuple[float, float] | None:
        return (PROJ_FLOPS_PER_UNIT / (self.b[1] * 1e6), PROJ_FLOPS_PER_UNIT / (self.b[0] * 1e6)) if self.b[0] > 0 else None

    def crossover_n(self, D: float) -> tuple[float, float] | None:
        return (self.ratio[0] * D, self.ratio[1] * D) if np.all(np.isfinite(self.ratio)) else None


BOOT_DRAWS = 300


def fit_time_intervals(n, D, B, t_ms, lo=None, hi=None, causal: bool = True, draws: int = BOOT_DRAWS,
                       seed: int = 0) -> FitIntervals | None:
    """Bootstrap intervals of the two-term fit (FitIntervals); None with under 6 cells or when
    fewer than half the draws give a fit."""
    n, D, B, t = _arrays(n, D, B, t_ms)
    if len(t) < 6:
        return None
    sigma = np.zeros_like(t)
    if lo is not None and hi is not None:
        lo_a, hi_a = _arrays(lo, hi)
        ok = np.isfinite(lo_a) & np.isfinite(hi_a) & (lo_a > 0) & (hi_a >= lo_a)
        sigma[ok] = np.log(hi_a[ok] / lo_a[ok]) / (2 * Z95)
    rng = np.random.default_rng(seed)
    a_s, b_s = [], []
    for _ in range(draws):
        idx = rng.integers(0, len(t), len(t))
        tt = t[idx] * np.exp(rng.standard_normal(len(idx)) * sigma[idx])
        got = fit_time(n[idx], D[idx], B[idx], tt, causal)
        if not isinstance(got, Refusal):
            a_s.append(got.a)
            b_s.append(got.b)
    if len(a_s) < draws / 2:
        return None
    a_s, b_s = np.array(a_s), np.array(b_s)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(a_s > 0, b_s / a_s, np.inf)

    def pct(x):
        return float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))

    return FitIntervals(pct(a_s), pct(b_s), pct(r), len(a_s), bool(causal))


@dataclass(frozen=True)
class MemoryFit:
    """m ≈ p·B·H·n² + q·B·n·D + r (MiB): p per score entry, q per element of an n×D activation."""

    p: float
    q: float
    r: float
    r2: float
    worst: float
    cells: int

    def n2_share(self, n, D, H, B=1) -> float:
        n, D, H, B = (float(v) for v in (n, D, H, B))
        quad = self.p * B * H * n * n
        total = quad + self.q * B * n * D + self.r
        return quad / total if total > 0 else 0.0


def fit_memory(n, D, H, B, mem_mb) -> MemoryFit | Refusal:
    n, D, H, B, m = _arrays(n, D, H, B, mem_mb)
    keep = m > 0
    n, D, H, B, m = n[keep], D[keep], H[keep], B[keep], m[keep]
    got = fit_relative(np.column_stack([B * H * n * n, B * n * D, np.ones_like(n)]), m, MEM_FLOOR_MB)
    if isinstance(got, Refusal):
        return got
    (p, q, r), r2, worst = got
    return MemoryFit(float(p), float(q), float(r), r2, worst, len(m))


@dataclass(frozen=True)
class HeldOut:
    """The time fit without the largest length, predicting it: (D, signed relative error)."""

    n: int
    errors: tuple[tuple[int, float], ...]

    @property
    def worst(self) -> float:
        return max(abs(e) for _, e in self.errors)


def held_out(n, D, B, t_ms, causal: bool = True) -> HeldOut | Refusal:
    n, D, B, t = _arrays(n, D, B, t_ms)
    if len(n) == 0:
        return Refusal("no cells")
    top = n.max()
    fit = fit_time(n[n < top], D[n < top], B[n < top], t[n < top], causal)
    if isinstance(fit, Refusal):
        return Refusal(f"without n = {fmt_n(top)}: {fit.reason}")
    at = n == top
    err = fit.predict(n[at], D[at], B[at]) / t[at] - 1
    return HeldOut(int(top), tuple((int(d), float(e)) for d, e in zip(D[at], err)))


# ----------------------------------------------------------------------------- cells -> groups
def theory_groups(cells: pd.DataFrame) -> list[Line]:
    """Kernel cells grouped by variant (and device, dtype, causal, ... whatever else varies),
    across widths and head counts: the fits' unit. Empty unless ok cells span 2 widths."""
    k = cells[cells[SCENARIO] == "kernel"] if SCENARIO in cells else cells.iloc[0:0]
    if k.empty or D_COL not in k or k.loc[k[STATUS] == "ok", D_COL].nunique() < 2:
        return []
    k = k.assign(**{c: k[c] if c in k else v for c, v in ((H_COL, 1), (B_COL, 1), (CAUSAL_COL, True))})
    axes = [a for a in varying_axes(k, (MODEL, SEQ_LEN, D_COL, H_COL, B_COL)) if a != FWDBWD_COL]
    out = []
    for key, g in k.groupby([MODEL] + axes, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        ex = {truthy(v) for v in g.get(R.col(R.EXACT), pd.Series(dtype=str)).dropna()}
        out.append(Line(str(key[0]), dict(zip(axes, key[1:])), g, ex.pop() if len(ex) == 1 else None))
    return out


_METRICS = {"fwd": R.KERNEL_FWD_MS, "proj": R.KERNEL_PROJ_MS, "mix": R.KERNEL_MIX_MS, "mem": R.KERNEL_PEAK_MEM_MB}


def cell_medians(group: Line) -> pd.DataFrame:
    """One row per (n, D, H, B) of the ok cells: the median of each metric (NaN: not logged),
    and the 95 % CIs of the forward's and the projections' medians (`fwd_lo`, `fwd_hi`, `proj_lo`,
    `proj_hi`); over a cell's rounds, the span of their CIs; `flagged`: a run of the cell is not
    `stable`."""
    ok = group.ok()
    frame = pd.DataFrame({"n": ok[SEQ_LEN], "D": ok[D_COL], "H": ok[H_COL], "B": ok[B_COL]}).astype(float)
    for short, metric in _METRICS.items():
        frame[short] = pd.to_numeric(ok[R.col(metric)], errors="coerce") if R.col(metric) in ok else np.nan
    timed = {"fwd": R.KERNEL_FWD_MS, "proj": R.KERNEL_PROJ_MS}  # the medians' 95 % CIs
    for short, metric in timed.items():
        for end, name in zip(("_lo", "_hi"), R.ci_names(metric)):
            frame[short + end] = pd.to_numeric(ok[R.col(name)], errors="coerce") if R.col(name) in ok else np.nan
    keys = ["n", "D", "H", "B"]
    med = frame.groupby(keys, as_index=False).median()
    # a cell measured more than once (rounds, seeds): its interval spans every run's CI and median,
    # so that the run-to-run spread, which one run's CI does not carry, reaches the fits
    ends = {}
    for short in timed:
        ends[short + "_lo"] = frame[[short + "_lo", short]].min(axis=1, skipna=False)
        ends[short + "_hi"] = frame[[short + "_hi", short]].max(axis=1, skipna=False)
    spans = frame[keys].assign(**ends).groupby(keys, as_index=False).agg(
        **{c: (c, "min" if c.endswith("_lo") else "max") for c in ends})
    med = med.drop(columns=list(ends)).merge(spans, on=keys)
    # a cell with a run (a round) whose timings are not `stable` is marked wherever it is shown
    stab = ok[R.col(R.STABILITY)] if R.col(R.STABILITY) in ok else pd.Series(index=ok.index, dtype=object)
    bad = frame[keys].assign(flagged=(stab.notna() & (stab != R.STABLE)).to_numpy())
    med = med.merge(bad.groupby(keys, as_index=False)["flagged"].any(), on=keys)
    return med.assign(hd=med["D"] / med["H"]).sort_values(["D", "H", "n"]).reset_index(drop=True)


@dataclass
class Analysis:
    """One group's fits: over the cells at its most common head dim (`fit_cells`)."""

    line: Line
    cells: pd.DataFrame  # every (n, D, H, B) of the group
    head_dim: float
    time: TwoTermFit | Refusal
    memory: MemoryFit | Refusal
    held: HeldOut | Refusal
    causal: bool
    intervals: FitIntervals | None = None  # the time fit's a, b and n* CIs (bootstrap)

    @property
    def fit_cells(self) -> pd.DataFrame:
        return self.cells[self.cells["hd"] == self.head_dim]


def analyse(group: Line) -> Analysis:
    cells = cell_medians(group)
    causal = truthy(group.rows[CAUSAL_COL].dropna().iloc[0]) if group.rows[CAUSAL_COL].notna().any() else True
    hd = float(cells["hd"].value_counts().idxmax()) if len(cells) else 0.0
    f = cells[cells["hd"] == hd]
    t = f.dropna(subset=["fwd"])
    time_fit = fit_time(t["n"], t["D"], t["B"], t["fwd"], causal)
    intervals = None if isinstance(time_fit, Refusal) else fit_time_intervals(
        t["n"], t["D"], t["B"], t["fwd"], t.get("fwd_lo"), t.get("fwd_hi"), causal)
    return Analysis(group, cells, hd, time_fit,
                    fit_memory(*(f.dropna(subset=["mem"])[c] for c in ("n", "D", "H", "B", "mem"))),
                    held_out(t["n"], t["D"], t["B"], t["fwd"], causal), causal, intervals)
