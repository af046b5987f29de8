"""The parent side of a cell: validate, resume or skip, run it (isolated in a child process by
default), record it in MLflow. A failing cell is recorded, never fatal to the sweep.

    status = run_cell(cell_dict, sweep=SweepInfo(...))     # no torch import on this side

What runs in the measuring process is pipeline/execute.py; the child process itself,
pipeline/isolation.py.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import cluster, spool, tracking
from pipeline import record as R
from pipeline.config import Cell
from pipeline.isolation import isolation_mode, run_isolated
from pipeline.progress import Progress
from pipeline.registry import cache_dir, provenance
from pipeline.scenarios.base import CellResult
from pipeline.stability import CONTAMINATED, STABLE, disturbed


@dataclass
class SweepInfo:
    sweep_id: str
    parent_run_id: str
    index: int = -1  # this cell's place in the sweep (hydra.job.num)
    sweep_dir: str | None = None  # where progress.log goes
    started: float = 0.0  # the sweep's start (epoch seconds)
    plan: list = field(default_factory=list)  # every cell's {scenario, units} (pipeline/progress.py)

    def progress(self) -> Progress | None:
        return Progress(self.sweep_dir, self.plan, self.started) if self.sweep_dir else None


@functools.lru_cache(maxsize=4)
def _tracker(uri: str, experiment: str) -> tracking.Tracker:
    """One client per store and experiment in this process: the sweep's cells share it."""
    return tracking.Tracker(uri, experiment)


def run_cell(d: dict[str, Any], sweep: SweepInfo | None = None, quiet: bool = False) -> str:
    """Run and record one cell; returns its status. Raises only for bad config or tracking. A
    record the store cannot take goes to the spool (pipeline/spool.py), with one line saying so."""
    t_start = time.perf_counter()
    cell = Cell.of(d)  # validated once; everything below reads this one value
    d, h, fam, name = cell.config, cell.hash, cell.family, cell.name
    tcfg = d.get("tracking") or {}
    uri, experiment = tracking.tracking_uri(tcfg.get("uri")), tcfg.get("experiment", "attnbench")
    spool_dir = spool_folder(sweep)
    progress = sweep.progress() if sweep else None
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    tr, why_offline = _store(uri, experiment, tcfg, sweep)

    if not d.get("overwrite"):
        reused = _reusable(tr, h, spool_dir)
        if reused is not None:
            run_id, metrics = reused
            _note_reuse(tr, sweep, h, run_id, name, uri, experiment, spool_dir)
            where = f"run {run_id}" if run_id else "spooled, not yet replayed"
            if progress:
                say(progress.finished(sweep.index, name, "ok", time.perf_counter() - t_start, metrics,
                                      reused=True) + f"  ({where})")
            else:
                say(f"[attnbench] {name}: reusing finished {where} (config_hash {h}; overwrite=true reruns)")
            return "ok"
        if tr is not None and tr.down:  # the look-up met an outage: this cell goes to the spool
            tr, why_offline = None, tr.down

    tags = {
        R.MODEL: d["model"]["name"], R.SCENARIO: d["scenario"]["name"], R.TASK: d["task"]["name"],
        R.CONFIG_HASH: h, R.FAMILY_HASH: fam, R.STATUS: R.RUNNING, **tracking.host_tags(), **cluster.job_tags(),
        **provenance(d["model"]["_target_"]),  # which class runs, from which file and distribution
    }
    if sweep:
        tags[R.SWEEP_ID] = sweep.sweep_id
    # on a server, runs come from many hosts: a heartbeat lets any of them clear a run whose process
    # died (an isolated cell only: the beat's thread stays out of a process that measures)
    beat = tr is not None and uri.startswith(("http://", "https://")) and d.get("isolate", True)
    if beat:
        tags[R.HEARTBEAT] = str(int(time.time()))
    w = spool.Recorder(tr, spool.RunRecord(kind=spool.CELL, uri=uri, experiment=experiment,
                                           sweep_id=sweep.sweep_id if sweep else None, name=name, config_hash=h,
                                           family_hash=fam, seq_len=int(d["seq_len"]), create_tags=tags),
                       spool_dir, why_offline)
    run_id = w.create(sweep.parent_run_id if sweep else None)
    # in a SLURM task, a cancel or the time limit stops the cell and is its status
    alive = contextlib.ExitStack()
    alive.enter_context(cluster.stop_on_slurm_signals())
    if beat and run_id:
        alive.enter_context(cluster.heartbeat(tr, run_id))
    try:
        w.log(params=cell.params)
        w.artifact("config.json", d)
        result = _skip_after_oom(w, d, sweep, fam, spool_dir)
        if result is None:
            with device_lock(d, say) as waited:
                t_start += waited()  # another cell's measurement is not this cell's overhead
                t0 = time.perf_counter()
                result = measure_until_stable(d, lambda: _measure_once(d), say=lambda m: say(f"[attnbench] {name}: {m}"))
                result.metrics.setdefault(R.CELL_WALL_S, time.perf_counter() - t0)
        scenario_s = result.metrics.get(R.CELL_SCENARIO_S)
        if scenario_s is not None:  # up to the record; the record itself is a few writes more
            result.metrics[R.CELL_OVERHEAD_S] = time.perf_counter() - t_start - scenario_s
        _record(w, result)
    except cluster.CellStopped as e:  # SLURM cancelled the task or its time is up: recorded, the sweep goes on
        alive.close()
        result = CellResult(status=e.status, failure_reason=e.reason)
        _record(w, result)
    except BaseException as e:  # interrupted (Ctrl-C) or the tracker refused a write: leave no RUNNING run
        try:
            reason = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
            w.log(tags={R.STATUS: "error", R.FAILURE_REASON: reason.splitlines()[0][:500]})
            w.end("error")
            w.finish()
        finally:
            raise
    finally:
        alive.close()
    kept = w.finish()
    if progress:
        say(progress.finished(sweep.index, name, result.status, time.perf_counter() - t_start, result.metrics,
                              reason=result.failure_reason, stability=result.tags.get(R.STABILITY, "")))
    else:
        msg = f"[attnbench] {name}: {result.status}"
        if result.failure_reason:
            msg += f" ({result.failure_reason})"
        if result.tags.get(R.STABILITY, R.STABLE) != R.STABLE:
            msg += f"; timings {result.tags[R.STABILITY]}: {result.tags.get(R.STABILITY_REASON, '')}"
        say(msg)
    if kept is not None:
        say(f"[attnbench] {name}: not in the store ({w.rec.why}); kept in {kept}: make replay records it")
    return result.status


def spool_folder(sweep: SweepInfo | None) -> Path:
    """Where a cell's record waits when the store cannot take it: the sweep's folder, or for a
    single cell Hydra's output folder of the run."""
    if sweep is not None and sweep.sweep_dir:
        return Path(sweep.sweep_dir) / spool.SPOOL
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir) / spool.SPOOL
    return Path("outputs") / spool.SPOOL


def _store(uri: str, experiment: str, tcfg: dict[str, Any], sweep: SweepInfo | None):
    """The cell's tracker and, where there is none, why: tracking=offline, or a sweep's store that
    cannot be reached now (a single cell from the command line fails instead, before it measures)."""
    if tcfg.get("offline"):
        return None, "tracking=offline"
    try:
        tr = _tracker(uri, experiment)
    except tracking.TrackingError as e:
        if sweep is None:
            raise
        return None, str(e)
    if tr.down and not tr.reachable():
        return None, f"tracking store {uri} still unreachable since {tr.down}"
    return tr, ""


def _reusable(tr, h: str, spool_dir: Path) -> tuple[str | None, dict] | None:
    """An earlier finished ok run of this cell: (its run id, its metrics) from the store, or
    (None, metrics) from a spool while the store is away; None if there is none."""
    if tr is not None:
        answered, prev = spool.attempt(tr, lambda: tr.find_reusable(h))
        if answered:
            return (prev.info.run_id, prev.data.metrics) if prev is not None else None
    rec = spool.find_ok(list(dict.fromkeys([spool_dir.resolve(), *spool.known_spools()])), h)
    return (None, rec.metrics) if rec is not None else None


def _note_reuse(tr, sweep: SweepInfo | None, h: str, run_id: str | None, name: str, uri: str, experiment: str,
                spool_dir: Path) -> None:
    """The sweep's run names the run each reused cell points at (tag reused/<config_hash>);
    while the store or the sweep's run is away, a small record in the spool does it later."""
    if sweep is None:
        return
    if (tr is not None and run_id and sweep.parent_run_id and not tr.down
            and spool.attempt(tr, lambda: tr.set_tag(sweep.parent_run_id, f"{R.REUSED_PREFIX}{h}", run_id))[0]):
        return
    spool.write(spool_dir, spool.RunRecord(kind=spool.REUSE, uri=uri, experiment=experiment, sweep_id=sweep.sweep_id,
                                           name=name, run_id=run_id, parent_run_id=sweep.parent_run_id, config_hash=h,
                                           status="ok"))


@contextlib.contextmanager
def device_lock(d: dict[str, Any], say=print):
    """One measuring cell per device of a host at a time: parallel jobs (submitit arrays, several
    sweeps) would otherwise share cores or a GPU and distort each other's timings. An advisory
    `flock` on a file named after the host and device; released when the cell ends or dies.
    Yields a function giving the seconds spent waiting for the lock."""

    tr = d.get("trainer") or {}
    if tr.get("accelerator") in ("gpu", "cuda"):
        # the physical GPU: SLURM names it even where cgroups renumber every task's GPU as 0
        visible = (os.environ.get("SLURM_STEP_GPUS") or os.environ.get("SLURM_JOB_GPUS")
                   or os.environ.get("CUDA_VISIBLE_DEVICES") or "0")
        device = "cuda" + visible.split(",")[0]
    else:
        device = "cpu"
    path = cache_dir() / f"device-{socket.gethostname()}-{device}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"[attnbench] waiting for another cell measuring on {device} ({path})")
            fcntl.flock(f, fcntl.LOCK_EX)
        waited = time.perf_counter() - t0
        try:
            yield lambda: waited
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _measure_once(d: dict[str, Any]) -> CellResult:
    if d.get("isolate", True):
        result = run_isolated(d)
        result.tags[R.ISOLATION] = isolation_mode(d)
    else:
        from pipeline.execute import execute  # inline: this process measures (torch)

        result = execute(d)
        result.tags[R.ISOLATION] = "inline"
    return result


def measure_until_stable(d: dict[str, Any], measure, say=print, sleep=time.sleep) -> CellResult:
    """Measure the cell; while its timings are not `stable` and show a sign of another process
    (pipeline/stability.py `disturbed`), measure it again in a new process after
    `remeasure_pause_s`, at most `remeasure` more times. The attempt that stands is the first
    stable one, else the least disturbed (stability, then the narrowest CI); the record keeps
    every attempt's figures (`attempts.json`), their count (`cell/attempts`) and which one
    stands (`cell/attempt`)."""
    limit = 1 + int(d.get("remeasure", 2))
    attempts: list[CellResult] = []
    while True:
        result = measure()
        attempts.append(result)
        label = result.tags.get(R.STABILITY)
        if result.status != "ok" or label in (None, STABLE) or len(attempts) >= limit:
            break
        if not any(disturbed(f) for f in result.figures):
            break  # the kernel's own variation, or too few calls by the grid's limits: the same again
        say(f"{label} ({result.tags.get(R.STABILITY_REASON, '')[:160]}); measuring again in a new process "
            f"({len(attempts) + 1} of {limit})")
        sleep(float(d.get("remeasure_pause_s", 3.0)))
    if len(attempts) == 1 and R.STABILITY not in result.tags:
        return result  # nothing timed (skipped, failed, or no timed figure): one attempt, nothing to add
    best = min(range(len(attempts)), key=lambda i: _attempt_rank(attempts[i]))
    chosen = attempts[best]
    chosen.metrics[R.CELL_ATTEMPTS] = float(len(attempts))
    chosen.metrics[R.CELL_ATTEMPT] = float(best + 1)
    chosen.artifacts["attempts.json"] = [
        {"attempt": i + 1, "status": a.status, "stability": a.tags.get(R.STABILITY),
         "reason": a.tags.get(R.STABILITY_REASON, ""), "figures": a.figures, "stands": i == best}
        for i, a in enumerate(attempts)]
    if len(attempts) > 1:
        others = "; ".join(f"attempt {i + 1} {a.tags.get(R.STABILITY, a.status)}" for i, a in enumerate(attempts)
                           if i != best)
        why = chosen.tags.get(R.STABILITY_REASON, "")
        chosen.tags[R.STABILITY_REASON] = f"attempt {best + 1} of {len(attempts)} stands ({others})" + (
            f"; {why}" if why else "")
    return chosen


def _attempt_rank(a: CellResult) -> tuple:
    """Sort key of an attempt: ok first, then stable < unstable < contaminated, then the widest
    relative CI of its figures."""
    widest = max((abs(f["ci"][1] - f["ci"][0]) / 2 / f["median"] for f in a.figures if f.get("median")),
                 default=float("inf"))
    label = a.tags.get(R.STABILITY, CONTAMINATED)
    return (a.status != "ok", R.STABILITIES.index(label) if label in R.STABILITIES else 3, widest)


def _skip_after_oom(w: spool.Recorder, d, sweep, fam, spool_dir: Path) -> CellResult | None:
    """A longer n of a cell line that already ran out of memory in this sweep is not attempted
    (the shorter cell found in the store, or in the spool while it waits there)."""
    if sweep is None:
        return None
    n = int(d["seq_len"])
    failed = w.ask(lambda: w.tr.find_family_oom(sweep.sweep_id, fam, n))
    if failed is not None:
        at, ref = failed.data.params.get(R.SEQ_LEN), failed.info.run_id
    else:
        kept = spool.find_family_oom(spool_dir, sweep.sweep_id, fam, n)
        if kept is None:
            return None
        at, ref = kept.seq_len, kept.run_id or "in the spool"
    return CellResult(status="skipped", failure_reason=f"same cell ran out of memory at n={at} (run {ref})",
                      tags={R.SKIPPED_AFTER: ref})


def _record(w: spool.Recorder, result: CellResult) -> None:
    tags = {**result.tags, R.STATUS: result.status, R.FAILURE_REASON: result.failure_reason[:5000]}
    w.log(params=result.params, tags=tags, metrics=result.metrics, series=result.series)
    for name, payload in result.artifacts.items():
        w.artifact(name, payload)
    w.end(result.status)
