"""The report's figures, matplotlib only (no pyplot, no global state): scaling curves with their
fitted slopes (kernel and decode lines), FLOPs against the machine's peak, quality-vs-cost
Pareto panels and the checkpointing bars. Each plot function writes one PNG and returns its
path (None: nothing to draw).

    plot_scaling(lines, R.KERNEL_FWD_MS, "ms", "Forward time", variant_colours(models), out / "t.png")
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import record as R
from pipeline.report.lines import SEQ_LEN, Line


def variant_colours(names: Iterable[str]) -> dict[str, Any]:
    """One colour per variant, fixed by sorted name so every figure agrees."""
    from matplotlib import colormaps

    names = sorted(set(names))
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def _new_figure(ncols: int = 1, width: float = 6.4, height: float = 4.6):
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas for savefig

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _panel_grid(n_panels: int, width: float, height: float):
    """A figure of n panels, at most 3 a row; the panels past n (of the last row) are hidden."""
    from matplotlib.figure import Figure

    ncols = min(n_panels, 3)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, format="png", metadata={"Software": None})
    return path


def _styles(lines: list[Line]) -> dict[str, str]:
    """Line style per combination of non-variant axes (colour is the variant's)."""
    combos = sorted({tuple(sorted((k, str(v)) for k, v in ln.axes.items())) for ln in lines})
    dashes = ["-", "--", ":", "-."]
    return {ln.label: dashes[combos.index(tuple(sorted((k, str(v)) for k, v in ln.axes.items()))) % 4]
            for ln in lines}


_GUIDE_NAMES = {0: "O(1)", 1: "O(n)", 2: "O(n²)"}
_GUIDE_DASHES = {0: (0, (6, 2)), 1: (0, (4, 3)), 2: (0, (1, 2))}


def _guides(ax, n_lo: float, n_hi: float, y_anchor: float, orders: tuple[int, ...] = (1, 2)) -> None:
    """Reference lines n^order (default O(n) and O(n²)) through (n_lo, y_anchor)."""
    xs = np.array([n_lo, n_hi])
    for order in orders:
        name = _GUIDE_NAMES.get(order, f"O(n^{order})")
        ys = y_anchor * (xs / n_lo) ** order
        ax.plot(xs, ys, color="0.55", lw=1, ls=_GUIDE_DASHES.get(order, (0, (2, 2))), zorder=0)
        ax.annotate(name, (xs[1], ys[1]), textcoords="offset points", xytext=(-2, 3), fontsize=8,
                    color="0.35", ha="right", va="bottom")


def plot_scaling(lines: list[Line], metric: str, ylabel: str, title: str, colours: dict,
                 path: Path, xlabel: str = "sequence length n (tokens)",
                 guides: tuple[int, ...] = (1, 2)) -> Path | None:
    """Log-log metric vs n, one line per (kernel or decode) line, fitted exponent in the legend,
    n^order guides through the smallest length (`guides`, default O(n) and O(n²))."""
    fig, (ax,) = _new_figure()
    styles = _styles(lines)
    xs_all, ys_at_min = [], []
    flagged_any = False
    for ln in lines:
        n, y = ln.series(metric)
        if len(n) == 0:
            continue
        fit = ln.fit(metric)
        slope = f", slope {fit.describe()}" if fit else ""
        ax.plot(n, y, marker="o", ms=4, color=colours[ln.model], ls=styles[ln.label],
                label=f"{ln.label}{slope}")
        lo_hi = ln.ci(metric)
        if lo_hi is not None:  # the medians' 95 % CIs as error bars
            ax.errorbar(n, y, yerr=[np.clip(y - lo_hi[0], 0, None), np.clip(lo_hi[1] - y, 0, None)],
                        fmt="none", ecolor=colours[ln.model], elinewidth=1, capsize=2)
        bad = ln.flagged()
        if len(bad) and R.col(metric) in bad:  # cells not stable: a red ring around the point
            ax.plot(bad[SEQ_LEN], bad[R.col(metric)], ls="none", marker="o", ms=10, mfc="none", mec="red",
                    mew=1.2, label=None)
            flagged_any = True
        xs_all.extend(n)
        ys_at_min.append((n[0], y[0]))
    if not xs_all:
        return None
    n_lo, n_hi = min(xs_all), max(xs_all)
    anchor = float(np.exp(np.median([np.log(y) for x, y in ys_at_min if x == n_lo])))
    _guides(ax, n_lo, n_hi, anchor, guides)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    if flagged_any:
        ax.plot([], [], ls="none", marker="o", ms=10, mfc="none", mec="red", label="not stable (see section 6)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_flops(lines: list[Line], colours: dict, path: Path) -> Path | None:
    """Analytic vs counted FLOPs, mixing share of the analytic count, achieved fraction of peak."""
    fig, (a0, a1, a2) = _new_figure(3, width=5.0)
    styles = _styles(lines)
    drawn = False
    for ln in lines:
        c, ls = colours[ln.model], styles[ln.label]
        n, total = ln.series(R.KERNEL_FLOPS_FWD_ANALYTIC)
        if len(n) == 0:
            continue
        drawn = True
        a0.plot(n, total, color=c, ls=ls, marker=".", label=f"{ln.label} analytic")
        nc, counted = ln.series(R.KERNEL_FLOPS_FWD)  # absent or 0 = not counted: no marker
        if len(nc):
            a0.plot(nc, counted, color=c, ls="none", marker="x", ms=7, label=f"{ln.label} counted")
        nm, mix = ln.series(R.KERNEL_FLOPS_FWD_MIXING)
        if len(nm):
            share = 100 * mix / np.interp(nm, n, total)
            a1.plot(nm, share, color=c, ls=ls, marker="o", ms=4, label=ln.label)
        npf, frac = ln.series(R.KERNEL_PEAK_FRACTION)
        if len(npf):
            a2.plot(npf, 100 * frac, color=c, ls=ls, marker="o", ms=4, label=ln.label)
    if not drawn:
        return None
    for ax in (a0, a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length n (tokens)")
        ax.grid(True, alpha=0.3)
    a0.set_yscale("log")
    a0.set_ylabel("forward FLOPs per call")
    a0.set_title("Analytic (line) vs counted (×) FLOPs")
    a0.legend(fontsize=7)
    a1.set_ylabel("mixing share of analytic FLOPs (%)")
    a1.set_ylim(0, 100)
    a1.set_title("Sequence mixing vs projections")
    a2.set_ylabel("achieved / measured GEMM peak (%)")
    a2.set_title("Achieved FLOP/s, fraction of machine peak")
    ys = [v for ln in a2.get_lines() for v in ln.get_ydata() if v > 0]
    if ys and max(ys) / min(ys) > 20:
        a2.set_yscale("log")
    a1.legend(fontsize=7)
    return _save(fig, path)


def plot_pareto(panels: list[dict], colours: dict, xlabel_kind: str, path: Path,
                curves: bool = False) -> Path | None:
    """Quality vs a cost, one panel per (task, n), Pareto front joined by a line. With `curves`,
    the points of one variant (its settings) are joined into its curve, each labelled by the
    points' `knob` text, and the legend names the variants."""
    panels = [p for p in panels if len(p["points"])]
    if not panels:
        return None
    fig, axes = _panel_grid(len(panels), 5.4, 5.2)
    for ax, panel in zip(axes, panels):
        pts = panel["points"]
        named: set[str] = set()
        for _, p in pts.iterrows():
            legend = p["label"]
            if curves:
                legend = p["model"] if p["model"] not in named else "_nolegend_"
                named.add(p["model"])
            ax.errorbar(p["cost"], p["quality"], yerr=p["quality_std"] if p["seeds"] > 1 else None,
                        marker="o", ms=7, color=colours[p["model"]], ls="none", capsize=3,
                        mec="black" if p["front"] else "none", mew=1.5, label=legend)
            if curves and p.get("knob"):
                ax.annotate(p["knob"], (p["cost"], p["quality"]), textcoords="offset points", xytext=(5, 4),
                            fontsize=7, color=colours[p["model"]])
        if curves:
            for model, pm in pts.groupby("model", sort=True):
                pm = pm.sort_values("cost")
                if len(pm) > 1:
                    ax.plot(pm["cost"], pm["quality"], color=colours[model], lw=1, alpha=0.7, zorder=1)
        front = pts[pts["front"]].sort_values("cost")
        ax.plot(front["cost"], front["quality"], color="black", lw=1, ls="--", zorder=0, label="Pareto front")
        spread = pts["cost"].max() / max(pts["cost"].min(), 1e-300)
        if spread > 10:
            ax.set_xscale("log")
        ax.set_xlabel(panel["cost_label"])
        arrow = "↑ better" if panel["higher_is_better"] else "↓ better"
        ax.set_ylabel(f"{panel['metric']} ({arrow})")
        ax.set_title(f"{panel['task']}, n = {panel['n']:,} ({panel['scenario']} cells)")
        ax.grid(True, alpha=0.3)
        # below the panel: inside it would cover points
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.suptitle(f"Quality vs {xlabel_kind} (outlined points: Pareto front)")
    return _save(fig, path)


def plot_checkpointing(effect: pd.DataFrame, colours: dict, path: Path) -> Path | None:
    """Memory saved and step time added by checkpointing, one bar pair per variant and length."""
    if effect.empty:
        return None
    fig, (a0, a1) = _new_figure(2, width=5.5, height=max(3.0, 0.45 * len(effect) + 1.5))
    labels = [f"{r.variant}, n={r.n:,} ({r.task})" for r in effect.itertuples()]
    ys = np.arange(len(effect))
    cols = [colours[v.split(" [")[0]] for v in effect["variant"]]
    for ax, col in ((a0, "mem_saved_pct"), (a1, "time_added_pct")):
        bars = ax.barh(ys, effect[col], color=cols)
        ax.bar_label(bars, labels=[f"{v:+.1f}%" for v in effect[col]], padding=3, fontsize=8)
        ax.margins(x=0.15)
    a0.set_yticks(ys, labels, fontsize=8)
    a1.set_yticks(ys, [""] * len(ys))
    a0.set_xlabel("training peak memory saved (% of off)")
    a1.set_xlabel("training step time added (% of off)")
    a0.set_title("Checkpointing on: memory saved")
    a1.set_title("Checkpointing on: time added")
    for ax in (a0, a1):
        ax.axvline(0, color="black", lw=0.8)
        ax.grid(True, axis="x", alpha=0.3)
        ax.invert_yaxis()
    return _save(fig, path)


def plot_two_term(panels: list[dict], path: Path) -> Path | None:
    """Time vs n, one panel per fitted group, one colour per width D: measured points, the fitted
    two-term curve (solid) and its score and projection terms (dashed, dotted). Each panel is
    {"title", "series": [{"D", "n", "t", optionally "flagged"} plus, when fitted, "grid", "total",
    "score", "proj"]}; flagged points get a red ring."""
    panels = [p for p in panels if p["series"]]
    if not panels:
        return None
    from matplotlib import colormaps

    fig, axes = _panel_grid(len(panels), 5.4, 4.6)
    widths = sorted({s["D"] for p in panels for s in p["series"]})
    cmap = colormaps["viridis"]
    colour = {d: cmap(i / max(len(widths) - 1, 1) * 0.9) for i, d in enumerate(widths)}
    for ax, panel in zip(axes, panels):
        for s in panel["series"]:
            c = colour[s["D"]]
            ax.plot(s["n"], s["t"], "o", ms=4, color=c, label=f"D = {s['D']:,.0f}")
            bad = np.asarray(s.get("flagged", np.zeros(len(s["n"]), bool)), bool)
            if bad.any():  # cells not stable: a red ring, as in the scaling plots
                ax.plot(np.asarray(s["n"])[bad], np.asarray(s["t"])[bad], ls="none", marker="o", ms=10,
                        mfc="none", mec="red", mew=1.2)
            if "grid" in s:
                ax.plot(s["grid"], s["total"], "-", lw=1.2, color=c)
                for part, ls in (("score", "--"), ("proj", ":")):
                    ys = np.where(s[part] > 0, s[part], np.nan)  # a term fitted 0 draws nothing
                    ax.plot(s["grid"], ys, ls=ls, lw=1, color=c)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n (tokens)")
        ax.set_ylabel("forward time (ms)")
        ax.set_title(panel["title"])
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, title="— fit  -- n²·D  ·· n·D²", title_fontsize=7)
    return _save(fig, path)
