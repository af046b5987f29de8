"""The report's "What you give up for what you save" section: every quality setting (a variant at
one value of its knobs: Performer's features, the Longformer window, the SSM state size) next to
its cost, measured by the kernel cells of the same variant, knobs and n; per (task, n) its quality
and difference from the best exact variant, its forward, forward+backward and peak-memory ratios
to the cheapest exact variant, the Pareto fronts, and the recommendation: the cheapest setting
within 1 % and 5 % of exact quality, computed from the records.

    table = settings_table(quality_groups(cells), cells)   # one row per (task, n, setting)
    compare(table); recommend(compare(table))               # differences and ratios; the choice
    section_tradeoff(doc, cells, quality_groups(cells), colours, out)

The helpers above the section are pure (frames in, frames out).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import record as R
from pipeline.report.analysis import cheapest_below_exact, pareto_front, within_tolerance
from pipeline.report.document import Doc
from pipeline.report.figures import plot_pareto
from pipeline.report.format import MISSING, fmt
from pipeline.report.lines import (
    FLAG,
    MODEL,
    MODEL_KNOBS,
    QUALITY_METRICS,
    SCENARIO,
    SEQ_LEN,
    STATUS,
    _exact_of,
    flagged,
    label,
    panel_scenario,
    quality_metric,
    short,
)

TOLERANCES = (0.01, 0.05)  # "within 1 % / 5 % of exact quality"
# (column, metric of the kernel cells, header): the costs of a setting, medians over its cells
COSTS = (
    ("fwd_ms", R.KERNEL_FWD_MS, "forward time"),
    ("fwdbwd_ms", R.KERNEL_FWDBWD_MS, "fwd+bwd time"),
    ("peak_mb", R.KERNEL_PEAK_MEM_MB, "peak memory"),
)
# the costs a recommendation minimises: (column, words)
RECOMMEND_BY = (("fwdbwd_ms", "forward+backward time"), ("peak_mb", "peak memory"))
# the baseline each quality metric is judged against, shown beside it
BASELINES = {
    R.VAL_ACC: R.VAL_ACC_CHANCE,
    R.VAL_BPC: R.VAL_BPC_UNIGRAM,
    R.QUALITY_REL_ERR_VS_EXACT: R.QUALITY_REL_ERR_UNIFORM_MEAN,
}
# the least an exact variant must reach for a length to get a recommendation: below it the
# baseline is undertrained, and a setting "within 1 % of exact" says nothing
EXACT_FLOOR = {R.VAL_ACC: 0.95}
# a trained metric with no such floor (val/bpc: no known best) counts the best exact variant as
# trained only once its loss has levelled off: a fall of at most PLATEAU over the last quarter
# of its steps (R.TRAIN_LOSS_FALL). A baseline still learning makes any "within 1 %"
# a statement about the budget, not the variant.
PLATEAU = 0.01
# metrics that are already an error relative to the exact output: a tolerance is the error itself
ABSOLUTE = (R.QUALITY_REL_ERR_VS_EXACT,)
KNOB_PREFIX = MODEL_KNOBS
BATCH = R.col(R.BATCH_SIZE, "param")
NONE = "none: exact attention is the cheapest here"
NO_COST = "no kernel cell of an exact variant at this n"
UNDERTRAINED = "none: exact attention is undertrained here (why: below the table)"


def _norm(v) -> str:
    """A knob value as a join key: 64, 64.0 and "64" alike; missing is empty."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def knob_columns(cells: pd.DataFrame) -> list[str]:
    """The `params.model.*` columns that are a variant's knobs (not its name or class)."""
    skip = {R.col(k, "param") for k in R.MODEL_IDENTITY_PARAMS}
    return sorted(c for c in cells.columns if c.startswith(KNOB_PREFIX) and c not in skip)


def setting_key(row: pd.Series, knobs: list[str]) -> tuple[str, ...]:
    """The variant and every knob value of one cell: the join of quality to cost."""
    return (str(row[MODEL]),) + tuple(_norm(row.get(k)) for k in knobs)


def kernel_costs(cells: pd.DataFrame) -> pd.DataFrame:
    """Median cost of the ok kernel cells per (setting, n): fwd_ms, fwdbwd_ms, peak_mb and
    us_per_token (forward+backward time over the batch's tokens)."""
    k = cells[(cells[SCENARIO] == "kernel") & (cells[STATUS] == "ok")] if SCENARIO in cells else cells.iloc[0:0]
    cols = ["key", "n"] + [c for c, _, _ in COSTS] + [f"{c}_halfwidth" for c, _, _ in COSTS] + ["us_per_token",
                                                                                               "cost_flagged"]
    if k.empty:
        return pd.DataFrame(columns=cols)
    knobs = knob_columns(cells)
    rows = []
    for (key, n), g in k.groupby([k.apply(lambda r: setting_key(r, knobs), axis=1), SEQ_LEN], sort=True):
        row = {"key": key, "n": int(n)}
        for col, metric, _ in COSTS:
            vals = pd.to_numeric(g.get(R.col(metric), pd.Series(dtype=float)), errors="coerce").dropna()
            row[col] = float(vals.median()) if len(vals) else np.nan
            row[f"{col}_halfwidth"] = _log_halfwidth(g, metric)
        row["cost_flagged"] = bool(len(flagged(g)))
        batch = float(pd.to_numeric(g[BATCH], errors="coerce").median()) if BATCH in g else 1.0
        row["us_per_token"] = 1e3 * row["fwdbwd_ms"] / (max(batch, 1.0) * int(n))
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def _log_halfwidth(g: pd.DataFrame, metric: str) -> float:
    """Half the width of a timed median's 95 % CI in log space, log(hi/lo)/2, the median over the
    cells (NaN where the metric carries no CI)."""
    if metric not in R.TIMED:
        return np.nan
    lo_c, hi_c = (R.col(c) for c in R.ci_names(metric))
    if lo_c not in g or hi_c not in g:
        return np.nan
    lo, hi = (pd.to_numeric(g[c], errors="coerce") for c in (lo_c, hi_c))
    w = (np.log(hi / lo) / 2).replace([np.inf, -np.inf], np.nan).dropna()
    return float(w.median()) if len(w) else np.nan


def knob_axes(cells: pd.DataFrame, model: str) -> list[str]:
    """The knobs that take several values among one variant's quality cells: they label its
    settings (a knob set once for every cell says nothing)."""
    mine = cells[cells[MODEL] == model]
    return [c for c in knob_columns(cells) if mine[c].map(_norm).replace("", np.nan).nunique() > 1]


def settings_table(qgroups: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, n, setting) of the quality groups (the scenario each (task, n) panel
    shows, lines.panel_scenario), with the quality's mean, std and seeds, its baseline, whether
    the variant is exact, its knob text and the kernel cost at the same setting and n (NaN when
    no such kernel cell ran ok)."""
    cols = ["task", "n", "scenario", "metric", "higher_is_better", "model", "label", "knob", "exact",
            "quality", "quality_std", "seeds", "baseline_metric", "baseline", "loss_fall"] \
        + [c for c, _, _ in COSTS] + [f"{c}_halfwidth" for c, _, _ in COSTS] + ["us_per_token", "cost_flagged"]
    if qgroups.empty:
        return pd.DataFrame(columns=cols)
    costs = {(r["key"], r["n"]): r for _, r in kernel_costs(cells).iterrows()}
    qcells = pd.concat(list(qgroups["rows"]))
    knobs = knob_columns(cells)
    axes = {m: knob_axes(qcells, m) for m in qcells[MODEL].dropna().unique()}
    rows = []
    for (task, n), g in qgroups.groupby(["task", "n"], sort=True):
        g = g[g["scenario"] == panel_scenario(g)]
        metric = quality_metric(pd.concat(list(g["rows"])))
        if metric is None:
            continue
        for _, r in g.iterrows():
            cellrows = r["rows"]
            q = pd.to_numeric(cellrows.get(R.col(metric), pd.Series(dtype=float)), errors="coerce").dropna()
            if q.empty:
                continue
            first = cellrows.iloc[0]
            values = {a: first.get(a) for a in axes.get(r["model"], [])}
            knob = ", ".join(f"{short(a)}={_norm(v)}" for a, v in values.items())
            base_metric = BASELINES.get(metric)
            base = cellrows.get(R.col(base_metric)) if base_metric else None
            base = pd.to_numeric(base, errors="coerce").dropna() if base is not None else pd.Series(dtype=float)
            fall = pd.to_numeric(cellrows.get(R.col(R.TRAIN_LOSS_FALL), pd.Series(dtype=float)),
                                 errors="coerce").dropna()
            row = {"task": task, "n": int(n), "scenario": r["scenario"], "metric": metric,
                   "higher_is_better": QUALITY_METRICS[metric], "model": r["model"],
                   "label": label(r["model"], {a: _norm(v) for a, v in values.items()}), "knob": knob,
                   "exact": _exact_of(cellrows), "quality": float(q.mean()),
                   "quality_std": float(q.std(ddof=1)) if len(q) > 1 else np.nan, "seeds": int(len(q)),
                   "baseline_metric": base_metric if len(base) else None,
                   "baseline": float(base.mean()) if len(base) else np.nan,
                   "loss_fall": float(fall.mean()) if len(fall) else np.nan}
            key = (setting_key(first, knobs), int(n))
            hit = costs.get(key)
            for col in [c for c, _, _ in COSTS] + [f"{c}_halfwidth" for c, _, _ in COSTS] + ["us_per_token"]:
                row[col] = float(hit[col]) if hit is not None else np.nan
            row["cost_flagged"] = bool(hit["cost_flagged"]) if hit is not None else False
            rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def compare(table: pd.DataFrame) -> pd.DataFrame:
    """Per (task, n): `best_exact` (the best exact quality), `delta` (quality minus it) and, per
    cost, `<cost>_ratio` (the setting's over the cheapest exact setting's at that n) with its 95 %
    CI `<cost>_ratio_lo`, `<cost>_ratio_hi` where both medians carry one (their log half-widths
    added in quadrature: the two are measured independently)."""
    out = table.copy()
    out["best_exact"], out["delta"] = np.nan, np.nan
    for col, _, _ in COSTS:
        out[f"{col}_ratio"] = np.nan
        out[f"{col}_ratio_lo"], out[f"{col}_ratio_hi"] = np.nan, np.nan
    for _, g in out.groupby(["task", "n"], sort=True):
        ex = g[g["exact"] == True]  # noqa: E712 - the column holds True, False or None
        if ex.empty:
            continue
        higher = bool(g["higher_is_better"].iloc[0])
        best = ex["quality"].max() if higher else ex["quality"].min()
        out.loc[g.index, "best_exact"] = best
        out.loc[g.index, "delta"] = g["quality"] - best
        for col, _, _ in COSTS:
            floor = ex[col].min()
            if np.isfinite(floor) and floor > 0:
                ratio = g[col] / floor
                out.loc[g.index, f"{col}_ratio"] = ratio
                hw_col = f"{col}_halfwidth"
                if hw_col in g:
                    floor_hw = ex.loc[ex[col].idxmin(), hw_col]
                    hw = np.sqrt(g[hw_col].astype(float) ** 2 + float(floor_hw) ** 2)
                    out.loc[g.index, f"{col}_ratio_lo"] = ratio * np.exp(-hw)
                    out.loc[g.index, f"{col}_ratio_hi"] = ratio * np.exp(hw)
    return out


def judged_by_plateau(metric: str) -> bool:
    """A trained metric with no EXACT_FLOOR (val/bpc): its baseline must have levelled off. Near a
    loss of 0 (a solved MQAR) a relative fall says nothing, so a metric with a floor is judged by
    the floor; fidelity (ABSOLUTE) trains nothing."""
    return metric not in EXACT_FLOOR and metric not in ABSOLUTE


def undertrained(g: pd.DataFrame) -> str | None:
    """Why the best exact setting of one (task, n) group is no baseline to judge against, or None
    when it is one: below its metric's EXACT_FLOOR; or, for a trained metric without a floor,
    a loss still falling by more than PLATEAU over its last quarter of steps (or not recorded).
    Fidelity (an error relative to the exact output itself) trains nothing: always a baseline."""
    metric, higher = g["metric"].iloc[0], bool(g["higher_is_better"].iloc[0])
    ex = g[g["exact"] == True]  # noqa: E712
    if ex.empty:
        return None
    best = ex.loc[ex["quality"].idxmax() if higher else ex["quality"].idxmin()]
    floor = EXACT_FLOOR.get(metric)
    if floor is not None:
        return None if best["quality"] >= floor else f"{best['label']}: {metric} {fmt(best['quality'])} < {floor:g}"
    if not judged_by_plateau(metric):  # fidelity: nothing trained
        return None
    fall = float(best["loss_fall"])
    if not np.isfinite(fall):
        return f"{best['label']}: no {R.TRAIN_LOSS_FALL} recorded"
    if fall > PLATEAU:
        return f"{best['label']}'s training loss still fell {fall:.1%} over its last quarter of steps"
    return None


def recommend(compared: pd.DataFrame, tolerances=TOLERANCES, by=RECOMMEND_BY) -> pd.DataFrame:
    """Per (task, n), cost and tolerance: the cheapest efficient setting within the tolerance of
    the best exact quality that costs less than every exact setting, with its ratio to the
    cheapest exact one; `label` missing (NaN) when there is none, `costed` False when no exact setting
    has that cost at n (nothing to compare with), `trained` False (and `why` saying why) when
    the best exact setting is undertrained (`undertrained`): no recommendation."""
    rows = []
    for (task, n), g in compared.groupby(["task", "n"], sort=True):
        if not g["best_exact"].notna().any():
            continue
        metric, higher = g["metric"].iloc[0], bool(g["higher_is_better"].iloc[0])
        exact = (g["exact"] == True).to_numpy()  # noqa: E712
        why = undertrained(g)
        trained = why is None
        for col, words in by:
            for tol in tolerances:
                ok = within_tolerance(g["quality"], float(g["best_exact"].iloc[0]), tol, higher, metric in ABSOLUTE)
                cost = g[col].to_numpy(dtype=float)
                i = cheapest_below_exact(cost, ok, exact) if trained else None
                pick = g.iloc[i] if i is not None else None
                rows.append({"task": task, "n": int(n), "cost": col, "cost_words": words, "tol": tol,
                             "label": pick["label"] if pick is not None else None,
                             "ratio": float(pick[f"{col}_ratio"]) if pick is not None else np.nan,
                             "costed": bool(np.any(exact & np.isfinite(cost))), "trained": trained,
                             "why": why})
    return pd.DataFrame(rows, columns=["task", "n", "cost", "cost_words", "tol", "label", "ratio", "costed",
                                       "trained", "why"])


def tradeoff_panels(compared: pd.DataFrame, cost: str, cost_label: str) -> list[dict]:
    """Pareto panels (figures.plot_pareto's shape) per (task, n) over the settings with a cost."""
    panels = []
    for (task, n), g in compared.groupby(["task", "n"], sort=True):
        g = g[np.isfinite(g[cost].astype(float))]
        if g.empty:
            continue
        higher = bool(g["higher_is_better"].iloc[0])
        pts = pd.DataFrame({"model": g["model"], "label": g["label"], "knob": g["knob"], "quality": g["quality"],
                            "quality_std": g["quality_std"].fillna(0.0), "seeds": g["seeds"], "cost": g[cost]})
        pts["front"] = pareto_front(pts["cost"], pts["quality"], higher)
        panels.append({"task": task, "n": int(n), "scenario": g["scenario"].iloc[0], "metric": g["metric"].iloc[0],
                       "higher_is_better": higher, "cost_label": cost_label, "points": pts.reset_index(drop=True)})
    return panels


# ----------------------------------------------------------------------------- the section


def _ratio(v: float, lo: float = np.nan, hi: float = np.nan) -> str:
    """`0.45×`, with its CI `[0.43, 0.47]` where there is one."""
    if not np.isfinite(v):
        return MISSING
    return f"{v:.2f}×" + (f" [{lo:.2f}, {hi:.2f}]" if np.isfinite(lo) and np.isfinite(hi) else "")


def _quality(r: pd.Series) -> str:
    """mean, and ± std (k seeds) where there are replicates."""
    spread = f" ± {fmt(r['quality_std'], 2)} ({r['seeds']} seeds)" if r["seeds"] > 1 else ""
    return fmt(r["quality"]) + spread


def _fall(v: float) -> str:
    return f"{v:.1%}" if np.isfinite(v) else MISSING


def _signed(v: float) -> str:
    return MISSING if not np.isfinite(v) else ("0" if v == 0 else f"{v:+.3g}")


def section_tradeoff(doc: Doc, cells: pd.DataFrame, qgroups: pd.DataFrame, colours: dict, out: Path) -> None:
    doc.h(2, "What you give up for what you save")
    table = settings_table(qgroups, cells)
    if table.empty:
        doc.p("No quality cells in this selection.")
        return
    doc.p("Every quality setting (a variant at one value of its knobs) next to its cost: the kernel "
          "cells of the same variant, knob values and n (medians). Per task and length: the quality "
          "(mean ± std over seeds), its difference from the best exact variant's, the baseline it must "
          "beat, and forward time, forward+backward time and forward peak memory as ratios to the "
          "cheapest exact variant at that n (below 1×: cheaper; in brackets the ratio's 95 % CI from "
          f"the two medians' CIs; {FLAG}: a kernel cell behind the time is not `stable`). For a trained "
          "task with no accuracy "
          "floor (code_lm), how much the training loss still fell over the last quarter of the steps "
          "(mean of the third quarter minus the last, over the last): a setting well above 1 % was "
          "still learning when its budget ended.")
    compared = compare(table)
    has_cost = np.isfinite(compared[[c for c, _, _ in COSTS]].astype(float)).any(axis=1)
    costed = has_cost.groupby([compared["task"], compared["n"]]).transform("any")
    notes = [f"{task}, n = {n:,}: no kernel cell of any of its settings at this length; left out"
             for (task, n), _ in compared[~costed].groupby(["task", "n"], sort=True)]
    compared = compared[costed]
    for (task, n), g in compared.groupby(["task", "n"], sort=True):
        metric = g["metric"].iloc[0]
        doc.h(3, f"{task}, n = {n:,}: {metric} ({'↑' if g['higher_is_better'].iloc[0] else '↓'} better)")
        if not g["best_exact"].notna().any():
            doc.p("No exact variant measured here: no differences or ratios.")
        base = g["baseline_metric"].dropna()
        show_fall = judged_by_plateau(metric) and np.isfinite(g["loss_fall"].astype(float)).any()
        rows = []
        for _, r in g.sort_values(["exact", "model", "fwdbwd_ms"], ascending=[False, True, True]).iterrows():
            rows.append([r["label"], {True: "yes", False: "no"}.get(r["exact"], "unknown"),
                         _quality(r),
                         _signed(r["delta"]), fmt(r["baseline"])]
                        + ([_fall(r["loss_fall"])] if show_fall else [])
                        + [_ratio(r[f"{c}_ratio"], r[f"{c}_ratio_lo"], r[f"{c}_ratio_hi"])
                           + (FLAG if r["cost_flagged"] and c != "peak_mb" else "") for c, _, _ in COSTS])
        doc.table(["setting", "exact", metric, "Δ vs best exact", base.iloc[0] if len(base) else "baseline"]
                  + (["loss fall, last ¼ of steps"] if show_fall else [])
                  + [f"{h} / exact" for _, _, h in COSTS], rows)
        costs = np.isfinite(g[[c for c, _, _ in COSTS]].astype(float))
        missing = g[~costs.any(axis=1)]["label"].tolist()
        if missing:
            notes.append(f"{task}, n = {n:,}: no ok kernel cell of the same setting for "
                         f"{', '.join(missing)} (no cost ratios)")
        forward_only = g[costs["fwd_ms"] & ~costs["fwdbwd_ms"]]["label"].tolist()
        if forward_only:
            notes.append(f"{task}, n = {n:,}: {', '.join(forward_only)}: forward only (its kernel cells have no "
                         "forward+backward figure; section 6 says why), so no time-per-token point")
    if notes:
        doc.bullets(notes)

    for cost, cost_label, kind, name in (("us_per_token", "forward+backward time per token (µs, kernel)",
                                          "time per token", "tradeoff_time.png"),
                                         ("peak_mb", "forward peak memory (MB, kernel)", "peak memory",
                                          "tradeoff_memory.png")):
        path = plot_pareto(tradeoff_panels(compared, cost, cost_label), colours, kind, out / name, curves=True)
        if path:
            doc.figure(path, f"Quality vs {kind} over every setting, one curve per variant (points labelled "
                             "by knob), Pareto front outlined")
    _recommendation(doc, recommend(compared))


def _recommendation(doc: Doc, rec: pd.DataFrame) -> None:
    doc.h(3, "Recommendation")
    if rec.empty:
        doc.p("No length has an exact variant to judge quality against.")
        return
    doc.p("Per task and length, the cheapest setting whose quality is within 1 % and 5 % of the best "
          "exact variant's (relative to it; for `quality/rel_err_vs_exact`, already an error relative "
          "to the exact output, an error of at most 0.01 and 0.05) and that costs less than every exact "
          "setting; its cost as a ratio to the cheapest exact one. Computed from the records above. "
          "A length whose best exact variant is undertrained gets none, since a gap there would "
          "measure the budget, not the variant: below its floor "
          f"({', '.join(f'{m} ≥ {v:g}' for m, v in EXACT_FLOOR.items())}), or, for a metric with no "
          f"floor ({R.VAL_BPC}), a training loss still falling by more than {PLATEAU:.0%} over the last "
          "quarter of its steps.")
    headers, rows = ["task", "n"], []
    combos = list(dict.fromkeys(zip(rec["cost"], rec["cost_words"], rec["tol"])))
    headers += [f"by {words}, within {tol:.0%}" for _, words, tol in combos]
    for (task, n), g in rec.groupby(["task", "n"], sort=True):
        row = [task, f"{n:,}"]
        for cost, _, tol in combos:
            hit = g[(g["cost"] == cost) & (g["tol"] == tol)]
            r = hit.iloc[0] if len(hit) else None
            row.append(MISSING if r is None else NO_COST if not r["costed"] else UNDERTRAINED if not r["trained"]
                       else NONE if pd.isna(r["label"])
                       else f"{r['label']} ({_ratio(r['ratio'])})")
        rows.append(row)
    doc.table(headers, rows)
    whys = rec[~rec["trained"].astype(bool)].drop_duplicates(["task", "n"])
    if len(whys):
        doc.bullets([f"{r['task']}, n = {r['n']:,}: undertrained baseline, {r['why']}" for _, r in whys.iterrows()])
