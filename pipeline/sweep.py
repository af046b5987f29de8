"""The sweep: a union of cartesian grids, validated whole before any cell runs, launched through
whatever Hydra launcher is configured (basic, submitit_local, slurm), under one MLflow parent run.

Hydra's basic sweeper expands one cartesian product; a benchmark grid is several (the kernel
grid over all variants and lengths, the quality grid at short lengths, the checkpointing axis at
one length), so `hydra.sweeper.grids` lists them and this sweeper concatenates their cells:

    hydra:
      sweeper:
        grids:
          - {scenario: kernel, model: "glob(*)", seq_len: "512,1024"}
          - {scenario: full, model: vanilla, seq_len: 128}

Overrides given on the command line apply to every grid and replace a grid's value for the
same key. With no `grids`, `params` (or just the command line) is one grid, as in Hydra.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob
from omegaconf import OmegaConf

from pipeline import record as R
from pipeline import spool
from pipeline.progress import cell_units
from pipeline.registry import templates

log = logging.getLogger(__name__)

SWEEP_FILE = "attnbench_sweep.json"


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def expand_grids(parser: OverridesParser, grids: Sequence[dict[str, Any]], arguments: Sequence[str]) -> list[list[str]]:
    """Every cell's override list: each grid's product, command-line keys replacing grid keys,
    duplicates (the same cell in two grids) dropped, order kept."""
    arg_keys = {_key(a) for a in arguments}
    jobs: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for grid in grids or [{}]:
        params = [f"{k}={v}" for k, v in grid.items() if _key(k) not in arg_keys] + list(arguments)
        overrides = parser.parse_overrides(params)
        for o in overrides:
            if o.key_or_group == "model" and isinstance(o.value(), Glob):  # glob(*): the variants, not templates
                o.value().exclude.extend(templates())
        for job in BasicSweeper.split_arguments(overrides, None)[0]:
            ident = tuple(sorted(job))
            if ident not in seen:
                seen.add(ident)
                jobs.append(list(job))
    return jobs


class GridSweeper(BasicSweeper):
    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None,
                 grids: list[dict[str, Any]] | None = None, report: bool = True) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.grids = [dict(g) for g in (grids or [])]
        self.report = report

    def sweep(self, arguments: list[str]) -> Any:
        from pipeline import tracking
        from pipeline.config import ConfigError, to_dict
        from pipeline.devices import cuda_missing, wants_cuda
        from pipeline.replay import replay_known

        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        grids = self.grids or [dict(self.params or {})]
        jobs = expand_grids(parser, grids, arguments)
        if not jobs:
            print("attnbench: error: the grid is empty: no cell to run", file=sys.stderr)
            sys.exit(2)

        # compose and check every cell before the first one runs: the config, then whether the
        # cell's task can be laid out at its length (e.g. MQAR's pairs and query distance)
        checked_tasks: set[tuple[str, int]] = set()
        gpu_cell = None
        plan = []  # every cell's scenario and analytic cost, for the progress lines' estimate
        rounds_of = []  # every cell's rounds (kernel cells; 1 for the others)
        for job in jobs:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, job)
            try:
                d = to_dict(cfg)
                check_cell(d, checked_tasks)
                plan.append({"scenario": d["scenario"]["name"], "units": cell_units(d)})
                rounds_of.append(int(d.get("rounds") or 1) if d["scenario"]["name"] == "kernel" else 1)
                if gpu_cell is None and wants_cuda(d):
                    gpu_cell = job
            except ConfigError as e:
                # one line, before any cell runs (Hydra would print a traceback for an exception)
                print(f"attnbench: error: {e} (cell: {' '.join(job)})", file=sys.stderr)
                sys.exit(2)
        why = gpu_launch_problem(self.config.hydra.get("launcher") or {}, cuda_missing) if gpu_cell else None
        if why is not None:
            print(f"attnbench: error: {why} (cell: {' '.join(gpu_cell)})", file=sys.stderr)
            sys.exit(2)

        if max(rounds_of) > 1:
            jobs, plan = interleave_rounds(jobs, plan, rounds_of)
        tcfg = self.config.get("tracking") or {}
        uri, experiment = tracking.tracking_uri(tcfg.get("uri")), tcfg.get("experiment", "attnbench")
        sweep_dir = Path(self.config.hydra.sweep.dir)
        spool_dir = sweep_dir / spool.SPOOL
        tr = None
        if not tcfg.get("offline"):
            try:
                tr = tracking.Tracker(uri, experiment)
            except tracking.TrackingError as e:
                print(f"attnbench: error: {e} (tracking=offline keeps every cell in the sweep's folder for "
                      "`make replay` to record later)", file=sys.stderr)
                sys.exit(2)
            # records an earlier sweep could not write go in first: this sweep then reuses those cells
            replay_known(tr, say=lambda m: print(f"[attnbench] {m}", flush=True))
            orphans = tr.mark_orphans()
            if orphans:
                print(f"[attnbench] marked {len(orphans)} orphaned RUNNING run(s) from killed processes as error")

        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        grid_name = (self.config.hydra.runtime.choices or {}).get("grid") or "custom"
        sweep_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        pw = spool.Recorder(tr, spool.RunRecord(
            kind=spool.SWEEP, uri=uri, experiment=experiment, sweep_id=sweep_id, name=f"sweep-{grid_name}-{sweep_id}",
            create_tags={R.SWEEP_ID: sweep_id, R.ROLE: R.ROLE_SWEEP, R.GRID: grid_name, R.STATUS: R.RUNNING,
                         **tracking.host_tags()}, report=self.report), spool_dir)
        parent = pw.create()
        pw.log(params={R.GRID: grid_name, R.N_CELLS: len(jobs), R.ARGUMENTS: " ".join(arguments)})
        pw.artifact("grid.json", {"grids": grids, "arguments": list(arguments), "cells": jobs})
        (sweep_dir / SWEEP_FILE).write_text(json.dumps({
            "sweep_id": sweep_id, "parent_run_id": parent, "sweep_dir": str(sweep_dir.resolve()),
            "started": time.time(), "plan": plan}))
        where = (f"experiment '{experiment}' at {uri}" if not pw.offline
                 else f"{spool_dir} ({pw.rec.why}; `make replay` records them in {uri})")
        print(f"[attnbench] sweep {sweep_id}: {len(jobs)} cells -> {where}", flush=True)

        batch_size = self.max_batch_size or len(jobs)
        returns = []
        try:
            for start in range(0, len(jobs), batch_size):
                batch = jobs[start:start + batch_size]
                results = self.launcher.launch(batch, initial_job_idx=start)
                for r in results:
                    _ = r.return_value  # re-raises a job's config/tracking error
                returns.append(results)
        except BaseException as e:
            pw.log(tags={R.STATUS: "error", R.FAILURE_REASON: f"{type(e).__name__}: {e}"[:500]})
            pw.end("error")
            pw.finish()
            raise
        if self._finish(tr, pw, spool_dir, [r.return_value for rs in returns for r in rs]):
            sys.exit(spool.EXIT_WAITING)
        return returns

    def _finish(self, tr, pw: spool.Recorder, spool_dir: Path, statuses: list) -> bool:
        """Close the sweep's run with its counts and report. Cells that wait in the spool are
        replayed first if the store is back; if any still wait, the sweep's run is closed by
        their replay (its record joins them) and this returns True. `statuses`: what each job
        returned, the counts while the store cannot give them."""
        from pipeline import tracking
        from pipeline.replay import replay_dir

        sweep_id, parent = pw.rec.sweep_id, pw.rec.run_id
        if tr is not None and not pw.offline and spool.pending(spool_dir, sweep_id=sweep_id) and tr.reachable():
            try:  # the store answers again: this sweep's own waiting cells go in now
                replay_dir(tr, spool_dir, sweep_id=sweep_id, say=lambda m: print(f"[attnbench] {m}", flush=True))
            except Exception as e:  # noqa: BLE001
                if not spool.is_outage(e):
                    raise
        waiting = [spool.read(p) for p in spool.pending(spool_dir, sweep_id=sweep_id)]
        skip = {r.run_id for r in waiting if r.run_id}
        in_store = pw.ask(lambda: tr.sweep_counts(sweep_id, parent, exclude=skip)) if parent else None
        if in_store is not None or pw.offline:
            counts, reused = dict(in_store[0]) if in_store else {}, in_store[1] if in_store else 0
            for rec in waiting:  # a cell not in the store yet counts once, from its record
                if rec.kind == spool.CELL:
                    counts[rec.status] = counts.get(rec.status, 0) + 1
                reused += rec.kind == spool.REUSE
        else:  # the store is away: what the jobs returned (a reused cell among them as ok)
            counts, reused = {}, 0
            for st in statuses:
                counts[str(st)] = counts.get(str(st), 0) + 1
        summary = tracking.counts_text(counts)
        ran = sum(counts.values())
        cells = [r for r in waiting if r.kind == spool.CELL]
        line = f"[attnbench] sweep {sweep_id} done: {ran} run" + (f" ({summary})" if ran else "") + f", {reused} reused from earlier runs"
        if not waiting:
            pw.log(tags={R.STATUS: "ok", R.CELLS: summary, R.REUSED: str(reused)})
            print(line, flush=True)
            if self.report and not pw.offline:
                publish_report(tr, parent, sweep_id)
            pw.end("ok")
            if pw.finish() is None:
                print(f"[attnbench] browse the runs: make ui   (mlflow ui --backend-store-uri {tr.uri})", flush=True)
                return False
        else:
            pw.log(tags={R.STATUS: "ok", R.CELLS: f"{summary} ({len(cells)} waiting in {spool_dir})", R.REUSED: str(reused)})
            pw.end("ok")
            spool.write(spool_dir, pw.rec)  # replay recounts the cells and closes this run
            print(line, flush=True)
        n = len(spool.pending(spool_dir, spool.CELL, sweep_id))
        n_reuse = len(spool.pending(spool_dir, spool.REUSE, sweep_id))
        what = (f"{n} cell{'s' if n != 1 else ''}" if n else "the sweep's own record") + (
            f" (and {n_reuse} reuse{'s' if n_reuse != 1 else ''} of cells to point at)" if n_reuse else "")
        print(f"[attnbench] {what} waiting in {spool_dir}: run make replay (python -m pipeline.replay {spool_dir})"
              + ("; the report follows the replay" if self.report else ""), flush=True)
        return True


def publish_report(tr, parent: str, sweep_id: str, say=print) -> None:
    """Build a sweep's report from the store and attach it to the sweep's run (a failure is
    recorded on the run and printed, never fatal: the cells are recorded)."""
    from pipeline.report import build_report

    try:
        out = build_report(experiment=tr.experiment, sweep_id=sweep_id, out_dir=None,
                           budget_gb=None, tracking_uri=tr.uri)
    except Exception as e:  # noqa: BLE001 - the cells are recorded; a report failure is reported, not fatal
        with contextlib.suppress(Exception):
            tr.set_tag(parent, R.REPORT_ERROR, f"{type(e).__name__}: {e}"[:500])
        say(f"[attnbench] report failed: {type(e).__name__}: {e}")
        return
    try:
        for f in sorted(Path(out).iterdir()):
            if f.is_file():
                tr.log_file(parent, f, "report")
        tr.set_tag(parent, R.REPORT_DIR, str(out))
    except Exception as e:  # noqa: BLE001
        if not spool.is_outage(e):
            raise
        say(f"[attnbench] the report could not be attached to the sweep's run ({spool.outage_line(e)})")
    say(f"[attnbench] report: {Path(out) / 'report.html'}  (markdown: {Path(out) / 'report.md'})")


def interleave_rounds(jobs: list[list[str]], plan: list[dict], rounds_of: list[int],
                      seed: int | None = None) -> tuple[list[list[str]], list[dict]]:
    """Cells with rounds = R > 1 become R cells (`+round=1` … `+round=R`, a replicate: its own
    config_hash and run `-r{k}`), run as round 1 of every cell, then round 2, …, each round in a
    new shuffled order, so that a drift of the machine spreads over every cell instead of
    landing on a few (asv's interleaved rounds, Google Benchmark's random interleaving). Cells
    with rounds = 1 run once, in the first round. Returns the jobs and their plan entries."""
    import random

    rng = random.Random(seed)
    out_jobs, out_plan = [], []
    for r in range(1, max(rounds_of) + 1):
        batch = [(job + ([f"+round={r}"] if k > 1 else []), p)
                 for job, p, k in zip(jobs, plan, rounds_of) if r <= k]
        rng.shuffle(batch)
        out_jobs += [j for j, _ in batch]
        out_plan += [p for _, p in batch]
    return out_jobs, out_plan


def gpu_launch_problem(launcher: Any, cuda_missing: Callable[[], str | None]) -> str | None:
    """Why GPU cells cannot run through this Hydra launcher config, or None. A cluster launcher
    runs them on other machines (nothing to check here); a local one needs this machine's CUDA,
    and submitit_local also a GPU count, without which it hides every GPU from its jobs."""
    target = str(launcher.get("_target_", ""))
    if "slurm" in target.lower():
        return None
    why = cuda_missing()
    if why is not None:
        return f"{why}: run this grid on a GPU machine, or submit it to one (hydra/launcher=slurm)"
    if target.endswith("submitit_launcher.LocalLauncher") and not launcher.get("gpus_per_node"):
        return ("hydra/launcher=submitit_local hides every GPU from its jobs unless hydra.launcher.gpus_per_node "
                "is set (1, or N for trainer=ddp)")
    return None


def check_cell(d: dict[str, Any], checked_tasks: set | None = None) -> None:
    """Everything that can be known wrong about a cell before it runs: the config (validate), then
    whether its task can be laid out at its length (e.g. MQAR's pairs and query distance). Raises
    ConfigError. `checked_tasks` remembers (task, length) pairs already checked."""
    from pipeline.config import ConfigError, validate

    validate(d)
    key = (repr(sorted(d["task"].items())), d["seq_len"])
    if d["scenario"].get("uses_task", True) and (checked_tasks is None or key not in checked_tasks):
        from pipeline.tasks import build_task

        try:
            build_task(d["task"]).check(int(d["seq_len"]))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if checked_tasks is not None:
            checked_tasks.add(key)


def sweep_info_for_job():
    """Inside a job of a sweep: the SweepInfo the sweeper left in the sweep directory, or None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from pipeline.cell import SweepInfo

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    f = Path(hc.sweep.dir) / SWEEP_FILE
    if not f.exists():
        return None
    return SweepInfo(**json.loads(f.read_text()), index=int(hc.job.num))
