"""Standalone forward-time probe of the mixers vs sequence length, with the machine's GEMM peak.

Times each variant's forward (no autograd) at n = n_min .. n_max doubling, fits the log-log
slope over the 3 largest n, and prints useful FLOP/s as a fraction of the fp32 GEMM peak
(torch.mm 2048 x 2048) two ways: all useful FLOPs (projections + mixing) over the forward time,
as the kernel scenario records it, and mixing FLOPs over the forward time minus the time of the
mixer's nn.Linear layers run alone. A quick check of the scaling claims, not the benchmark.

    THP_MEM_ALLOC_ENABLE=1 .venv/bin/python scripts/complexity_probe.py --threads 2 --causal both
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.registry import build_mixer, discover_variants, load_variant_cfg


def median_s(fn, min_reps: int = 5, min_time: float = 1.5, max_reps: int = 30) -> float:
    """Median wall time of fn() after one warm-up call; repeats until both count and time are met."""
    fn()
    samples: list[float] = []
    while len(samples) < min_reps or (sum(samples) < min_time and len(samples) < max_reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def gemm_peak(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / median_s(lambda: a @ b, min_reps=5)


def linear_s(m: torch.nn.Module, x: torch.Tensor) -> float:
    """Time of the mixer's nn.Linear layers alone on a (B, T, D) input (its projections)."""
    lins = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    return median_s(lambda: [lin(x) for lin in lins])


def slope(ns: list[int], ts: list[float]) -> float:
    """Least-squares slope of log t against log n."""
    x, y = [math.log(n) for n in ns], [math.log(t) for t in ts]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="*", default=None, help="default: every conf/model/*.yaml")
    ap.add_argument("--n-min", type=int, default=1024)
    ap.add_argument("--n-max", type=int, default=16384)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--causal", choices=["true", "false", "both"], default="both")
    ap.add_argument("--skip-over-s", type=float, default=60.0, help="stop a variant once a call exceeds this")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    peak = gemm_peak()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, fp32 GEMM peak {peak / 1e9:.1f} GFLOP/s")
    ns = []
    n = args.n_min
    while n <= args.n_max:
        ns.append(n)
        n *= 2
    modes = {"true": [True], "false": [False], "both": [True, False]}[args.causal]
    for causal in modes:
        times: dict[str, dict[int, float]] = {}
        print(f"\n== causal={causal} ==")
        print(f"{'variant':<12}{'n':>7}{'fwd_ms':>11}{'proj_ms':>9}{'tot%':>7}{'mix%':>7}  backend")
        for name in args.variants or discover_variants():
            times[name] = {}
            for n in ns:
                cfg = load_variant_cfg(name, seq_len=n)
                m = build_mixer(cfg, d_model=args.d_model, n_heads=args.heads, causal=causal).eval()
                x = torch.randn(args.batch, n, args.d_model)
                with torch.no_grad():
                    t = median_s(lambda m=m, x=x: m(x))
                    tp = linear_s(m, x)
                times[name][n] = t
                f = m.flops(args.batch, n)
                tot, mix = f["total"] / t / peak, f["mixing"] / max(t - tp, 1e-9) / peak
                print(f"{name:<12}{n:>7}{t * 1e3:>11.1f}{tp * 1e3:>9.1f}{100 * tot:>6.1f}%{100 * mix:>6.1f}%  {m.backend}")
                if t > args.skip_over_s:
                    break
        print("\nslope over the 3 largest n (log t vs log n):")
        for name, tn in times.items():
            top = sorted(tn)[-3:]
            if len(top) >= 2:
                print(f"  {name:<12}{slope(top, [tn[n] for n in top]):.2f}  (n = {top})")
        big = max(ns)
        ref = times.get("xformers", {}).get(big)
        if ref:
            print(f"speed-up over xformers at n={big} (t_xformers / t_variant):")
            for name, tn in times.items():
                if big in tn and name != "xformers":
                    print(f"  {name:<12}{ref / tn[big]:.2f}x")

if __name__ == "__main__":
    main()
