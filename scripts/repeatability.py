"""Repeatability of the kernel measurement: the same cell twice in a row, each in its own
process, and the relative difference of the two medians (forward and forward+backward).
Exits 1 when a median of at least 5 ms differs by more than 10%.

    .venv/bin/python scripts/repeatability.py [--lengths 2048 8192] [--experiment repeatability]

Both runs are recorded in MLflow (experiment `repeatability`, `overwrite=true` so the second is
measured, not reused); the table printed last is what the closing figures quote.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hydra import compose, initialize_config_dir

from pipeline.cell import run_cell
from pipeline.config import to_dict
from pipeline.registry import CONF_DIR, discover_variants
from pipeline.tracking import Tracker, tracking_uri


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--experiment", default="repeatability")
    ap.add_argument("--variants", nargs="+", default=None)
    args = ap.parse_args(argv)
    variants = args.variants or discover_variants()
    rows = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for model in variants:
            for n in args.lengths:
                d = to_dict(compose(config_name="config", overrides=[
                    f"model={model}", f"seq_len={n}", "backbone=small", "scenario=kernel",
                    "overwrite=true", f"tracking.experiment={args.experiment}"]))
                for _ in range(2):
                    run_cell(d)
                tr = Tracker(tracking_uri(None), args.experiment)
                runs = tr.search(f"tags.model = '{model}' and params.seq_len = '{n}' and tags.status = 'ok'",
                                 max_results=2)
                for metric in ("kernel/fwd_ms", "kernel/fwdbwd_ms"):
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
