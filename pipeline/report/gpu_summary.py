"""The Python side of `make gpu-check` (scripts/gpu_check.sh): what the device offers, what the
check will run, and what it found; the command line of all three.

`summary` (here) reads one sweep back from the MLflow store and prints one screen: per variant
and dtype the forward time at each n, the backend that ran and the fitted time exponents;
xformers against vanilla at the largest n both ran; where vanilla ran out of memory; gradient
checkpointing's memory on/off; then PASS/FAIL checks, exit status 1 when one fails. `probe` and
`plan`, the checks before the sweep, are in gpu_probe.py.

    python -m pipeline.report.gpu_summary {probe --site DIR | plan --grid GRID | summary --experiment E [--sweep ID] [--uri URI]}
"""
from __future__ import annotations

import argparse
import math
import sys
from functools import partial
from pathlib import Path
from typing import Any

from pipeline import record as R
from pipeline.report.format import fmt
from pipeline.report.gpu_probe import plan, probe

FAILED = ("error", "timeout", "diverged")
# a time or size in the summary's fixed-width columns: 3 significant digits, 1074 not 1,074
_num_text = partial(fmt, thousands="", missing="-")


# ============================================================================ summary


def latest_sweep(experiment: str, uri: str) -> str | None:
    """The sweep id of the newest sweep (parent) run in the experiment, or None."""
    from pipeline.report.load import sweep_parent

    run = sweep_parent(experiment, uri)
    return run.data.tags.get(R.SWEEP_ID) if run else None


def planned_cells(experiment: str, sweep: str | None, uri: str) -> int | None:
    """How many cells the sweep's parent run says it planned (its `n_cells` param), or None."""
    from pipeline.report.load import sweep_parent

    run = sweep_parent(experiment, uri, sweep) if sweep else None
    n = run.data.params.get(R.N_CELLS) if run else None
    return int(n) if n is not None and str(n).isdigit() else None


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _col(frame, name: str):
    import pandas as pd

    return frame[name] if name in frame else pd.Series([None] * len(frame), index=frame.index, dtype=object)


def _status_word(status: str) -> str:
    return {"skipped": "skip", "timeout": "t/o", "diverged": "nan"}.get(status, status)


def _first_line(text: Any, width: int = 150) -> str:
    s = str(text or "").strip().splitlines()
    s = s[0] if s else ""
    return s if len(s) <= width else s[: width - 3] + "..."


def summarize(experiment: str, sweep: str | None, uri: str, reference: str = "vanilla",
              efficient: str = "xformers", expect_backend: str = "xformers", out=None) -> int:
    """Print the summary of one sweep (the newest when `sweep` is None); returns the number of
    failed checks."""
    from pipeline.report.analysis import FIT_POINTS, fit_power_law
    from pipeline.report.lines import checkpointing_effect
    from pipeline.report.load import load_runs

    out = out or sys.stdout

    def say(*a):
        print(*a, file=out)

    sweep = sweep or latest_sweep(experiment, uri)
    f = load_runs(experiment, sweep, uri).frame
    f = f.assign(status=_col(f, R.col(R.STATUS)).fillna("?").astype(str),
                 n=_col(f, R.col(R.SEQ_LEN, "param")).map(_num),
                 dtype=_col(f, R.col(R.DTYPE, "param")).fillna("?").astype(str),
                 backend=_col(f, R.col(R.BACKEND)).fillna("").astype(str),
                 model=_col(f, R.col(R.MODEL)).fillna("?").astype(str),
                 scenario=_col(f, R.col(R.SCENARIO)).fillna("?").astype(str))
    reason = R.col(R.FAILURE_REASON)
    # a cell the deadline's SIGINT stopped (gpu_check.sh) was not measured, and did not fail
    cut = (f["status"] == "error") & (_col(f, reason).astype(str) == "interrupted")
    f.loc[cut, "status"] = "cut"
    counts = f["status"].value_counts()
    planned = planned_cells(experiment, sweep, uri)

    def first(tag: str) -> str:
        return next((str(v) for v in _col(f, R.col(tag)).dropna() if str(v)), "?")

    say(f"== gpu-check summary: experiment {experiment}, sweep {sweep or '(all runs)'}")
    say(f"device {first(R.DEVICE_NAME)} | torch {first(R.TORCH_VERSION)} | "
        f"xformers {first(R.XFORMERS_VERSION)} | {len(f)} cells"
        + (f" of {planned} planned" if planned is not None else "") + ": "
        + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if cut.any() or (planned is not None and planned > len(f)):
        say(f"not reached before the deadline: {int(cut.sum())} cut short (interrupted)"
            + (f", {planned - len(f)} never started" if planned is not None and planned > len(f) else ""))

    checks: list[tuple[bool, str]] = []
    kernel = f[f["scenario"] == "kernel"]
    for dtype, d in kernel.groupby("dtype", sort=False):
        lengths = sorted({int(n) for n in d["n"] if math.isfinite(n)})
        say("")
        say(f"kernel, {dtype}: forward ms per n (status where it did not run ok); t ~ n^a fitted over the "
            f"largest {FIT_POINTS} ok lengths")
        bw = max([15] + [len("+".join(sorted({b for b in g[g["status"] == "ok"]["backend"] if b})))
                         for _, g in d.groupby("model")])
        say(f"{'variant':11s} {'backend':{bw}s}" + "".join(f"{n:>9d}" for n in lengths)
            + f"{'a fwd':>8s}{'a f+b':>7s}{'a mem':>7s}")
        for model, m in d.groupby("model", sort=True):
            ok = m[m["status"] == "ok"]
            cells = []
            for n in lengths:
                row = m[m["n"] == n]
                if row.empty:
                    cells.append("")
                elif row["status"].iloc[0] == "ok":
                    cells.append(_num_text(_num(row[R.col(R.KERNEL_FWD_MS)].iloc[0])))
                else:
                    cells.append(_status_word(row["status"].iloc[0]))
            exps = []
            for metric in (R.KERNEL_FWD_MS, R.KERNEL_FWDBWD_MS, R.KERNEL_PEAK_MEM_MB):
                fit = fit_power_law(ok["n"], _col(ok, R.col(metric)).map(_num)) if len(ok) else None
                exps.append(f"{fit.exponent:.2f}" if fit else "-")
            backends = "+".join(sorted({b for b in ok["backend"] if b})) or "-"
            say(f"{model:11s} {backends:{bw}s}" + "".join(f"{c:>9s}" for c in cells)
                + f"{exps[0]:>8s}{exps[1]:>7s}{exps[2]:>7s}")
        _compare(d, dtype, reference, efficient, say)
        _memory_limit(d, dtype, reference, say)

    # --- checks on the bf16 kernel grid (the one gpu_check sizes to hit vanilla's memory wall) ---
    half = kernel[kernel["dtype"] == "bfloat16"]
    # bf16 cells: kernels in backbone.dtype bfloat16, training under Lightning's bf16 precision
    bf16 = ((f["scenario"] == "kernel") & (f["dtype"] == "bfloat16")) | (
        (f["scenario"] != "kernel") & _col(f, R.col(R.PRECISION, "param")).astype(str).str.startswith("bf16"))
    eff = f[(f["model"] == efficient) & (f["status"] == "ok") & bf16]
    wrong = eff[eff["backend"] != expect_backend]
    for text in sorted(set(_col(eff, R.col(R.BACKEND_DETAIL)).dropna().astype(str))):
        say(f"{efficient} operator: {text}")
    for text in sorted(set(_col(wrong, R.col(R.BACKEND_NOTE)).dropna().astype(str))):
        say(f"{efficient} fell back because: {text}")
    checks.append((len(eff) > 0 and wrong.empty,
                   f"{efficient} reports backend `{expect_backend}` in every bf16 cell that ran "
                   f"({len(eff)} cells" + (f"; other: {', '.join(sorted(set(wrong['backend'])))}" if len(wrong) else "")
                   + ")"))
    ref = half[half["model"] == reference].sort_values("n")
    limit = ref[ref["status"].isin(["oom", "skipped"])]
    checks.append((not limit.empty and (ref["status"] == "ok").any(),
                   f"{reference} bf16 ran, then hit the memory limit within the grid"
                   + (f" (first at n={int(limit['n'].iloc[0])}: {limit['status'].iloc[0]})" if len(limit) else "")))
    e16 = half[(half["model"] == efficient) & (half["status"] != "cut")]
    checks.append((len(e16) > 0 and (e16["status"] == "ok").all(),
                   f"{efficient} bf16 ran at every length the sweep reached"
                   + (f", up to n={int(e16['n'].max())}" if len(e16) else "")
                   + ("" if (e16["status"] == "ok").all() else
                      f" (not at n={','.join(str(int(n)) for n in e16[e16['status'] != 'ok']['n'])})")))

    # --- training with gradient checkpointing off/on ---
    train = f[f["scenario"].isin(["train", "full"])]
    effect = checkpointing_effect(train) if len(train) else None
    if effect is not None and len(effect):
        say("")
        say("training, gradient checkpointing off -> on: peak memory and step time")
        say(f"{'variant':11s} {'n':>6s} {'backend':15s} {'peak MB off':>12s} {'on':>9s} {'saved':>7s} "
            f"{'step ms off':>12s} {'on':>8s} {'added':>7s}")
        for _, r in effect.iterrows():
            be = "+".join(sorted({b for b in train[(train["model"] == r["variant"].split(" ")[0])
                                                   & (train["status"] == "ok")]["backend"] if b})) or "-"
            say(f"{r['variant']:11s} {int(r['n']):6d} {be:15s} {r['mem_off_mb']:12.0f} {r['mem_on_mb']:9.0f} "
                f"{-r['mem_saved_pct']:+6.0f}% {r['step_off_ms']:12.1f} {r['step_on_ms']:8.1f} {r['time_added_pct']:+6.0f}%")
        saved = all(r["mem_on_mb"] < r["mem_off_mb"] for _, r in effect.iterrows())
        checks.append((saved, "gradient checkpointing lowered training peak memory: "
                       + ", ".join(f"{r['variant']} {-r['mem_saved_pct']:+.0f}%" for _, r in effect.iterrows())))
    else:
        checks.append((False, "gradient checkpointing: no training pair (off and on) ran ok"))

    bad = f[f["status"].isin(FAILED)]
    checks.append((bad.empty, "no cell ended in error, timeout or divergence"
                   + ("" if bad.empty else ": " + "; ".join(
                       f"{r['model']} n={int(r['n'])} {r['scenario']} {r['status']}: {_first_line(_col(bad, reason)[i], 100)}"
                       for i, r in bad.iterrows()))))

    say("")
    say("checks")
    for ok, text in checks:
        say(f"  {'PASS' if ok else 'FAIL'}  {text}")
    failed = sum(not ok for ok, _ in checks)
    say(f"result: {len(checks) - failed}/{len(checks)} checks passed")
    return failed


def _compare(d, dtype: str, reference: str, efficient: str, say) -> None:
    """The efficient variant against the reference at the largest n both ran ok (a metric one
    of them lacks there is compared at the largest n both have it, and says so)."""
    from pipeline.report.analysis import median_per_n, ratio_at_largest

    ok = d[d["status"] == "ok"]
    a, b = ok[ok["model"] == reference], ok[ok["model"] == efficient]
    common = sorted(set(a["n"]) & set(b["n"]))
    if not common:
        if len(a) or len(b):
            say(f"{efficient} vs {reference} ({dtype}): no length where both ran ok")
        return
    n = common[-1]
    parts = []
    for label, metric, unit in (("forward", R.KERNEL_FWD_MS, "ms"), ("forward+backward", R.KERNEL_FWDBWD_MS, "ms"),
                                ("forward peak memory", R.KERNEL_PEAK_MEM_MB, "MB")):
        na, ya = median_per_n(a["n"], _col(a, R.col(metric)).map(_num))
        nb, yb = median_per_n(b["n"], _col(b, R.col(metric)).map(_num))
        ratio = ratio_at_largest(nb, yb, na, ya)  # reference / efficient: above 1, efficient is better
        if ratio.value is None:
            continue
        ta, tb = float(ya[na == ratio.n][0]), float(yb[nb == ratio.n][0])
        if metric == R.KERNEL_PEAK_MEM_MB:
            how = f"{ratio.value:.0f}x smaller" if ratio.value >= 1 else f"{1 / ratio.value:.1f}x larger"
        else:
            how = f"{ratio.value:.1f}x faster" if ratio.value >= 1 else f"{1 / ratio.value:.1f}x slower"
        where = "" if ratio.n == n else f", at n={ratio.n}"
        parts.append(f"{label} {how} ({_num_text(ta)} vs {_num_text(tb)} {unit}{where})")
    say(f"{efficient} vs {reference} ({dtype}) at n={int(n)}, the largest both ran: " + "; ".join(parts))


def _memory_limit(d, dtype: str, reference: str, say) -> None:
    """Where the reference stopped: its first cell that did not run ok, and why."""
    ref = d[d["model"] == reference].sort_values("n")
    skipped = R.col(R.FWDBWD_SKIPPED)
    for _, r in ref.iterrows():
        if r["status"] != "ok":
            say(f"{reference} ({dtype}) n={int(r['n'])}: {r['status']}: {_first_line(r.get(R.col(R.FAILURE_REASON)))}")
        elif isinstance(r.get(skipped), str):  # forward measured, forward+backward not
            say(f"{reference} ({dtype}) n={int(r['n'])}: forward ok, forward+backward not run: "
                f"{_first_line(r[skipped])}")


# ============================================================================ entry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.report.gpu_summary", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe", help="torch, CUDA, GPU and one xformers bf16 call")
    p.add_argument("--site", type=Path, default=None, help="folder the carried wheels were installed into")
    p = sub.add_parser("plan", help="expand, compose and validate every cell of a grid")
    p.add_argument("--grid", default="gpu_check")
    p.add_argument("overrides", nargs="*", help="extra overrides, as on the sweep's command line")
    p = sub.add_parser("summary", help="one screen of what a sweep found, with PASS/FAIL checks")
    p.add_argument("--experiment", default="gpu_check")
    p.add_argument("--sweep", default=None, help="sweep id (default: the newest sweep in the experiment)")
    p.add_argument("--uri", default=None, help="tracking URI (default: MLFLOW_TRACKING_URI or the repo's store)")
    p.add_argument("--reference", default="vanilla", help="the exact variant that materialises the scores")
    p.add_argument("--efficient", default="xformers", help="the memory-efficient exact variant")
    p.add_argument("--expect-backend", default="xformers", help="backend the efficient variant must report in bf16")
    args = ap.parse_args(argv)
    if args.cmd == "probe":
        return probe(args.site)
    if args.cmd == "plan":
        return plan(args.grid, args.overrides)
    from pipeline.report.load import tracking_uri

    try:
        failed = summarize(args.experiment, args.sweep, tracking_uri(args.uri), args.reference, args.efficient,
                           args.expect_backend)
    except ValueError as e:  # load_runs: no such experiment, sweep or cell
        print(f"FAIL nothing to summarise: {e}")
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
