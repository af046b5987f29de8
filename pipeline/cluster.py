"""SLURM as the sweep sees it: the scheduler's word on each task (sacct, else squeue), the
submitting side's wait for a job array, cells whose task ended without a result recorded as data,
and, in the task, the signals a cancel or a time limit sends turned into the cell's status.

    states, source = job_states(["5"])      # ({"5_0": "COMPLETED", "5_1": "CANCELLED"}, "sacct")

The submitting side's wait and launcher are pipeline/slurm_array.py.
    status_for_state("TIMEOUT")              # "timeout"; NODE_FAIL, CANCELLED, ... -> "error"

A task can end without its result: cancelled (scancel), pre-empted, its node lost, past its time
limit, killed by the kernel. submitit raises for such a job, and the plugin's launcher aborts the
whole sweep on the first one; without accounting it waits for ever. The launcher of
hydra/launcher=slurm (`ArrayLauncher`, registered by hydra_plugins/attnbench_sweeper/
slurm_launcher.py) waits on the scheduler's word instead, records each such cell as its error or
timeout with the SLURM state and job id, and hands the sweeper a status per cell.

Module-level imports stay in the standard library: Hydra imports this at start-up, through its
plugin, in every process.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from pipeline import record as R

# States in which a task may still write its result (squeue and sacct spell them in full).
ACTIVE_STATES = frozenset({
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED",
    "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "STOPPED", "SPECIAL_EXIT",
    "RESV_DEL_HOLD", "POWER_UP_NODE", "UPDATE_DB",
})
# A pre-empted task is requeued or ends there, as the site's PreemptMode has it: final only when
# it stays so for a while.
PREEMPTED_GRACE_S = 120.0
# the cell status of a task that ended in this state without its result; any other state: error
STATE_STATUS = {"TIMEOUT": "timeout", "DEADLINE": "timeout", "OUT_OF_MEMORY": "oom"}
HEARTBEAT_S = 60.0        # how often a running cell says it is alive (runs on a tracking server)
STALE_AFTER_S = 600.0     # a RUNNING run whose heartbeat is older than this is an orphan


def status_for_state(state: str | None) -> str:
    return STATE_STATUS.get((state or "").upper(), "error")


def current_job(env: Any = None) -> str | None:
    """The SLURM job this process runs in, named as submitit and squeue name it (<array job>_<task>
    for a task of an array, else the job id); None outside SLURM."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def job_tags(env: Any = None) -> dict[str, str]:
    """The tags naming the SLURM job of this process ({} outside SLURM)."""
    env = os.environ if env is None else env
    job = current_job(env)
    if job is None:
        return {}
    tags = {R.SLURM_JOB_ID: job}
    if env.get("SLURM_CLUSTER_NAME"):
        tags[R.SLURM_CLUSTER] = env["SLURM_CLUSTER_NAME"]
    return tags


# ----------------------------------------------------------------------------- the scheduler's word


def _expand(job_id: str) -> list[str]:
    """'5_[0-3,7%2]' -> 5_0 ... 5_3, 5_7 (a pending array's range); '5_2' and '5' as they are."""
    m = re.fullmatch(r"(\d+)_\[([^\]]+)\]", job_id)
    if not m:
        return [job_id]
    out = []
    for part in m.group(2).split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        out += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def parse_states(text: str) -> dict[str, str]:
    """`JobID|State` lines without a header (sacct -P -n, squeue -o '%i|%T') -> {job id: STATE}.
    Job steps (5_0.batch) are left out; 'CANCELLED by 0' counts as CANCELLED. A task's own line
    wins over a range that names it too: sacct keeps an array's pending record (5_[1-2%1]) with
    the state of its last change even after a task of it started."""
    own: dict[str, str] = {}
    ranged: dict[str, str] = {}
    for line in text.splitlines():
        jid, _, state = line.strip().partition("|")
        if not jid[:1].isdigit() or "." in jid or not state.strip():
            continue
        state = state.split()[0].rstrip("+").upper()
        tasks = _expand(jid)
        for j in tasks:
            (own if tasks == [jid] else ranged)[j] = state
    return {**ranged, **own}


def _query(cmd: list[str], timeout_s: float) -> tuple[str | None, str]:
    """(stdout, "") or (None, one line saying why the command gave no answer)."""
    if shutil.which(cmd[0]) is None:
        return None, f"{cmd[0]} not found"
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, f"{cmd[0]} gave no answer in {timeout_s:g} s"
    except OSError as e:
        return None, f"{cmd[0]}: {e}"
    if r.returncode != 0:
        return None, f"{cmd[0]}: " + (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
    return r.stdout, ""


def job_states(job_ids: Iterable[str], timeout_s: float = 30.0) -> tuple[dict[str, str], str]:
    """The scheduler's state of every task of these jobs (array or task ids): from accounting
    (sacct) where the cluster keeps it, and from the controller's queue (squeue -t all, which lists
    every pending and running task, and an ended one for MinJobAge seconds, 300 by default) for
    the tasks accounting does not list. Returns (states, source): source is "sacct", "squeue"
    (no accounting), "sacct+squeue", or why neither answered (states empty then). Where squeue
    answered, a task it does not list is neither pending nor running."""
    wanted = sorted({str(j) for j in job_ids})
    ids = ",".join(sorted({j.split("_")[0] for j in wanted}))
    if not ids:
        return {}, "sacct"
    out, why_sacct = _query(["sacct", "-X", "-P", "-n", "-o", "JobID,State", "-j", ids], timeout_s)
    states = parse_states(out) if out is not None else {}
    if out is not None and all(j in states for j in wanted):
        return states, "sacct"
    queue, why_squeue = _query(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j", ids], timeout_s)
    if queue is not None:
        return {**parse_states(queue), **states}, ("sacct+squeue" if out is not None else "squeue")
    if out is not None:
        return states, "sacct"
    return {}, f"{why_sacct}; {why_squeue}"


# ----------------------------------------------------------------------------- the task's side


class CellStopped(KeyboardInterrupt):
    """SLURM stopped the task while its cell ran: cancelled, pre-empted or at its time limit.
    A KeyboardInterrupt, so that what waits on the cell (the isolated child's wait, the inline
    execute) passes it on as it passes Ctrl-C; the cell records `status` and `reason`."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


# submitit asks sbatch for --signal=USR2@signal_delay_s: its signal that the time limit is near
TIME_LIMIT_SIGNAL = signal.SIGUSR2


@contextlib.contextmanager
def stop_on_slurm_signals():
    """While a cell runs in a SLURM task: SIGTERM (scancel, pre-emption, a node going down: SIGKILL
    follows KillWait seconds later) and the time-limit signal raise CellStopped, so the cell stops
    at once and is recorded, whichever processes the site's proctrack plugin signals. submitit's
    own handlers (which let SIGTERM pass) are back once the cell is done. Nothing outside SLURM."""
    job = current_job()
    if job is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        if signum == TIME_LIMIT_SIGNAL:
            raise CellStopped("timeout", f"SLURM job {job}: stopped by {signal.Signals(signum).name}, "
                                         f"sent ahead of the job's time limit (--time)")
        raise CellStopped("error", f"SLURM job {job}: stopped by {signal.Signals(signum).name} "
                                   f"(scancel, pre-emption or its node going down)")

    before = {s: signal.signal(s, stop) for s in (signal.SIGTERM, TIME_LIMIT_SIGNAL)}
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)


@contextlib.contextmanager
def heartbeat(tr, run_id: str, every_s: float = HEARTBEAT_S):
    """While the block runs, the run's heartbeat tag is set to the time every `every_s` seconds
    (from a thread, so a cell waiting on its child or on the device lock still beats): a run
    whose beat stops is cleared by the next sweep from any host (Tracker.mark_orphans)."""
    done = threading.Event()

    def beat():
        while not done.wait(every_s):
            with contextlib.suppress(Exception):
                tr.set_tag(run_id, R.HEARTBEAT, str(int(time.time())))

    t = threading.Thread(target=beat, name="attnbench-heartbeat", daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join(timeout=5)


def orphan_reasons(runs: Sequence, now: float | None = None) -> dict[str, tuple[str, str]]:
    """For RUNNING runs of any host: {run id: (status, reason)} for those whose writer is gone, by
    their SLURM job's state where the scheduler here knows it, else by a heartbeat gone stale.
    A job the scheduler does not know (another cluster, purged accounting) is left to the beat."""
    now = time.time() if now is None else now
    jobs = [r.data.tags[R.SLURM_JOB_ID] for r in runs if R.SLURM_JOB_ID in r.data.tags]
    states, _ = job_states(jobs) if jobs else ({}, "")
    cluster = _cluster_name() if jobs and states else None
    out: dict[str, tuple[str, str]] = {}
    for r in runs:
        tags = r.data.tags
        job = tags.get(R.SLURM_JOB_ID)
        state = states.get(job) if job else None
        same_cluster = tags.get(R.SLURM_CLUSTER) in (None, cluster)
        if state is not None and same_cluster:
            if state not in ACTIVE_STATES:
                out[r.info.run_id] = (status_for_state(state),
                                      f"orphaned: SLURM job {job} ended {state} before the cell recorded a result")
            continue
        beat = tags.get(R.HEARTBEAT)
        if beat and beat.isdigit() and now - int(beat) > STALE_AFTER_S:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(beat)))
            out[r.info.run_id] = ("error", f"orphaned: no heartbeat from {tags.get(R.HOST, 'its host')} since {when}")
    return out


def _cluster_name() -> str | None:
    out, _ = _query(["scontrol", "show", "config"], 30.0)
    m = re.search(r"^ClusterName\s*=\s*(\S+)", out or "", re.M)
    return m.group(1) if m else None
