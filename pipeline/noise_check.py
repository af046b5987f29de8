"""Whether the stability flags catch what another process does to the figures: a small kernel
grid measured on the machine as it is, then beside a continuous and an intermittent CPU hog that
this command starts and stops itself; each cell against its quiet twin, and the targets checked.

    python -m pipeline.noise_check [--lengths 512 1024 2048 4096] [--variants vanilla xformers ssm]
                                   [--conditions quiet continuous intermittent] [--out DIR]   (make noise-check)

The cells run exactly as a sweep runs them (a new process each, measured again while not
stable: pipeline/cell.py measure_until_stable) but are not recorded in MLflow; the table and
`noise_check.json` in --out are the record. Run it on a quiet machine: the first condition is
the reference. Exits 1 when a target fails:

- no cell of a noisy condition that is more than 1.3x its quiet twin is `stable`;
- the quiet condition flags at most one cell;
- a noisy condition's exponent is within ±0.15 of the quiet one wherever every cell behind both
  is stable (enough undisturbed calls remained); elsewhere the exponent is flagged.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline import record as R
from pipeline.cell import measure_until_stable
from pipeline.config import compose, to_dict
from pipeline.isolation import run_isolated
from pipeline.measure import cpu_model_name

SLOWER = 1.3      # a cell this much slower than its quiet twin must not be stable
QUIET_FLAGS = 1   # the quiet condition may flag at most this many cells
EXP_TOL = 0.15    # exponents within this of the quiet ones where enough clean samples remain

# the hogs: one busy process (a core of a 2-core machine); the intermittent one busy for 0.4 s of
# every 1.2 s, so calls before, during and after a burst are all measured
HOGS = {
    "quiet": None,
    "continuous": "while True: pass",
    "intermittent": ("import time\nwhile True:\n    end = time.time() + 0.4\n"
                     "    while time.time() < end: pass\n    time.sleep(0.8)"),
}


@contextlib.contextmanager
def hog(condition: str):
    code = HOGS[condition]
    proc = subprocess.Popen([sys.executable, "-c", code]) if code else None
    try:
        yield
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def measure(model: str, n: int, extra: list[str]) -> dict:
    d = to_dict(compose([f"model={model}", f"seq_len={n}", "backbone=small", "scenario=kernel", *extra]))
    t0 = time.perf_counter()
    r = measure_until_stable(d, lambda: run_isolated(d), say=lambda m: print(f"    {model} n={n}: {m}", flush=True))
    m = r.metrics
    lo, hi = R.ci_names(R.KERNEL_FWD_MS)
    return {"model": model, "n": n, "status": r.status, "fwd_ms": m.get(R.KERNEL_FWD_MS),
            "ci": [m.get(lo), m.get(hi)], "fwdbwd_ms": m.get(R.KERNEL_FWDBWD_MS),
            "stability": r.tags.get(R.STABILITY), "reason": r.tags.get(R.STABILITY_REASON, ""),
            "attempts": m.get(R.CELL_ATTEMPTS), "others_cores": m.get(R.CELL_OTHERS_CORES),
            "left_out": m.get(R.left_out_name(R.KERNEL_FWD_MS)), "wall_s": time.perf_counter() - t0}


def exponent(rows: list[dict]):
    from pipeline.report.analysis import fit_power_law

    ok = [r for r in rows if r["status"] == "ok" and r["fwd_ms"]]
    fit = fit_power_law([r["n"] for r in ok], [r["fwd_ms"] for r in ok],
                        lo=[r["ci"][0] for r in ok], hi=[r["ci"][1] for r in ok])
    return fit, all(r["stability"] == R.STABLE for r in ok if fit and r["n"] in fit.lengths)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--variants", nargs="+", default=["vanilla", "xformers", "ssm"])
    ap.add_argument("--conditions", nargs="+", default=list(HOGS), choices=list(HOGS))
    ap.add_argument("--out", default="reports/noise-check")
    ap.add_argument("overrides", nargs="*", help="config overrides for every cell, e.g. remeasure=1")
    args = ap.parse_args(argv)
    if args.conditions[0] != "quiet":
        ap.error("the first condition must be quiet: it is the reference")
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"[noise-check] {cpu_model_name()}, {os.cpu_count()} CPUs, load average {' '.join(load)} at the start")
    results: dict[str, list[dict]] = {}
    for cond in args.conditions:
        print(f"[noise-check] {cond}: {len(args.variants) * len(args.lengths)} cells", flush=True)
        t0 = time.perf_counter()
        with hog(cond):
            results[cond] = [measure(m, n, args.overrides) for m in args.variants for n in args.lengths]
        print(f"[noise-check] {cond}: {time.perf_counter() - t0:.0f} s", flush=True)

    quiet = {(r["model"], r["n"]): r for r in results["quiet"]}
    failures: list[str] = []
    print(f"\n{'condition':<13} {'variant':<9} {'n':>5} {'fwd ms':>9} {'95% CI':>19} {'x quiet':>8} "
          f"{'stability':<13} {'att':>3} {'left out':>8}  evidence")
    for cond, rows in results.items():
        for r in rows:
            q = quiet.get((r["model"], r["n"]))
            ratio = r["fwd_ms"] / q["fwd_ms"] if r["fwd_ms"] and q and q["fwd_ms"] else None
            ci = f"[{r['ci'][0]:.3g}, {r['ci'][1]:.3g}]" if r["ci"][0] is not None else "—"
            print(f"{cond:<13} {r['model']:<9} {r['n']:>5} {r['fwd_ms'] or float('nan'):>9.3f} {ci:>19} "
                  f"{ratio or float('nan'):>8.2f} {r['stability'] or r['status']:<13} {r['attempts'] or 0:>3.0f} "
                  f"{r['left_out'] or 0:>8.0f}  {r['reason'][:90]}")
            if cond != "quiet" and ratio and ratio > SLOWER and r["stability"] == R.STABLE:
                failures.append(f"{cond} {r['model']} n={r['n']}: {ratio:.2f}x its quiet twin but stable")
    flagged_quiet = [r for r in results["quiet"] if r["stability"] != R.STABLE]
    if len(flagged_quiet) > QUIET_FLAGS:
        failures.append(f"the quiet condition flagged {len(flagged_quiet)} cells (at most {QUIET_FLAGS})")

    print(f"\n{'variant':<9} " + " ".join(f"{c:>28}" for c in results) + "   (fwd time exponent [95% CI] over the 3 largest n)")
    exps = {}
    for model in args.variants:
        cells = []
        for cond, rows in results.items():
            fit, all_stable = exponent([r for r in rows if r["model"] == model])
            exps[(cond, model)] = (fit, all_stable)
            cells.append((fit.describe() if fit else "—") + ("" if all_stable else " flagged"))
        print(f"{model:<9} " + " ".join(f"{c:>28}" for c in cells))
        q_fit, q_stable = exps[("quiet", model)]
        for cond in list(results)[1:]:
            fit, stable = exps[(cond, model)]
            if q_fit and fit and q_stable and stable and abs(fit.exponent - q_fit.exponent) > EXP_TOL:
                failures.append(f"{cond} {model}: exponent {fit.exponent:.2f} vs quiet {q_fit.exponent:.2f}, "
                                f"both from stable cells (tolerance ±{EXP_TOL})")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "noise_check.json").write_text(json.dumps({"cpu": cpu_model_name(), "results": results,
                                                      "failures": failures}, indent=1))
    print(f"\n[noise-check] results: {out / 'noise_check.json'}")
    for f in failures:
        print(f"[noise-check] FAIL {f}")
    print("[noise-check] " + ("every target met" if not failures else f"{len(failures)} target(s) missed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
