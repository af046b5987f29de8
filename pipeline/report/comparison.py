"""The comparison's outputs (pipeline/compare.py): compare.md, a self-contained compare.html with
one ratio plot per figure, compare.csv (one row per cell and figure) and the summary printed on
stdout.

    write_outputs(cmp, Path("reports/compare-a-vs-b"), fail_on); print(summary(cmp, fail_on, out))
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.report.document import Doc
from pipeline.report.format import fmt

COLOURS = {"slower": "tab:red", "faster": "tab:green", "same": "tab:gray", "unstable": "tab:orange"}
LISTED = 25  # cells listed by name in the summary


def first_line(cmp) -> str:
    """Same machine or devices side by side: what the ratios mean, said before anything else."""
    b, n = cmp.base.machines(), cmp.new.machines()
    if cmp.same_machine:
        return (f"same machine: {', '.join(b)}; a ratio is a change between the two sweeps "
                f"(code {_commits(cmp.base)} → {_commits(cmp.new)})")
    return (f"devices side by side: base ran on {', '.join(b)}; new on {', '.join(n)}. The ratios "
            "compare the machines and are never read as a regression (the gate is off)")


def _commits(side) -> str:
    c = side.commits()
    return ", ".join(s[:12] for s in c[:3]) + (" …" if len(c) > 3 else "") if c else "unknown"


def _ratio_text(r: pd.Series) -> str:
    if not np.isfinite(r["ratio"]):
        return "—"
    if np.isfinite(r["ci_lo"]) and r["ci_lo"] != r["ci_hi"]:
        return f"{r['ratio']:.3f} [{r['ci_lo']:.3f}, {r['ci_hi']:.3f}]"
    return f"{r['ratio']:.3f}"


def _p_text(p: float) -> str:
    if not np.isfinite(p):
        return "—"
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def counts(cmp) -> pd.DataFrame:
    """Verdicts per figure (rows) in the order of VERDICTS."""
    from pipeline.compare import VERDICTS

    r = cmp.rows
    t = pd.crosstab(r["figure"], r["verdict"]).reindex(columns=list(VERDICTS), fill_value=0)
    order = [f for f in dict.fromkeys(r["figure"])]
    return t.reindex(order)


def _setup(cmp) -> list[str]:
    out = [first_line(cmp)]
    for name, s in (("base", cmp.base), ("new", cmp.new)):
        where = f"sweep `{s.sweep_id}`" if s.sweep_id else "latest run per cell"
        out.append(f"{name}: `{s.spec}` (experiment `{s.experiment}`, {where}, {len(s.frame)} runs) in `{s.uri}`")
    out.append(f"cells matched on {len(cmp.keys)} params (every axis, the length, the seed; not the round, timing "
               "settings or switches)" + (f", ignoring {', '.join(cmp.ignored)}" if cmp.ignored else ""))
    out.append(f"threshold ±{100 * cmp.threshold:g} %, significance level {cmp.alpha:g}; a whole sweep's drift "
               f"σ = {100 * cmp.drift:.1f} % a side" + (" (--drift; 0: measured interleaved)" if cmp.drift else
                                                          " (the sides were measured interleaved)"))
    shown = set(cmp.rows["figure"])
    out.append("run-to-run noise σ per run: " + "; ".join(
        f"{f} {100 * v:.1f} % ({cmp.run_noise_source[f]})" for f, v in cmp.run_noise.items() if f in shown))
    return out + list(cmp.notes) + [f"{name}: {n}" for name, s in (("base", cmp.base), ("new", cmp.new))
                                     for n in s.notes]


def aa_spread(cmp) -> str:
    """The ratios' spread over the cells of each timed figure: on an A/A pair it measures the
    run-to-run noise (σ per run = robust σ of log ratio / √2), which --run-noise takes."""
    out = []
    for fig, g in cmp.rows[cmp.rows["verdict"].isin(["same", "slower", "faster"])].groupby("figure", sort=False):
        lr = np.log(g["ratio"].astype(float).dropna())
        lr = lr[np.isfinite(lr)]
        if len(lr) < 5 or g["test"].eq("none (no calls)").all():
            continue
        q = np.percentile(np.exp(lr), [0, 5, 50, 95, 100])
        mad = 1.4826 * float(np.median(np.abs(lr - np.median(lr))))
        out.append(f"{fig}: ratios over {len(lr)} cells min {q[0]:.3f}, 5 % {q[1]:.3f}, median {q[2]:.3f}, "
                   f"95 % {q[3]:.3f}, max {q[4]:.3f}; robust σ of log ratio {100 * mad:.1f} % "
                   f"(if this is an A/A pair: ≈ {100 * mad / np.sqrt(2):.1f} % per run around the median, "
                   f"and the median's shift is the sweeps' drift)")
    return "\n".join(out)


def summary(cmp, fail_on: Sequence[str], out: Path | None = None) -> str:
    """One screen: what is compared, verdict counts per figure, the cells that changed, the gate."""
    lines = [f"attnbench compare: {cmp.base.spec} → {cmp.new.spec}"] + [f"  {s}" for s in _setup(cmp)]
    t = counts(cmp)
    lines.append("")
    lines.append(f"  {'figure':<16}" + "".join(f"{v:>10}" for v in t.columns))
    for fig, row in t.iterrows():
        lines.append(f"  {fig:<16}" + "".join(f"{int(x):>10}" for x in row))
    changed = cmp.rows[cmp.rows["verdict"].isin(["slower", "faster"])].sort_values("ratio", ascending=False)
    if len(changed):
        lines.append("")
        for _, r in changed.head(LISTED).iterrows():
            lines.append(f"  {r['verdict']:<7} {r['figure']:<14} {r['cell']:<32} {r['line']:<28} "
                         f"{_ratio_text(r)}  p={_p_text(r['p'])}")
        if len(changed) > LISTED:
            lines.append(f"  … {len(changed) - LISTED} more in compare.csv")
    spread = aa_spread(cmp)
    if spread:
        lines += [""] + [f"  {s}" for s in spread.splitlines()]
    reg = cmp.regressions(fail_on)
    lines.append("")
    if not cmp.same_machine:
        lines.append("  gate: off (devices side by side)")
    else:
        lines.append(f"  gate ({', '.join(fail_on)}): " + (f"FAIL, {len(reg)} slower" if len(reg) else "pass"))
    if out is not None:
        lines.append(f"  written: {out / 'compare.md'}, compare.html, compare.csv")
    return "\n".join(lines)


def plot_ratios(g: pd.DataFrame, title: str, threshold: float, path: Path) -> Path | None:
    """Each cell's ratio with its CI on a log axis, sorted, coloured by verdict; 1 and ±threshold marked."""
    from matplotlib.figure import Figure

    g = g[np.isfinite(g["ratio"].astype(float))].sort_values("ratio")
    if g.empty:
        return None
    labels = [f"{c} {line}".strip()[:70] for c, line in zip(g["cell"], g["line"])]
    height = max(2.5, 0.17 * len(g) + 1.2)
    fig = Figure(figsize=(9.0, height))
    left = min(0.6, 0.09 + 0.0062 * max(len(s) for s in labels))  # room for the labels, no layout engine
    fig.subplots_adjust(left=left, right=0.97, top=1 - 0.45 / height, bottom=0.6 / height)
    ax = fig.subplots()
    y = np.arange(len(g))
    lo = np.where(np.isfinite(g["ci_lo"]), g["ci_lo"], g["ratio"])
    hi = np.where(np.isfinite(g["ci_hi"]), g["ci_hi"], g["ratio"])
    for verdict, colour in COLOURS.items():
        m = (g["verdict"] == verdict).to_numpy()
        if m.any():
            r = g["ratio"].to_numpy(float)[m]
            ax.errorbar(r, y[m], xerr=[np.clip(r - lo[m], 0, None), np.clip(hi[m] - r, 0, None)], fmt="o",
                        ms=3.5, color=colour, ecolor=colour, capsize=2, label=verdict)
    ax.axvline(1.0, color="black", lw=0.8)
    for x in (1 + threshold, 1 / (1 + threshold)):
        ax.axvline(x, color="black", lw=0.6, ls="--")
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter, StrMethodFormatter

    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    ax.xaxis.set_minor_formatter(StrMethodFormatter("{x:g}") if hi.max() / lo.min() < 3 else NullFormatter())
    ax.set_yticks(y, labels, fontsize=6)
    ax.set_ylim(-0.7, len(g) - 0.3)
    ax.set_xlabel("new / base (95 % CI)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=90, format="png", metadata={"Software": None})
    return path


def write_outputs(cmp, out: Path, fail_on: Sequence[str]) -> None:
    from pipeline.compare import BY_NAME

    out.mkdir(parents=True, exist_ok=True)
    cmp.rows.to_csv(out / "compare.csv", index=False)
    doc = Doc()
    doc.h(1, f"attnbench compare: {cmp.base.spec} → {cmp.new.spec}")
    doc.bullets(_setup(cmp))
    t = counts(cmp)
    doc.h(2, "Verdicts")
    doc.p("`slower` / `faster`: the change is significant (the test's p under the level) and its whole "
          "95 % CI lies beyond ±threshold; `same`: otherwise; `unstable`: a side's timings are flagged "
          "(docs/measurement.md); `missing`: on one side only. For peak memory and quality, `slower` means "
          "more memory or a worse loss / error. How the CI and the test are made: docs/compare.md.")
    doc.table(["figure"] + list(t.columns), [[f] + [int(x) for x in row] for f, row in t.iterrows()])
    reg = cmp.regressions(fail_on)
    doc.p(("Gate: off, the sweeps ran on different machines." if not cmp.same_machine else
           f"Gate over {', '.join(fail_on)}: " + (f"**fails**, {len(reg)} cell figure(s) slower." if len(reg)
                                                  else "passes.")))
    spread = aa_spread(cmp)
    if spread:
        doc.h(3, "Spread of the ratios")
        doc.bullets(spread.splitlines())
    for name, g in cmp.rows.groupby("figure", sort=False):
        if name == "-":
            continue
        fig = BY_NAME[name]
        doc.h(2, fig.label)
        png = plot_ratios(g, fig.label, cmp.threshold, out / f"ratio_{name}.png")
        if png:
            doc.figure(png, f"{fig.label}: new / base per cell with its 95 % CI; dashed: ±threshold")
        g = g.sort_values(["verdict", "ratio"], ascending=[True, False])
        doc.table(["cell", "line", "base", "new", "ratio [95 % CI]", "p", "test", "verdict", "note"],
                  [[r["cell"], r["line"] or "—", fmt(r["base"]), fmt(r["new"]), _ratio_text(r), _p_text(r["p"]),
                    r["test"] or "—", r["verdict"], r["note"] or ""] for _, r in g.iterrows()])
    lone = cmp.rows[cmp.rows["figure"] == "-"]
    if len(lone):
        doc.h(2, "Cells without a figure on either side")
        doc.table(["cell", "line", "note"], [[r["cell"], r["line"] or "—", r["note"]] for _, r in lone.iterrows()])
    (out / "compare.md").write_text(doc.markdown())
    (out / "compare.html").write_text(doc.html(f"attnbench compare: {cmp.base.spec} → {cmp.new.spec}"))
