"""Write spooled records (pipeline/spool.py) into the tracking store, each exactly once, then
remove them from the spool.

    python -m pipeline.replay                      # every spool a sweep left (listed in the cache)
    python -m pipeline.replay multirun/2026-12-07/10-00-00      # one sweep's folder (or its spool/)
    python -m pipeline.replay DIR --uri http://tracking:5000    # into another store than recorded
    make replay [DIR=...] [ARGS=...]

Order: a sweep's own run first (created if it is not in the store yet), then its cells, then the
cells it reused, then the sweep's run is closed with its counts and, if the sweep asked for one,
its report. A cell is looked for in the store by its run id, else by (config_hash, sweep_id), and
created only if neither finds it; the new run's id goes into the file before anything is logged
to it, so an interrupted replay, run again, writes into the same run. A run the outage left
RUNNING is ended from its record. Exit status: 0 all replayed, 3 records still wait (the store
went away again), 2 bad input.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import record as R
from pipeline import spool, tracking


@dataclass
class Replayed:
    cells: int = 0
    reuses: int = 0
    sweeps: list[str] = field(default_factory=list)  # sweeps whose run was closed

    def add(self, other: Replayed) -> None:
        self.cells += other.cells
        self.reuses += other.reuses
        self.sweeps += other.sweeps


def _get_run(tr, run_id: str | None):
    if not run_id:
        return None
    try:
        run = tr.get_run(run_id)
    except Exception as e:  # noqa: BLE001
        if spool.is_outage(e):
            raise
        return None  # not in this store (another store's id, or deleted)
    return run if run.info.lifecycle_stage == "active" else None


def _sweep_run(tr, sweep_id: str | None):
    if not sweep_id:
        return None
    runs = tr.search(f"tags.{R.SWEEP_ID} = '{sweep_id}' and tags.`{R.ROLE}` = '{R.ROLE_SWEEP}'", max_results=1)
    return runs[0] if runs else None


def _write_run(tr, path: Path, rec: spool.RunRecord, parent_run_id: str | None, find: str | None) -> str:
    """The record into its run: found by id, else by the `find` filter, else created (its id
    written into the file first). Everything is written again: the same values land once."""
    run = _get_run(tr, rec.run_id)
    if run is None and find:
        found = tr.search(find, max_results=1)
        run = found[0] if found else None
    if run is None:
        rec.run_id = tr.create_run(rec.name, rec.create_tags, parent_run_id, start_time=rec.start_ms)
        spool.write(path.parent, rec)  # an interrupted replay finds this run again
    else:
        rec.run_id = run.info.run_id
        if parent_run_id and run.data.tags.get(R.PARENT_RUN) != parent_run_id:
            tr.set_tag(rec.run_id, R.PARENT_RUN, parent_run_id)
    tr.log(rec.run_id, params=rec.params, tags=rec.tags, metrics=rec.metrics,
           series=rec.series, timestamp_ms=rec.timestamp_ms)
    for name, a in rec.artifacts.items():
        spool.log_artifact(tr, rec.run_id, name, a["text"] if "text" in a else a["json"])
    return rec.run_id


def _ours(tr, rec: spool.RunRecord, any_store: bool) -> bool:
    """A record for this tracker: its experiment, and its store unless `any_store` (--uri)."""
    return rec.experiment == tr.experiment and (any_store or (rec.uri or tracking.tracking_uri()) == tr.uri)


def replay_dir(tr, spool_dir: str | Path, sweep_id: str | None = None, any_store: bool = False,
               say: Callable[[str], None] = print, report: bool = True) -> Replayed:
    """Replay one spool folder's records for `tr`'s store and experiment (all of them with
    `any_store`), of one sweep if given. Raises the store's error if it goes away meanwhile
    (what is done stays done; the rest waits)."""
    d = Path(spool_dir)
    done = Replayed()
    with spool.locked(d):
        sweeps: dict[str, str] = {}  # sweep id -> its run in the store
        open_sweeps: list[tuple[Path, spool.RunRecord]] = []
        for p in spool.pending(d, spool.SWEEP, sweep_id):
            rec = spool.read(p)
            if not _ours(tr, rec, any_store):
                continue
            found = _sweep_run(tr, rec.sweep_id) if not _get_run(tr, rec.run_id) else None
            if found is not None:
                rec.run_id = found.info.run_id
            tags, rec.tags = rec.tags, {}  # the sweep's end (status, counts) is written once its cells are in
            sweeps[rec.sweep_id] = _write_run(tr, p, rec, None, None)
            rec.tags = tags
            open_sweeps.append((p, rec))

        in_store: dict[str, bool] = {}  # parent run ids already looked up

        def parent_of(rec: spool.RunRecord) -> str | None:
            p = rec.parent_run_id
            if p and p not in in_store:
                in_store[p] = _get_run(tr, p) is not None
            if p and in_store[p]:
                return p
            if rec.sweep_id and rec.sweep_id not in sweeps:
                found = _sweep_run(tr, rec.sweep_id)
                if found is not None:
                    sweeps[rec.sweep_id] = found.info.run_id
            return sweeps.get(rec.sweep_id or "")

        for p in spool.pending(d, spool.CELL, sweep_id):
            rec = spool.read(p)
            if not _ours(tr, rec, any_store):
                continue
            find = (f"tags.{R.CONFIG_HASH} = '{rec.config_hash}' and tags.{R.SWEEP_ID} = '{rec.sweep_id}'"
                    if rec.sweep_id else None)
            run_id = _write_run(tr, p, rec, parent_of(rec), find)
            tr.end_run(run_id, rec.status or "error", end_time=rec.end_ms)
            p.unlink()
            done.cells += 1
            say(f"replayed {rec.name} ({rec.status}) into run {run_id}")

        for p in spool.pending(d, spool.REUSE, sweep_id):
            rec = spool.read(p)
            if not _ours(tr, rec, any_store):
                continue
            parent = parent_of(rec)
            run_id = rec.run_id if _get_run(tr, rec.run_id) else None
            if run_id is None:
                prev = tr.find_reusable(rec.config_hash)
                run_id = prev.info.run_id if prev is not None else None
            if run_id is None or (rec.sweep_id and parent is None):
                continue  # the cell it reused, or the sweep's run, is not in the store yet (another spool)
            tr.set_tag(parent, f"{R.REUSED_PREFIX}{rec.config_hash}", run_id)
            p.unlink()
            done.reuses += 1

        for p, rec in open_sweeps:  # a sweep whose cells are all in: its counts, status and report
            if rec.status is None or any(q.name != p.name for q in spool.pending(d, sweep_id=rec.sweep_id)):
                continue  # still running, or cells of it wait (another store, or a later replay)
            counts, reused = tr.close_sweep(rec.sweep_id, rec.run_id)
            tr.end_run(rec.run_id, rec.status, end_time=rec.end_ms)
            p.unlink()
            done.sweeps.append(rec.sweep_id)
            say(f"sweep {rec.sweep_id}: its run {rec.run_id} closed with {tracking.counts_text(counts)}, {reused} reused")
            if report and rec.report:
                from pipeline.sweep import publish_report

                publish_report(tr, rec.run_id, rec.sweep_id, say=lambda m: say(m.removeprefix("[attnbench] ")))
    return done


def replay_known(tr, say: Callable[[str], None] = print) -> Replayed:
    """Every listed spool's records for this store (a sweep's start: then it reuses them). A
    store that goes away meanwhile leaves the rest waiting, with one line."""
    done = Replayed()
    dirs = spool.known_spools(prune=True)
    try:
        for _ in range(2):  # a second pass: a reuse whose cell was in a spool replayed after its own
            for d in dirs:
                done.add(replay_dir(tr, d, say=lambda m: None))
    except Exception as e:  # noqa: BLE001
        if not spool.is_outage(e):
            raise
        say(f"replay of the spools stopped: {spool.outage_line(e)}")
    if done.cells or done.reuses:
        say(f"replayed {done.cells} spooled cell(s) of earlier sweeps into the store first")
    return done


def _spool_of(arg: str) -> Path:
    p = Path(arg)
    if (p / spool.SPOOL).is_dir():
        return p / spool.SPOOL
    if p.is_dir():
        return p
    raise ValueError(f"{arg}: no such folder (give a sweep's folder or its spool/)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.replay", description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="*", help="sweep folders or spool folders (default: every spool listed by a sweep)")
    ap.add_argument("--uri", default=None, help="replay into this store instead of the one each record names")
    ap.add_argument("--no-report", action="store_true", help="do not build the reports of the sweeps replayed")
    args = ap.parse_args(argv)
    try:
        dirs = [_spool_of(a) for a in args.dirs] if args.dirs else spool.known_spools(prune=True)
    except ValueError as e:
        print(f"replay: error: {e}", file=sys.stderr)
        return 2
    records = [(d, spool.read(p)) for d in dirs for p in spool.pending(d)]
    if not records:
        print("[attnbench] nothing to replay: no spooled record" + (f" in {', '.join(map(str, dirs))}" if dirs else ""))
        return 0
    stores = sorted({(args.uri or r.uri or tracking.tracking_uri(), r.experiment) for _, r in records})
    total, left = Replayed(), 0
    for uri, experiment in stores:
        try:
            tr = tracking.Tracker(uri, experiment)
        except tracking.TrackingError as e:
            print(f"[attnbench] {e}: its records stay in the spool")
            continue
        mine = sorted({d for d, r in records if (args.uri or r.uri or tracking.tracking_uri(), r.experiment) == (uri, experiment)})
        try:
            for _ in range(2):  # a second pass: a reuse whose cell was in a spool replayed after its own
                for d in mine:
                    total.add(replay_dir(tr, d, any_store=bool(args.uri), report=not args.no_report,
                                         say=lambda m: print(f"[attnbench] {m}", flush=True)))
        except Exception as e:  # noqa: BLE001
            if not spool.is_outage(e):
                raise
            print(f"[attnbench] the store went away during the replay: {spool.outage_line(e)}")
    left = sum(len(spool.pending(d)) for d in dirs)
    print(f"[attnbench] replay: {total.cells} cell(s) and {total.reuses} reuse(s) recorded, {len(total.sweeps)} sweep(s) closed"
          + (f"; {left} record(s) still waiting: run make replay again once the store answers" if left else ""))
    return spool.EXIT_WAITING if left else 0


if __name__ == "__main__":
    sys.exit(main())
