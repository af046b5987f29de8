"""The submitting side of a SLURM sweep: the wait for a job array on the scheduler's word
(pipeline/cluster.py), cells whose task ended without a result recorded as data, and the launcher
of hydra/launcher=slurm (`ArrayLauncher`, registered by hydra_plugins/attnbench_sweeper/
slurm_launcher.py), which hands the sweeper a status per cell instead of aborting on the first
task that died.

    ending = wait_for_tasks(["5_0", "5_1"], has_result, states=job_states)

Module-level imports stay in the standard library (Hydra imports this through its plugin).
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import record as R
from pipeline.cluster import (
    ACTIVE_STATES,
    HEARTBEAT_S,
    PREEMPTED_GRACE_S,
    job_states,
    status_for_state,
)

# ----------------------------------------------------------------------------- the submitting side


@dataclass
class Ending:
    """How one task of the array ended, as the submitting side saw it."""
    job_id: str
    state: str | None     # the scheduler's last word (COMPLETED, CANCELLED, ...); None: not known
    has_result: bool      # submitit's result file is there: the task's function returned or raised
    note: str = ""        # why the state is not known, when it is not


def wait_for_tasks(job_ids: Sequence[str], has_result: Callable[[str], bool],
                   states: Callable[[Sequence[str]], tuple[dict[str, str], str]] = job_states,
                   poll_s: float = 15.0, lost_after_s: float = 600.0, grace_s: float = 15.0,
                   say: Callable[[str], None] = print, on_poll: Callable[[], None] | None = None,
                   clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> dict[str, Ending]:
    """Wait until every task has its result or has ended on the scheduler's word. A task seen
    ended without a result gets `grace_s` more for the file to appear (a shared file system may
    show it late), a PREEMPTED one PREEMPTED_GRACE_S in case the site requeues it; so does one that
    the queue, answering, no longer lists and accounting does not know (cancelled before it
    started, or ended without accounting). When the scheduler gives no answer at all about a task
    that has no result, it is given up after `lost_after_s`. Either way with a one-line note: the
    submitter never waits for ever."""
    endings: dict[str, Ending] = {}
    ended_at: dict[str, float] = {}     # since when a task is seen ended, without its result
    gone_at: dict[str, float] = {}      # since when the queue, answering, does not list a task
    unknown_at: dict[str, float] = {}   # since when the scheduler does not answer about a task
    said = ""
    while True:
        for j in job_ids:
            if j not in endings and has_result(j):
                endings[j] = Ending(j, None, True)
        pending = [j for j in job_ids if j not in endings]
        if not pending:
            return endings
        now = clock()
        st, source = states(pending)
        queue_answered = source in ("squeue", "sacct+squeue")
        news = ("" if source in ("sacct", "sacct+squeue") else
                "[attnbench] job states from squeue: sacct answers nothing here (no accounting)" if source == "squeue" else
                f"[attnbench] no job states from the scheduler ({source}): a task without a result that it "
                f"does not report is given up after {lost_after_s:g} s")
        if news and news != said:
            say(news)
        said = news
        for j in pending:
            state = st.get(j)
            if state is None and queue_answered:
                # in no listing, not pending, not running: cancelled before it started (SLURM may keep
                # no record of that), or ended longer ago than squeue remembers, with no accounting
                unknown_at.pop(j, None)
                if now - gone_at.setdefault(j, now) >= grace_s:
                    how = ("accounting has no record of it (cancelled before it started?)" if source != "squeue"
                           else "no accounting (sacct) to say how it ended")
                    endings[j] = Ending(j, None, has_result(j), f"gone from the queue without a result, and {how}")
                    say(f"[attnbench] SLURM job {j}: {endings[j].note}")
                continue
            gone_at.pop(j, None)
            if state is None:
                if now - unknown_at.setdefault(j, now) >= lost_after_s:
                    endings[j] = Ending(j, None, False, f"no result, and the scheduler has not reported the task "
                                                        f"for {lost_after_s:g} s ({source})")
                    say(f"[attnbench] SLURM job {j}: {endings[j].note}")
                continue
            unknown_at.pop(j, None)
            if state in ACTIVE_STATES:
                ended_at.pop(j, None)
                continue
            wait = max(grace_s, PREEMPTED_GRACE_S) if state == "PREEMPTED" else grace_s
            if now - ended_at.setdefault(j, now) >= wait:
                endings[j] = Ending(j, state, has_result(j))
        if len(endings) == len(job_ids):
            return endings
        if on_poll is not None:
            on_poll()
        sleep(poll_s)


def final_states(job_ids: Sequence[str], states=job_states, tries: int = 5, delay_s: float = 2.0,
                 sleep: Callable[[float], None] = time.sleep) -> dict[str, str]:
    """The end state of tasks that wrote their result: a cancelled task that stopped its cell and
    recorded it shows CANCELLED a moment after it exits."""
    out: dict[str, str] = {}
    left = list(job_ids)
    for attempt in range(tries):
        if not left:
            break
        st, _ = states(left)
        out.update({j: st[j] for j in left if st.get(j) and st[j] not in ACTIVE_STATES})
        left = [j for j in left if j not in out]
        if not st or not left or attempt == tries - 1:
            break
        sleep(delay_s)
    return out


def _runs_of_job(tr, sweep, job_id: str) -> list:
    q = f"tags.{R.SLURM_JOB_ID} = '{job_id}'"
    if sweep is not None:
        q += f" and tags.{R.SWEEP_ID} = '{sweep.sweep_id}'"
    return tr.search(q)


def note_state(tr, sweep, job_id: str, state: str) -> None:
    """A cell that recorded a failure and whose task then ended other than COMPLETED: the state
    goes in front of the cell's own reason (`SLURM job 5_2 ended CANCELLED: stopped by SIGTERM`),
    and a task that ended TIMEOUT makes its cell's error a timeout."""
    for r in _runs_of_job(tr, sweep, job_id):
        tags = r.data.tags
        if tags.get(R.STATUS) in ("ok", "skipped"):
            continue
        new = {}
        if state not in tags.get(R.FAILURE_REASON, ""):
            new[R.FAILURE_REASON] = f"SLURM job {job_id} ended {state}: {tags.get(R.FAILURE_REASON, '')}"[:5000]
        if tags.get(R.STATUS) == "error" and status_for_state(state) != "error":
            new[R.STATUS] = status_for_state(state)
        if new:
            tr.log(r.info.run_id, tags=new)


def record_lost(tr, sweep, d: dict[str, Any], job_id: str, status: str, reason: str) -> None:
    """The cell of a task that ended without a result: its run, left RUNNING by the dead task,
    gets `status` and `reason`; a cell whose task never got as far as its run (cancelled while
    pending, failed at start-up) gets a run saying so, under the sweep's parent."""
    from pipeline import tracking
    from pipeline.config import config_hash, flatten

    runs = _runs_of_job(tr, sweep, job_id)
    if not runs and sweep is not None:  # a run from before the task had its job tag
        runs = tr.search(f"tags.{R.SWEEP_ID} = '{sweep.sweep_id}' and tags.{R.CONFIG_HASH} = '{config_hash(d)}' "
                         f"and attributes.status = 'RUNNING'")
    for r in runs:
        if r.info.status == "RUNNING":
            tr.log(r.info.run_id, tags={R.STATUS: status, R.FAILURE_REASON: reason})
            tr.end_run(r.info.run_id, status)
        elif r.data.tags.get(R.STATUS) not in ("ok", "skipped") and job_id not in r.data.tags.get(R.FAILURE_REASON, ""):
            tr.set_tag(r.info.run_id, R.FAILURE_REASON, f"{reason}: {r.data.tags.get(R.FAILURE_REASON, '')}"[:5000])
    if runs or sweep is None:
        return
    tags = {**_lost_tags(sweep, d, job_id), R.STATUS: status, R.FAILURE_REASON: reason}
    run = tr.create_run(tracking.run_name(d), tags, sweep.parent_run_id)
    tr.log(run, params=flatten(d))
    tr.end_run(run, status)


def _lost_tags(sweep, d: dict[str, Any], job_id: str) -> dict[str, str]:
    """The identity tags of the run of a cell whose task ended without a result."""
    from pipeline import tracking
    from pipeline.config import config_hash, family_hash

    return {R.MODEL: d["model"]["name"], R.SCENARIO: d["scenario"]["name"], R.TASK: d["task"]["name"],
            R.CONFIG_HASH: config_hash(d), R.FAMILY_HASH: family_hash(d), R.SWEEP_ID: sweep.sweep_id,
            R.SLURM_JOB_ID: job_id, **tracking.host_tags()}


def spool_lost(spool_dir: Path, sweep, d: dict[str, Any], job_id: str, status: str, reason: str) -> None:
    """record_lost's run as a spooled record, for the replay to write (and to end the run the dead
    task left RUNNING, found by its config_hash and sweep)."""
    from pipeline import spool, tracking
    from pipeline.config import config_hash, family_hash, flatten

    h = config_hash(d)
    tcfg = d.get("tracking") or {}
    rec = spool.RunRecord(
        kind=spool.CELL, uri=tracking.tracking_uri(tcfg.get("uri")), experiment=tcfg.get("experiment", "attnbench"),
        sweep_id=sweep.sweep_id, name=tracking.run_name(d), parent_run_id=sweep.parent_run_id, config_hash=h,
        family_hash=family_hash(d), seq_len=int(d["seq_len"]), params=flatten(d), status=status,
        create_tags=_lost_tags(sweep, d, job_id),
        tags={R.STATUS: status, R.FAILURE_REASON: reason}, why="the task ended without a result")
    if not (spool_dir / rec.file_name()).exists():  # the task's own record, if it kept one, stands
        spool.write(spool_dir, rec)


def one_line(e: Any) -> str:
    """The last line of an exception's text that says something (a traceback's own message)."""
    text = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip().strip("-")]
    return (lines[-1] if lines else str(text))[:500]


class ArrayLauncher:
    """The launch of hydra/launcher=slurm, mixed into the submitit plugin's SlurmLauncher: the
    batch as one job array, a wait on the scheduler's word, the cells of tasks that ended without a
    result recorded, one return per cell for the sweeper. A sweep with GPU cells and no GPU
    request of its own asks for the GPUs its cells use; a sweep without any asks for none."""

    OWN_KEYS = ("poll_s", "lost_after_s")

    def launch(self, job_overrides, initial_job_idx):
        import submitit
        from hydra.core.singleton import Singleton
        from hydra.core.utils import JobReturn, JobStatus, filter_overrides
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
        from omegaconf import OmegaConf

        assert self.config is not None and self.hydra_context is not None and job_overrides
        own = {k: self.params[k] for k in self.OWN_KEYS if k in self.params}
        params = {k: v for k, v in self.params.items() if k not in self.OWN_KEYS}
        if params.get("gpus_per_node") is None and not params.get("gres") and not params.get("gpus_per_task"):
            gpus = self._gpus_per_cell(job_overrides)
            if gpus:
                print(f"[attnbench] GPU cells: each task asks for --gpus-per-node={gpus} "
                      f"(hydra.launcher.gpus_per_node or gres to choose)", flush=True)
                params["gpus_per_node"] = gpus
        executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                         slurm_max_num_timeout=params.pop("max_num_timeout", 0))
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in shared else f"slurm_{k}": v for k, v in params.items()})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        calls = []
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            print(f"[attnbench]   #{idx}: {' '.join(filter_overrides(overrides))}", flush=True)
            calls.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*calls))
        by_id = {j.job_id: j for j in jobs}
        array = jobs[0].job_id.split("_")[0]
        print(f"[attnbench] submitted {len(jobs)} task(s) as SLURM job {array}: squeue -j {array}; "
              f"their logs in {sweep_dir / '.submitit'}", flush=True)

        tr, sweep = self._tracker()
        beat = _Beat(tr, sweep.parent_run_id) if tr is not None and sweep is not None else None
        endings = wait_for_tasks([j.job_id for j in jobs], lambda jid: by_id[jid].paths.result_pickle.exists(),
                                 poll_s=float(own.get("poll_s", 15.0)),
                                 lost_after_s=float(own.get("lost_after_s", 600.0)), on_poll=beat)
        finals = final_states([j for j, e in endings.items() if e.has_result])

        returns = []
        for idx, (overrides, job) in enumerate(zip(job_overrides, jobs), start=initial_job_idx):
            jid, ending = job.job_id, endings[job.job_id]
            state = ending.state or finals.get(jid)
            ret, why = None, ""
            if ending.has_result:
                try:
                    ret = job.results()[0]
                except Exception as e:  # noqa: BLE001 - the task failed outside the cell (start-up, unpickling)
                    why = one_line(e)
            if ret is not None and ret.status == JobStatus.FAILED:  # the cell raised (its tracker failed)
                ret, why = None, one_line(ret._return_value)
            if ret is not None:
                if state not in (None, "COMPLETED") and tr is not None:
                    note_state(tr, sweep, jid, state)
                returns.append(ret)
                continue
            status = status_for_state(state)
            if state:
                reason = f"SLURM job {jid} ended {state}" + (f": {why}" if why else " without a result")
            else:
                reason = f"SLURM job {jid}: " + (why or ending.note or "ended without a result")
            print(f"[attnbench]   #{idx}: {status} ({reason})", flush=True)
            self._record_lost(tr, sweep, self._cell(overrides), jid, status, reason)
            returns.append(JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED,
                                     _return_value=status, task_name=str(self.config.hydra.job.name)))
        return returns

    def _record_lost(self, tr, sweep, d: dict[str, Any], jid: str, status: str, reason: str) -> None:
        """record_lost in the store; with tracking=offline, or while the store is away, the lost
        cell's record waits in the sweep's spool like the others (never over a record its task kept)."""
        from pipeline import spool

        if tr is not None:
            try:
                record_lost(tr, sweep, d, jid, status, reason)
                return
            except Exception as e:  # noqa: BLE001
                if not spool.is_outage(e):
                    raise
        if sweep is not None and sweep.sweep_dir:
            spool_lost(Path(sweep.sweep_dir) / spool.SPOOL, sweep, d, jid, status, reason)

    def _cell(self, overrides) -> dict[str, Any]:
        from pipeline.config import to_dict

        return to_dict(self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides)))

    def _gpus_per_cell(self, job_overrides) -> int:
        """The most GPUs one GPU cell of the batch uses (its trainer.devices), 0 without any."""
        from pipeline.devices import wants_cuda

        most = 0
        for overrides in job_overrides:
            d = self._cell(overrides)
            if wants_cuda(d):
                devices = (d.get("trainer") or {}).get("devices", 1)
                most = max(most, int(devices) if str(devices).isdigit() else 1)
        return most

    def _tracker(self):
        """The sweep's Tracker and SweepInfo (from the file the sweeper left), or (None, None)."""
        from pipeline import tracking
        from pipeline.cell import SweepInfo
        from pipeline.sweep import SWEEP_FILE

        tcfg = self.config.get("tracking") or {}
        f = Path(str(self.config.hydra.sweep.dir)) / SWEEP_FILE
        sweep = SweepInfo(**json.loads(f.read_text())) if f.exists() else None
        if tcfg.get("offline"):
            return None, sweep
        try:
            tr = tracking.Tracker(tracking.tracking_uri(tcfg.get("uri")), tcfg.get("experiment", "attnbench"))
        except tracking.TrackingError as e:
            print(f"[attnbench] the store is away: cells of tasks that end without a result wait in the spool: {e}",
                  file=sys.stderr)
            return None, sweep
        return tr, sweep


class _Beat:
    """The waiting submitter's heartbeat on the sweep's parent run, at most every HEARTBEAT_S."""

    def __init__(self, tr, run_id: str):
        self.tr, self.run_id, self.last = tr, run_id, 0.0

    def __call__(self) -> None:
        now = time.time()
        if now - self.last < HEARTBEAT_S:
            return
        self.last = now
        with contextlib.suppress(Exception):  # a missed beat is no reason to stop waiting
            self.tr.set_tag(self.run_id, R.HEARTBEAT, str(int(now)))


