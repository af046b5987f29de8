"""The Python side of `make gpu-check` (scripts/gpu_check.sh): what the device offers, what the
check will run, and what it found.

- `probe`: torch, CUDA and the GPU; the carried wheels' requirements against the image's
  packages; one bf16 `xformers.ops.memory_efficient_attention` call on CUDA, checked against
  PyTorch's SDPA and timed, with the xFormers operator its dispatcher picks.
- `plan`: every cell of a grid, expanded as the sweeper does (pipeline/sweep.py), composed and
  validated (no GPU, no torch import): the check fails here, on a laptop, not on the device.
- `summary`: one screen read back from the MLflow store: per variant and dtype the forward time
  at each n, the backend that ran and the fitted time exponent; xformers against vanilla at the
  largest n both ran; where vanilla ran out of memory; gradient checkpointing's memory on/off;
  then PASS/FAIL checks (exit status 1 when one fails).

    python scripts/gpu_summary.py probe --site /tmp/site
    python scripts/gpu_summary.py plan --grid gpu_check
    python scripts/gpu_summary.py summary --experiment gpu_check --uri sqlite:////tmp/x/mlflow.db
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# packages whose versions the check depends on, printed by `probe`
VERSIONS = ("torch", "xformers", "pytorch-lightning", "hydra-core", "omegaconf", "mlflow-skinny",
            "sqlalchemy", "alembic", "pydantic", "typing-extensions", "protobuf", "numpy", "pandas")
FAILED = ("error", "timeout", "diverged")


# ============================================================================ probe


def _carried_requirements(site: Path) -> list[str]:
    """Requirements of the distributions installed under `site` that the environment does not
    meet (the device has no resolver: --no-deps installs). One line each."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    problems = []
    carried = list(metadata.distributions(path=[str(site)]))
    for dist in carried:
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = metadata.version(req.name)  # first on sys.path: the carried copy, else the image's
            except metadata.PackageNotFoundError:
                problems.append(f"{dist.metadata['Name']} needs {req}: not installed")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append(f"{dist.metadata['Name']} needs {req}, found {canonicalize_name(req.name)} {have}")
    return problems


def probe(site: Path | None) -> int:
    """Print the device's facts; exit 1 unless xFormers' kernel runs a bf16 CUDA call."""
    from importlib import metadata

    import torch

    print(f"python {sys.version.split()[0]} at {sys.executable}")
    for name in VERSIONS:
        try:
            print(f"  {name:18s} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            print(f"  {name:18s} not installed")
    print(f"torch CUDA build {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
          f"CUDA available: {torch.cuda.is_available()}")
    if site is not None:
        problems = _carried_requirements(site)
        print(f"carried wheels in {site}: " + ("every requirement met" if not problems else
                                              f"{len(problems)} requirement(s) not met by the image:"))
        for p in problems:
            print(f"  WARN {p}")
    if not torch.cuda.is_available():
        print("FAIL no CUDA device: nothing to probe")
        return 1
    dev = torch.device("cuda", 0)
    props = torch.cuda.get_device_properties(dev)
    free, total = torch.cuda.mem_get_info(dev)
    print(f"GPU {props.name}: compute capability {props.major}.{props.minor}, {props.multi_processor_count} SMs, "
          f"{total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free)")

    try:
        import xformers
        import xformers.ops as xops
    except Exception as e:  # noqa: BLE001 - any import failure is the finding
        print(f"FAIL xformers does not import: {type(e).__name__}: {e}")
        return 1
    print(f"xformers {xformers.__version__} from {Path(xformers.__file__).parent}")
    from models.xformers_attn import xformers_build_note  # what the xformers variant does too

    note = xformers_build_note()
    print(f"xformers build: {note or 'C++ extension loaded'}")
    B, T, H, K = 1, 4096, 4, 64
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, T, H, K, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    bias = xops.LowerTriangularMask()
    try:
        from xformers.ops.fmha.common import Inputs
        from xformers.ops.fmha.dispatch import _dispatch_fw

        op = _dispatch_fw(Inputs(query=q, key=k, value=v, attn_bias=bias), needs_gradient=False).NAME
    except Exception as e:  # noqa: BLE001 - the operator name is information only
        op = f"(not determined: {type(e).__name__}: {e})"
    try:
        y = xops.memory_efficient_attention(q, k, v, attn_bias=bias)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        print(f"FAIL xformers.ops.memory_efficient_attention on bf16 CUDA: {type(e).__name__}: {e}")
        return 1
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(), is_causal=True
    ).transpose(1, 2)
    err = (y.float() - ref).abs().max().item()
    times = []
    for _ in range(10):
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        xops.memory_efficient_attention(q, k, v, attn_bias=bias)
        t1.record()
        t1.synchronize()
        times.append(t0.elapsed_time(t1))
    ms = sorted(times)[len(times) // 2]
    tflops = 4 * B * H * T * T * K / 2 / (ms * 1e-3) / 1e12
    ok = err < 2e-2
    print(f"{'PASS' if ok else 'FAIL'} xformers memory_efficient_attention bf16 causal (B={B}, T={T}, H={H}, K={K}) "
          f"ran on {props.name} with operator {op}: max |err| vs fp32 SDPA {err:.2e}, "
          f"median {ms:.3f} ms ({tflops:.0f} TFLOP/s)")
    return 0 if ok else 1


# ============================================================================ plan


def plan(grid: str, extra: list[str]) -> int:
    """Expand `grid` as the sweeper does, compose and validate every cell, print what will run."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    import pipeline  # noqa: F401 - registers the config resolvers
    from pipeline.config import ConfigError, to_dict
    from pipeline.sweep import check_cell, expand_grids

    arguments = [f"grid={grid}", *extra]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        master = compose(config_name="config", overrides=arguments, return_hydra_config=True)
        grids = OmegaConf.to_container(master.hydra.sweeper.grids, resolve=False) or [{}]
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        jobs = expand_grids(parser, grids, arguments)
        groups: dict[tuple, list[str]] = {}
        checked_tasks: set = set()
        for job in jobs:
            d = to_dict(compose(config_name="config", overrides=job))
            try:
                check_cell(d, checked_tasks)  # what the sweeper checks before its first cell
            except ConfigError as e:
                print(f"FAIL cell does not validate: {e} (cell: {' '.join(job)})")
                return 1
            key = (d["scenario"]["name"], d["backbone"]["dtype"], d["trainer"].get("precision"), d["model"]["name"])
            ckpt = "+ckpt" if d["trainer"].get("grad_checkpointing") else ""
            groups.setdefault(key, []).append(f"{d['seq_len']}{ckpt}")
    print(f"grid={grid}: {len(jobs)} cells in {len(grids)} grids, every one composes and validates")
    for (scenario, dtype, precision, model), lengths in groups.items():
        what = f"{scenario:7s} {model:11s} dtype={dtype:9s}"
        if scenario != "kernel":
            what += f" precision={precision}"
        print(f"  {what} n={','.join(lengths)}")
    print(f"cells: {len(jobs)}")
    return 0


# ============================================================================ summary


def _sweep_run(experiment: str, uri: str, sweep: str | None = None):
    """The parent run of sweep `sweep` (None: of the newest sweep) in the experiment, or None."""
    from mlflow.tracking import MlflowClient

    from pipeline.report import SWEEP_ROLE_TAG

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    query = f"tags.`{SWEEP_ROLE_TAG}` = 'sweep'" + (f" and tags.sweep_id = '{sweep}'" if sweep else "")
    runs = client.search_runs([exp.experiment_id], query, max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def latest_sweep(experiment: str, uri: str) -> str | None:
    """The sweep id of the newest sweep (parent) run in the experiment, or None."""
    run = _sweep_run(experiment, uri)
    return run.data.tags.get("sweep_id") if run else None


def _num(v: Any) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return math.nan
    return x


def _fmt_ms(x: float) -> str:
    if not math.isfinite(x):
        return "-"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _col(frame, name: str):
    import pandas as pd

    return frame[name] if name in frame else pd.Series([None] * len(frame), index=frame.index, dtype=object)


def _status_word(status: str) -> str:
    return {"skipped": "skip", "timeout": "t/o", "diverged": "nan"}.get(status, status)


def planned_cells(experiment: str, sweep: str | None, uri: str) -> int | None:
    """How many cells the sweep's parent run says it planned (its `n_cells` param), or None."""
    run = _sweep_run(experiment, uri, sweep) if sweep else None
    n = run.data.params.get("n_cells") if run else None
    return int(n) if n is not None and str(n).isdigit() else None


def _first_line(text: Any, width: int = 150) -> str:
    s = str(text or "").strip().splitlines()
    s = s[0] if s else ""
    return s if len(s) <= width else s[: width - 3] + "..."


def summarize(experiment: str, sweep: str | None, uri: str, reference: str = "vanilla",
              efficient: str = "xformers", expect_backend: str = "xformers", out=None) -> int:
    """Print the summary of one sweep (the newest when `sweep` is None); returns the number of
    failed checks."""
    from pipeline.report import FIT_POINTS, checkpointing_effect, fit_power_law, load_runs

    out = out or sys.stdout

    def say(*a):
        print(*a, file=out)

    sweep = sweep or latest_sweep(experiment, uri)
    f = load_runs(experiment, sweep, uri).frame
    f = f.assign(status=_col(f, "tags.status").fillna("?").astype(str),
                 n=_col(f, "params.seq_len").map(_num),
                 dtype=_col(f, "params.backbone.dtype").fillna("?").astype(str),
                 backend=_col(f, "tags.backend").fillna("").astype(str),
                 model=_col(f, "tags.model").fillna("?").astype(str),
                 scenario=_col(f, "tags.scenario").fillna("?").astype(str))
    # a cell the deadline's SIGINT stopped (gpu_check.sh) was not measured, and did not fail
    cut = (f["status"] == "error") & (_col(f, "tags.failure_reason").astype(str) == "interrupted")
    f.loc[cut, "status"] = "cut"
    counts = f["status"].value_counts()
    planned = planned_cells(experiment, sweep, uri)

    def first(tag: str) -> str:
        return next((str(v) for v in _col(f, tag).dropna() if str(v)), "?")

    say(f"== gpu-check summary: experiment {experiment}, sweep {sweep or '(all runs)'}")
    say(f"device {first('tags.device_name')} | torch {first('tags.torch_version')} | "
        f"xformers {first('tags.xformers_version')} | {len(f)} cells"
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
                    cells.append(_fmt_ms(_num(row["metrics.kernel/fwd_ms"].iloc[0])))
                else:
                    cells.append(_status_word(row["status"].iloc[0]))
            exps = []
            for metric in ("metrics.kernel/fwd_ms", "metrics.kernel/fwdbwd_ms", "metrics.kernel/peak_mem_mb"):
                fit = fit_power_law(ok["n"], _col(ok, metric).map(_num)) if len(ok) else None
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
        (f["scenario"] != "kernel") & _col(f, "params.trainer.precision").astype(str).str.startswith("bf16"))
    eff = f[(f["model"] == efficient) & (f["status"] == "ok") & bf16]
    wrong = eff[eff["backend"] != expect_backend]
    for text in sorted(set(_col(eff, "tags.backend_detail").dropna().astype(str))):
        say(f"{efficient} operator: {text}")
    for text in sorted(set(_col(wrong, "tags.backend_note").dropna().astype(str))):
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
                       f"{r['model']} n={int(r['n'])} {r['scenario']} {r['status']}: {_first_line(_col(bad, 'tags.failure_reason')[i], 100)}"
                       for i, r in bad.iterrows()))))

    say("")
    say("checks")
    for ok, text in checks:
        say(f"  {'PASS' if ok else 'FAIL'}  {text}")
    failed = sum(not ok for ok, _ in checks)
    say(f"result: {len(checks) - failed}/{len(checks)} checks passed")
    return failed


def _compare(d, dtype: str, reference: str, efficient: str, say) -> None:
    """The efficient variant against the reference at the largest n both ran ok."""
    ok = d[d["status"] == "ok"]
    a, b = ok[ok["model"] == reference], ok[ok["model"] == efficient]
    common = sorted(set(a["n"]) & set(b["n"]))
    if not common:
        if len(a) or len(b):
            say(f"{efficient} vs {reference} ({dtype}): no length where both ran ok")
        return
    n = common[-1]
    ra, rb = a[a["n"] == n].iloc[0], b[b["n"] == n].iloc[0]
    parts = []
    for label, metric in (("forward", "metrics.kernel/fwd_ms"), ("forward+backward", "metrics.kernel/fwdbwd_ms")):
        ta, tb = _num(ra.get(metric)), _num(rb.get(metric))
        if math.isfinite(ta) and math.isfinite(tb) and ta > 0 and tb > 0:
            how = f"{ta / tb:.1f}x faster" if ta >= tb else f"{tb / ta:.1f}x slower"
            parts.append(f"{label} {how} ({_fmt_ms(ta)} vs {_fmt_ms(tb)} ms)")
    ma, mb = _num(ra.get("metrics.kernel/peak_mem_mb")), _num(rb.get("metrics.kernel/peak_mem_mb"))
    if math.isfinite(ma) and math.isfinite(mb) and ma > 0 and mb > 0:
        how = f"{ma / mb:.0f}x smaller" if ma >= mb else f"{mb / ma:.1f}x larger"
        parts.append(f"forward peak memory {how} ({_fmt_ms(ma)} vs {_fmt_ms(mb)} MB)")
    say(f"{efficient} vs {reference} ({dtype}) at n={int(n)}, the largest both ran: " + "; ".join(parts))


def _memory_limit(d, dtype: str, reference: str, say) -> None:
    """Where the reference stopped: its first cell that did not run ok, and why."""
    ref = d[d["model"] == reference].sort_values("n")
    for _, r in ref.iterrows():
        if r["status"] != "ok":
            say(f"{reference} ({dtype}) n={int(r['n'])}: {r['status']}: {_first_line(r.get('tags.failure_reason'))}")
        elif isinstance(r.get("tags.fwdbwd_skipped"), str):  # forward measured, forward+backward not
            say(f"{reference} ({dtype}) n={int(r['n'])}: forward ok, forward+backward not run: "
                f"{_first_line(r['tags.fwdbwd_skipped'])}")


# ============================================================================ entry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    from pipeline.tracking import tracking_uri

    try:
        failed = summarize(args.experiment, args.sweep, tracking_uri(args.uri), args.reference, args.efficient,
                           args.expect_backend)
    except ValueError as e:  # load_runs: no such experiment, sweep or cell
        print(f"FAIL nothing to summarise: {e}")
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
