"""Repeatability of the kernel measurement: the same cell twice in a row, each in its own
process, and the relative difference of the two medians (forward and forward+backward).
Exits 1 when a median of at least 5 ms differs by more than 10%.

    python -m pipeline.repeatability [--lengths 2048 8192] [--experiment repeatability]   (make repeatability)

Both runs are recorded in MLflow (experiment `repeatability`, `overwrite=true` so the second is
measured, not reused); the table printed last is what the closing figures quote.
"""
from __future__ import annotations

import argparse
import sys

from pipeline import record as R
from pipeline.cell import run_cell
from pipeline.config import compose, to_dict
from pipeline.registry import discover_variants
from pipeline.tracking import Tracker, tracking_uri


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--experiment", default="repeatability")
    ap.add_argument("--variants", nargs="+", default=None)
    args = ap.parse_args(argv)
    variants = args.variants or discover_variants()
    rows = []
    for model in variants:
        for n in args.lengths:
            d = to_dict(compose([f"model={model}", f"seq_len={n}", "backbone=small", "scenario=kernel",
                                 "overwrite=true", f"tracking.experiment={args.experiment}"]))
            for _ in range(2):
                run_cell(d)
            tr = Tracker(tracking_uri(None), args.experiment)
            runs = tr.search(f"tags.{R.MODEL} = '{model}' and params.{R.SEQ_LEN} = '{n}' and tags.{R.STATUS} = 'ok'",
                             max_results=2)
            for metric in (R.KERNEL_FWD_MS, R.KERNEL_FWDBWD_MS):
                vals = [r.data.metrics.get(metric) for r in reversed(runs)]
                if len(vals) < 2 or None in vals:
                    rows.append((model, n, metric, None, None, None))
                    continue
                a, b = vals
                rows.append((model, n, metric, a, b, abs(a - b) / min(a, b)))
    print(f"\n{'variant':<12} {'n':>6} {'median of':<17} {'run 1 ms':>10} {'run 2 ms':>10} {'diff':>7}")
    judged = within = 0
    for model, n, metric, a, b, rel in rows:
        if a is None:
            print(f"{model:<12} {n:>6} {metric:<17} {'not ok / not run':>21}")
            continue
        flag = " (< 5 ms: not judged)" if min(a, b) < 5 else (" ok" if rel <= 0.10 else " > 10%")
        judged += min(a, b) >= 5
        within += min(a, b) >= 5 and rel <= 0.10
        print(f"{model:<12} {n:>6} {metric:<17} {a:>10.2f} {b:>10.2f} {rel:>6.1%}{flag}")
    print(f"\n{within} of {judged} medians of >= 5 ms within 10% of each other")
    return 0 if within == judged else 1


if __name__ == "__main__":
    sys.exit(main())
