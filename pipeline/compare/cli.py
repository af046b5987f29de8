"""Compare two sweeps cell by cell: every matched cell's figures (forward, forward+backward, peak
memory, decode, train step, infer latency, quality) as new / base with a 95 % CI that carries the
run-to-run variance, a significance test on the raw calls, and a verdict; a regression gate for CI.

    python -m pipeline.compare --base A --new B [--out DIR] [--threshold 0.05]      (make compare)
        A, B: an experiment name or a sweep id, in the project's store or in --base-uri / --new-uri
        --ignore trainer   match cells across an axis (a CPU sweep against a GPU one)
        --fail-on fwd fwdbwd   the figures the gate counts (default: every figure)

Exit status: 0 when no cell is `slower`; 1 when a cell is `slower` in a --fail-on figure (and
both sweeps ran on the same machine: devices side by side are never a regression); 2 on bad input.

The statistics (docs/compare.md):
- a side's value is its cell's recorded median (the median of its rounds where it ran in several);
- the ratio's 95 % CI is new / base · exp(±1.96·σ), σ² = σ_base² + σ_new², each side's σ² the
  square of its median CI's log half-width / 1.96 plus the run-to-run variance σ_run² / rounds.
  σ_run is pooled over the cells the two sweeps ran in several rounds; with no rounds it is
  `--run-noise` (default RUN_NOISE, what A/A pairs of sweeps gave on this kind of machine);
- the test is Mann-Whitney U over the two sides' raw calls (the ones the medians used); where a
  side has no raw calls, a z test of the log ratio against σ;
- `slower` / `faster`: significant (p < alpha) and the whole CI beyond ±threshold (criterion.rs'
  rule); `same`: otherwise; `unstable`: a side's timings are flagged (pipeline/stability.py);
  `missing`: the cell or the figure is on one side only. Peak memory and quality have no calls:
  a change beyond the threshold (and, for memory, MEM_FLOOR_MB) is a change.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.compare.cells import FIGURES, compare
from pipeline.compare.sides import load_side
from pipeline.compare.stats import ALPHA, DRIFT, RUN_NOISE, THRESHOLD


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.compare", description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="experiment name or sweep id of the baseline")
    ap.add_argument("--new", required=True, help="experiment name or sweep id compared against it")
    ap.add_argument("--base-uri", default=None, help="tracking store of --base (default: the project's)")
    ap.add_argument("--new-uri", default=None, help="tracking store of --new (default: --base-uri)")
    ap.add_argument("--out", type=Path, default=None, help="directory for compare.md/.html/.csv "
                    "(default: reports/compare-<base>-vs-<new>)")
    ap.add_argument("--threshold", type=float, default=THRESHOLD, help="changes inside ±this are `same`")
    ap.add_argument("--alpha", type=float, default=ALPHA, help="significance level of the test")
    ap.add_argument("--run-noise", type=float, default=None,
                    help=f"σ of log(median) between runs (default: from rounds, else {RUN_NOISE})")
    ap.add_argument("--drift", type=float, default=DRIFT,
                    help=f"σ of a whole sweep's shift against another (default {DRIFT}; 0 when the two were "
                         "measured interleaved cell by cell, as compare-commits does)")
    ap.add_argument("--ignore", nargs="*", default=[], help="axes (or groups) left out of a cell's identity")
    ap.add_argument("--fail-on", nargs="*", default=[f.name for f in FIGURES], choices=[f.name for f in FIGURES],
                    help="figures whose `slower` fails the gate")
    args = ap.parse_args(argv)
    if not 0 < args.threshold < 1 or not 0 < args.alpha < 1 or (args.run_noise or 0) < 0 or args.drift < 0:
        print("compare: --threshold and --alpha must lie in (0, 1), --run-noise and --drift be ≥ 0", file=sys.stderr)
        return 2
    try:
        base = load_side(args.base, args.base_uri)
        new = load_side(args.new, args.new_uri or args.base_uri)
    except ValueError as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    from pipeline.report.comparison import summary, write_outputs

    cmp = compare(base, new, args.ignore, args.threshold, args.alpha, args.run_noise, drift=args.drift)
    out = args.out or Path("reports") / _slug(f"compare-{args.base}-vs-{args.new}")
    write_outputs(cmp, out, args.fail_on)
    print(summary(cmp, args.fail_on, out))
    if not cmp.same_machine:
        return 0
    return 1 if len(cmp.regressions(args.fail_on)) else 0


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s)[:120]

