"""What the harness costs: the same kernel cells through the pipeline with each way of starting
a cell's process (`isolation=spawn`, a fresh interpreter; `isolation=fork`, a fork of the warm
server), interleaved cell by cell, and a bare loop over the same mixer in one process with the
cells' allocator setup and thread count. Prints the median `cell/overhead_s` of each mode and
every cell's forward median next to the bare loop's.

    python -m pipeline.overhead [--lengths 64 128 1024] [--variants vanilla ssm]   (make overhead)

The cells go to their own experiment (`overhead`, overwrite=true so every cell is measured).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

from pipeline import record as R
from pipeline.allocator import ALLOCATOR_ENV


def bare_fwd_ms(d: dict, repeats: int = 1) -> float:
    """Median forward of the cell's mixer timed by measure.time_calls in this process, with the
    cell's dtype, shape and timing knobs: what the pipeline's figure must agree with."""
    import torch

    from pipeline.measure import time_calls
    from pipeline.registry import build_mixer
    from pipeline.scenarios.kernel import timing_knobs
    from pipeline.schema import scenario_section, workload
    from pipeline.stability import assess

    w, sc = workload(d), scenario_section(d)
    torch.manual_seed(w.seed)
    dtype = getattr(torch, w.backbone.dtype)
    mixer = build_mixer(w.model, d_model=w.backbone.d_model, n_heads=w.backbone.n_heads, causal=w.causal).to(dtype=dtype)
    x_BTD = torch.randn(w.batch_size, w.seq_len, w.backbone.d_model, dtype=dtype)

    def fwd():
        with torch.no_grad():
            return mixer(x_BTD)

    fwd()
    # the same estimate a cell records: the median over the calls no other process disturbed
    return assess(time_calls(fwd, torch.device("cpu"), **timing_knobs(sc))).median


def _reexec_with_allocator_env() -> None:
    """The bare loop must run under the cells' allocator setup: glibc reads it at start-up."""
    if any(os.environ.get(k) != v for k, v in ALLOCATOR_ENV.items()):
        env = {**os.environ, **ALLOCATOR_ENV}
        os.execve(sys.executable, [sys.executable, "-m", "pipeline.overhead", *sys.argv[1:]], env)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.overhead", description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 1024])
    ap.add_argument("--variants", nargs="+", default=None)
    ap.add_argument("--experiment", default="overhead")
    ap.add_argument("--threads", type=int, default=None, help="trainer.num_threads of every cell (default: all cores)")
    args = ap.parse_args(argv)
    _reexec_with_allocator_env()

    import torch

    from pipeline.cell import run_cell
    from pipeline.config import compose, to_dict
    from pipeline.registry import discover_variants
    from pipeline.tracking import Tracker, tracking_uri

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    variants = args.variants or discover_variants()
    tr = Tracker(tracking_uri(None), args.experiment)
    rows, overhead = [], {"spawn": [], "fork": []}
    for model in variants:
        for n in args.lengths:
            base = [f"model={model}", f"seq_len={n}", "backbone=tiny", "scenario=kernel", "overwrite=true",
                    "scenario.min_time_s=0.3", "scenario.warmup_s=0.1", "scenario.min_repeats=5",
                    f"trainer.num_threads={threads}", f"tracking.experiment={args.experiment}"]
            if model == "longformer":
                base += [f"model.window={min(n, 32)}", f"model.global_tokens={min(n, 4)}"]
            fwd = {}
            for mode in ("spawn", "fork"):
                d = to_dict(compose([*base, f"isolation={mode}"]))
                run_cell(d, quiet=True)
                run = tr.search(f"tags.{R.MODEL} = '{model}' and params.{R.SEQ_LEN} = '{n}' "
                                f"and params.{R.ISOLATION} = '{mode}'", max_results=1)[0]
                m = run.data.metrics
                if run.data.tags.get(R.STATUS) != "ok":
                    print(f"{model} n={n} {mode}: {run.data.tags.get(R.STATUS)} {run.data.tags.get(R.FAILURE_REASON)}")
                    continue
                overhead[mode].append(m[R.CELL_OVERHEAD_S])
                fwd[mode] = (m[R.KERNEL_FWD_MS], m[R.CELL_OVERHEAD_S], m[R.CELL_WALL_S])
            bare = bare_fwd_ms(to_dict(compose(base)))
            rows.append((model, n, fwd, bare))

    print(f"\n{'variant':<11} {'n':>5} | {'spawn fwd ms':>12} {'overhead s':>10} | {'fork fwd ms':>11} "
          f"{'overhead s':>10} | {'bare fwd ms':>11} {'fork/bare':>9}")
    for model, n, fwd, bare in rows:
        s, f = fwd.get("spawn"), fwd.get("fork")
        cols = [f"{model:<11} {n:>5}"]
        cols.append(f"{s[0]:>12.3f} {s[1]:>10.2f}" if s else f"{'-':>12} {'-':>10}")
        cols.append(f"{f[0]:>11.3f} {f[1]:>10.2f}" if f else f"{'-':>11} {'-':>10}")
        cols.append(f"{bare:>11.3f} {f[0] / bare:>9.2f}" if f else f"{bare:>11.3f} {'-':>9}")
        print(" | ".join(cols))
    for mode, vals in overhead.items():
        if vals:
            print(f"median cell/overhead_s, isolation={mode}: {statistics.median(vals):.2f} s over {len(vals)} cells")
    return 0


if __name__ == "__main__":
    sys.exit(main())
