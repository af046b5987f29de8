"""`python -m pipeline.conformance [overrides] [--checks ...]`: one line per check, exit 1 on any
failure, 2 on a bad config (the package's docstring lists the checks)."""
from __future__ import annotations

import time

from pipeline.conformance.checks import CHECKS, LENGTHS, run_check
from pipeline.conformance.subject import Subject


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m pipeline.conformance",
                                 description="Check a sequence mixer: one line per check, exit 1 on any failure.")
    ap.add_argument("overrides", nargs="*", help="config overrides as for pipeline.run: model=custom "
                    "model._target_=pkg.module.Class, model.<knob>=..., causal=false, backbone.n_kv_heads=2")
    ap.add_argument("--d-model", type=int, default=64, help="model width D of the mixer under test (default 64)")
    ap.add_argument("--heads", type=int, default=4, help="query heads H (default 4)")
    ap.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of: {', '.join(CHECKS)}")
    args = ap.parse_args(argv)
    names = [c for c in args.checks.split(",") if c]
    unknown = [c for c in names if c not in CHECKS]
    if unknown:
        print(f"conformance: unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    from pipeline.config import compose, to_dict
    from pipeline.schema import check

    overrides = list(args.overrides)
    if not any(o.lstrip("+").startswith("seq_len=") for o in overrides):
        overrides.append(f"seq_len={LENGTHS[-1]}")  # knobs relative to n resolve at the longest length checked
    try:
        d = to_dict(compose(overrides))
        check(d)
        kv = (d.get("backbone") or {}).get("n_kv_heads")
        s = Subject(model=d["model"], d_model=args.d_model, n_heads=args.heads, n_kv_heads=kv,
                    causal=bool(d.get("causal", True)))
        m = s.build()
    except Exception as e:  # noqa: BLE001 - a bad config or target: one line, before any check runs
        print(f"conformance: {(str(e).strip().splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        return 2
    cls = type(getattr(m, "inner", m))
    kv_text = f", {kv} key/value heads" if kv not in (None, args.heads) else ""
    print(f"conformance of {cls.__module__}.{cls.__qualname__} as model={s.model.get('name')} (D={s.d_model}, "
          f"{s.n_heads} heads{kv_text}, {'causal' if s.causal else 'bidirectional'}, {s.device})", flush=True)
    t0, outcomes = time.perf_counter(), []
    for name in names:
        outcomes.append(run_check(name, s))
        print(outcomes[-1].line(), flush=True)
    counts = {k: sum(o.status == k for o in outcomes) for k in ("pass", "fail", "info", "skip")}
    print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['info']} measured, {counts['skip']} skipped "
          f"in {time.perf_counter() - t0:.1f} s", flush=True)
    return 1 if counts["fail"] else 0


def _with_allocator_setup() -> None:
    """Run again under the allocator setup every measuring process uses (pipeline/allocator.py),
    which the C library and torch read at start: the timed checks then time what cells time."""
    import os
    import sys

    from pipeline.allocator import ALLOCATOR_ENV

    if any(os.environ.get(k) != v for k, v in ALLOCATOR_ENV.items()):
        os.execve(sys.executable, [sys.executable, "-m", "pipeline.conformance", *sys.argv[1:]],
                  {**os.environ, **ALLOCATOR_ENV})


if __name__ == "__main__":
    _with_allocator_setup()
    raise SystemExit(main())
