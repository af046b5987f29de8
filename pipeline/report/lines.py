"""Cells grouped into what the report compares: kernel and decode lines (a variant at fixed values
of every other line axis, across lengths), quality groups (seeds averaged), Pareto panels, checkpointing
on/off pairs, and the memory budget a line was judged against.

    lines = kernel_lines(table.frame); lines[0].fit(R.KERNEL_FWD_MS).exponent
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline import record as R
from pipeline.report.analysis import PowerFit, fit_power_law, median_per_n, pareto_front, truthy
from pipeline.report.format import fmt_value
from pipeline.report.load import PARAMS
from pipeline.schema import is_line_axis

MODEL, SCENARIO, TASK, STATUS = (R.col(t) for t in (R.MODEL, R.SCENARIO, R.TASK, R.STATUS))
SEQ_LEN = R.col(R.SEQ_LEN, "param")
CKPT = R.col(R.GRAD_CHECKPOINTING, "param")
MODEL_KNOBS = R.col(R.MODEL_PARAM_PREFIX, "param")  # params.model.*: a variant's own knobs

# quality metrics, best first when a task logs several; True = higher is better
QUALITY_METRICS: dict[str, bool] = {
    R.VAL_BPC: False,  # a language model's measure; its val/acc (next-byte accuracy) is secondary
    R.VAL_ACC: True,
    R.QUALITY_REL_ERR_VS_EXACT: False,
    R.QUALITY_REL_ERR_UNIFORM_MEAN: False,
    R.VAL_LOSS: False,
}
# reference values shown beside quality, never ranked
QUALITY_REFERENCES = (R.VAL_BPC_UNIGRAM,)
# cost of a quality cell, first one every point of a panel has wins (label, metric)
TIME_COSTS = (
    ("training time per token (µs)", R.TRAIN_TOKENS_PER_S),
    ("inference time per token (µs)", R.INFER_TOKENS_PER_S),
)
MEMORY_COSTS = (
    ("training peak memory (MB)", R.TRAIN_PEAK_MEM_MB),
    ("inference peak memory (MB)", R.INFER_PEAK_MEM_MB),
    ("kernel forward peak memory (MB)", R.KERNEL_PEAK_MEM_MB),
)


def varying_axes(cells: pd.DataFrame, by: Sequence[str] = (MODEL, SEQ_LEN)) -> list[str]:
    """Line-axis params (pipeline.schema.is_line_axis) that take several values among cells
    sharing `by` (a variant at one length: dtype, causal, window, checkpointing …); each value is
    then its own line. Seeds, timing knobs, run switches and params a cell adds are not axes."""
    axes = []
    for c in sorted(c for c in cells.columns if c.startswith(PARAMS)):
        if not is_line_axis(c[len(PARAMS):]):
            continue
        per = cells.groupby(list(by), dropna=False)[c].nunique(dropna=True)
        if len(per) and per.max() > 1:
            axes.append(c)
    device = R.col(R.DEVICE)
    if device in cells and cells[device].nunique(dropna=True) > 1:
        axes.append(device)
    return axes


def short(axis: str) -> str:
    """`params.backbone.dtype` -> `dtype`: the last component names an axis well enough."""
    return axis.rsplit(".", 1)[-1]


def label(model: str, axis_values: dict[str, Any]) -> str:
    """`model [axis=value, ...]`, or the bare model name when no axis varies; an axis the
    variant has no value for (another variant's knob) is left out."""
    extra = ", ".join(f"{short(a)}={fmt_value(v)}" for a, v in axis_values.items() if not _missing(v))
    return f"{model} [{extra}]" if extra else str(model)


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))


@dataclass
class Line:
    """One measured line of a scenario (kernel, decode): a variant at fixed values of every other axis."""

    model: str
    axes: dict[str, Any]
    rows: pd.DataFrame  # every cell of the line, any status
    exact: bool | None

    @property
    def label(self) -> str:
        return label(self.model, self.axes)

    def ok(self) -> pd.DataFrame:
        return self.rows[self.rows[STATUS] == "ok"]

    def series(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """Distinct lengths and the median value of the metric over ok cells there."""
        col = R.col(metric)
        ok = self.ok()
        if col not in ok or ok.empty:
            return np.array([]), np.array([])
        return median_per_n(ok[SEQ_LEN], ok[col])

    def fit(self, metric: str) -> PowerFit | None:
        """The power law over the largest lengths; with an exponent CI where the metric is a
        timed median that carries its own CI (pipeline/record.py TIMED)."""
        ok = self.ok()
        col = R.col(metric)
        if col not in ok or ok.empty:
            return None
        if metric in R.TIMED:
            lo, hi = (R.col(c) for c in R.ci_names(metric))
            if lo in ok and hi in ok:
                return fit_power_law(ok[SEQ_LEN], ok[col], lo=ok[lo], hi=ok[hi])
        return fit_power_law(ok[SEQ_LEN], ok[col])

    def ci(self, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(lo, hi) of the 95 % CI of the metric at each length of `series(metric)` (the median
        over repeats), where the metric is a timed median that carries one; else None."""
        if metric not in R.TIMED:
            return None
        lo_c, hi_c = (R.col(c) for c in R.ci_names(metric))
        ok = self.ok()
        if lo_c not in ok or hi_c not in ok:
            return None
        n, _ = self.series(metric)
        nl, lo = median_per_n(ok[SEQ_LEN], ok[lo_c])
        nh, hi = median_per_n(ok[SEQ_LEN], ok[hi_c])
        if not (np.array_equal(nl, n) and np.array_equal(nh, n)):
            return None
        return lo, hi

    def lacks(self, analytic: str) -> bool:
        """Whether the variant has no such analytic model (`flops`, `memory_bytes`, `state_bytes`):
        its cells' `analytic_absent` tag names it, and the figures from it are absent, not missing."""
        col = R.col(R.ANALYTIC_ABSENT)
        if col not in self.rows:
            return False
        return any(analytic in str(v).split(",") for v in self.rows[col].dropna())

    def flagged(self, lengths=None) -> pd.DataFrame:
        """The ok cells (at `lengths`, if given) whose timings are not `stable`."""
        return flagged(self.ok() if lengths is None else self.ok()[self.ok()[SEQ_LEN].isin(list(lengths))])

    def same_axes(self, other: Line) -> bool:
        """Whether the two lines share every other axis value (compared as text: NaN and types).
        A variant's own knobs (`model.*`: window, features, ...) are part of the variant, not an
        axis another variant shares, so they are not compared."""
        def others(axes: dict[str, Any]) -> dict[str, str]:
            return {k: str(v) for k, v in axes.items() if not k.startswith(MODEL_KNOBS)}

        return others(self.axes) == others(other.axes)


def flagged(cells: pd.DataFrame) -> pd.DataFrame:
    """Cells whose `stability` tag is there and is not `stable` (unstable, contaminated)."""
    col = R.col(R.STABILITY)
    if col not in cells:
        return cells.iloc[0:0]
    s = cells[col]
    return cells[s.notna() & (s != R.STABLE)]


FLAG = "†"  # marks a figure behind which a cell is not `stable`


def kernel_lines(cells: pd.DataFrame, scenario: str = "kernel") -> list[Line]:
    """The cells of one scenario (kernel by default; decode has the same shape: a variant
    across lengths) as lines, sorted by variant and axis values."""
    return lines_of(cells[cells[SCENARIO] == scenario])


def lines_of(k: pd.DataFrame, always: Sequence[str] = ()) -> list[Line]:
    """Cells as lines: a variant at fixed values of every axis that varies (and of the params in
    `always`, named in every label even when they do not vary), across lengths."""
    if k.empty or SEQ_LEN not in k:
        return []
    axes = varying_axes(k)
    axes = [a for a in always if a in k and a not in axes] + axes
    lines = []
    for key, g in k.groupby([MODEL] + axes, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        lines.append(Line(str(key[0]), dict(zip(axes, key[1:])), g, _exact_of(g)))
    return lines


def _exact_of(rows: pd.DataFrame) -> bool | None:
    """Exactness from the runs' `exact` tag (written from the variant's capability flag)."""
    col = R.col(R.EXACT)
    if col not in rows:
        return None
    vals = {truthy(v) for v in rows[col].dropna()}
    return vals.pop() if len(vals) == 1 else None


def quality_metric(rows: pd.DataFrame) -> str | None:
    """The first of QUALITY_METRICS the rows logged."""
    for m in QUALITY_METRICS:
        col = R.col(m)
        if col in rows and rows[col].notna().any():
            return m
    return None


def quality_groups(cells: pd.DataFrame) -> pd.DataFrame:
    """Quality cells (ok, with a quality metric) averaged over seeds: one row per variant,
    scenario, task, length and other varying axis, with mean, std and count of each metric."""
    cols = [R.col(m) for m in list(QUALITY_METRICS) + list(QUALITY_REFERENCES)]
    present = [c for c in cols if c in cells]
    if not present:
        return pd.DataFrame()
    q = cells[(cells[STATUS] == "ok") & cells[present].notna().any(axis=1)]
    if q.empty:
        return pd.DataFrame()
    base = [MODEL, SCENARIO, TASK, SEQ_LEN]
    rows = []
    for _, qs in q.groupby([SCENARIO, TASK], sort=True, dropna=False):
        axes = varying_axes(qs, base)  # per scenario and task: a training-only axis does not split the rest
        for key, g in qs.groupby(base + axes, dropna=False, sort=True):
            row = {"model": key[0], "scenario": key[1], "task": key[2], "n": int(key[3]),
                   "label": label(key[0], dict(zip(axes, key[4:]))), "seeds": len(g), "rows": g,
                   "metric": quality_metric(g)}
            for c in present:
                row[c] = g[c]
            rows.append(row)
    return pd.DataFrame(rows)


def panel_scenario(groups: pd.DataFrame) -> str:
    """The one scenario a (task, n) panel shows: the one covering most variants (ties: the first
    by name). A training-only cell and a full cell measure throughput differently, and the same
    training measured twice would be two points of one setting."""
    cover = groups.groupby("scenario")["model"].nunique()
    return str(min(cover[cover == cover.max()].index))


def pareto_panels(groups: pd.DataFrame, costs: tuple[tuple[str, str], ...]) -> tuple[list[dict], list[str]]:
    """Per (task, n): each quality group's mean quality and the first cost every point has."""
    panels, notes = [], []
    if groups.empty:
        return panels, notes
    for (task, n), g in groups.groupby(["task", "n"], sort=True):
        scenario = panel_scenario(g)
        g = g[g["scenario"] == scenario]
        metric = quality_metric(pd.concat(list(g["rows"])))
        if metric is None:
            continue
        cost_label, cost_metric = _pick_cost(g, costs)
        if cost_metric is None:
            notes.append(f"{task}, n={n}: no cost metric logged by its quality cells")
            continue
        pts = []
        for _, r in g.iterrows():
            rows = r["rows"]
            qv = rows.get(R.col(metric))
            cv = rows.get(R.col(cost_metric))
            if qv is None or cv is None or qv.dropna().empty or cv.dropna().empty:
                notes.append(f"{task}, n={n}: {r['label']} lacks {metric} or {cost_metric}; not plotted")
                continue
            cost = cv.mean()
            if R.NAMES[cost_metric].unit == "tokens/s":
                cost = 1e6 / cost  # µs per token
            pts.append({"model": r["model"], "label": r["label"],
                        "quality": qv.mean(), "quality_std": qv.std(ddof=1) if qv.count() > 1 else 0.0,
                        "seeds": int(qv.count()), "cost": cost})
        pts_df = pd.DataFrame(pts)
        if not pts_df.empty:
            pts_df["front"] = pareto_front(pts_df["cost"], pts_df["quality"], QUALITY_METRICS[metric])
        panels.append({"task": task, "n": int(n), "scenario": scenario, "metric": metric,
                       "higher_is_better": QUALITY_METRICS[metric], "cost_label": cost_label,
                       "points": pts_df})
    return panels, notes


def _pick_cost(g: pd.DataFrame, costs) -> tuple[str | None, str | None]:
    best, best_cov = (None, None), 0
    for cost_label, metric in costs:
        col = R.col(metric)
        cov = sum(bool(col in r and r[col].notna().any()) for r in g["rows"])
        if cov == len(g):
            return cost_label, metric
        if cov > best_cov:
            best, best_cov = (cost_label, metric), cov
    return best


def checkpointing_effect(cells: pd.DataFrame) -> pd.DataFrame:
    """Training cells that differ only in trainer.grad_checkpointing, paired: memory saved and
    step time added by turning checkpointing on (means over seeds)."""
    cols = ["variant", "scenario", "task", "n", "seeds", "mem_off_mb", "mem_on_mb", "mem_saved_pct",
            "step_off_ms", "step_on_ms", "time_added_pct"]
    mem, step = R.col(R.TRAIN_PEAK_MEM_MB), R.col(R.TRAIN_STEP_MS)
    if any(c not in cells for c in (CKPT, mem, step)):
        return pd.DataFrame(columns=cols)
    t = cells[(cells[STATUS] == "ok") & cells[CKPT].notna()].copy()
    if t.empty:
        return pd.DataFrame(columns=cols)
    t["ckpt"] = t[CKPT].map(truthy)
    base = [MODEL, SCENARIO, TASK, SEQ_LEN]
    axes = [a for a in varying_axes(t, base) if a != CKPT]
    rows = []
    for key, g in t.groupby(base + axes, dropna=False, sort=True):
        on, off = g[g["ckpt"]], g[~g["ckpt"]]
        if on.empty or off.empty:
            continue
        mem_on, mem_off = on[mem].mean(), off[mem].mean()
        st_on, st_off = on[step].mean(), off[step].mean()
        rows.append({"variant": label(key[0], dict(zip(axes, key[4:]))), "scenario": key[1], "task": key[2],
                     "n": int(key[3]), "seeds": min(len(on), len(off)),
                     "mem_off_mb": mem_off, "mem_on_mb": mem_on, "mem_saved_pct": 100 * (1 - mem_on / mem_off),
                     "step_off_ms": st_off, "step_on_ms": st_on, "time_added_pct": 100 * (st_on / st_off - 1)})
    return pd.DataFrame(rows, columns=cols)


def memory_budget_mb(line: Line, budget_gb: float | None) -> tuple[float | None, str]:
    """The memory wall's budget in MiB (peak memory is logged in MiB, `mb` in its name), with
    where it came from: --budget-gb when given, else the budget pre-flight judged the line's cells
    against (`budget_mem_mb`, the smallest when they differ), else a logged device_memory_gb
    (GiB, x1024). Never this machine's memory: the cells may have run elsewhere."""
    if budget_gb is not None:
        return budget_gb * 1024, f"{budget_gb:g} GiB (--budget-gb)"
    logged = logged_values(line.rows, R.BUDGET_MEM_MB)
    if len(logged):
        mb = float(logged.min())
        several = ", the smallest of its cells" if logged.nunique() > 1 else ""
        return mb, f"{mb / 1024:.2f} GiB (logged {R.BUDGET_MEM_MB}{several})"
    logged = logged_values(line.rows, R.DEVICE_MEMORY_GB)
    if len(logged):
        gb = float(logged.max())
        return gb * 1024, f"{gb:g} GiB (logged {R.DEVICE_MEMORY_GB})"
    devices = set(line.rows.get(R.col(R.DEVICE), pd.Series(dtype=str)).dropna())
    return None, (f"unknown for device {', '.join(sorted(devices)) or '?'}: "
                  f"no {R.BUDGET_MEM_MB} logged; pass --budget-gb")


def logged_values(rows: pd.DataFrame, param: str, kind: str | None = None) -> pd.Series:
    """A logged param's numeric values over the rows (none: empty); `kind` as in R.col."""
    col = R.col(param, kind)
    return pd.to_numeric(rows[col], errors="coerce").dropna() if col in rows else pd.Series(dtype=float)
