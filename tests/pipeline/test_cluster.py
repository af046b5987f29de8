"""Cluster submission when tasks die: a task that raises, one killed by SIGKILL, one cancelled,
a cluster without accounting, two sweeps writing to one tracking server at once. In every case no
finished cell is lost or duplicated, no run stays RUNNING, and a rerun reruns exactly the cells
that did not finish ok.

The fast tests run the real launcher (hydra/launcher=slurm_cpu), submitit and the cells against a
stand-in SLURM (sbatch, squeue, sacct, scancel, srun, written below) that runs array tasks as
local processes. The `slow` ones at the end need a real SLURM (sbatch and a controller that
answers) and skip without it: scripts/ci_cluster.sh runs them on the cluster it starts.

    pytest tests/pipeline/test_cluster.py
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline import cluster, slurm_array
from pipeline import record as R
from pipeline.sweep import SWEEP_FILE
from pipeline.tracking import Tracker
from tests.support import REPO, free_port

BRIEF = ["scenario=kernel", "scenario.min_time_s=0", "scenario.noise_max_s=0", "scenario.min_repeats=2", "scenario.warmup=1",
         "scenario.warmup_s=0", "scenario.fwdbwd=false", "hydra.sweeper.report=false"]
VANILLA, RAISING, SLEEPY = "models.vanilla.VanillaAttention", "tests.faults.Raising", "tests.faults.Sleepy"
LIMIT_S = 600  # generous bounds for a shared machine, never timing targets


# ----------------------------------------------------------------------------- the stand-in SLURM

FAKE_SLURM = r'''
"""Stand-in SLURM commands for one machine (see tests/pipeline/test_cluster.py)."""
import fcntl, json, os, re, signal, subprocess, sys, time
from pathlib import Path

D = Path(os.environ["FAKE_SLURM_DIR"])
ACTIVE = {"PENDING", "RUNNING"}


def read(jid):
    try:
        return json.loads((D / "tasks" / f"{jid}.json").read_text())
    except (OSError, ValueError):
        return {}


def write(jid, **kw):
    with open(D / "lock", "a") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        rec = {**read(jid), **kw}
        tmp = D / "tasks" / f"{jid}.tmp"
        tmp.write_text(json.dumps(rec))
        tmp.replace(D / "tasks" / f"{jid}.json")


def tasks(ids):
    out = []
    for f in sorted((D / "tasks").glob("*.json")):
        if any(f.stem == i or f.stem.split("_")[0] == i for i in ids):
            out.append(f.stem)
    return out


def job_ids(argv):
    ids = []
    for i, a in enumerate(argv):
        if a in ("-j", "--jobs"):
            ids += argv[i + 1].split(",")
    return ids


def sbatch(argv):
    script = Path(argv[-1]).read_text()
    opts = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, re.M))
    (D / "tasks").mkdir(parents=True, exist_ok=True)
    with open(D / "lock", "a") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        f = D / "next_id"
        job = int(f.read_text()) if f.exists() else 100
        f.write_text(str(job + 1))
    m = re.fullmatch(r"(\d+)-(\d+)%(\d+)", opts.get("array", ""))
    ids = [f"{job}_{i}" for i in range(int(m[1]), int(m[2]) + 1)] if m else [str(job)]
    for jid in ids:
        write(jid, state="PENDING")
    (D / f"{job}.sh").write_text(script)
    subprocess.Popen([sys.executable, __file__, "controller", str(job), m[3] if m else "1", *ids],
                     start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=open(D / f"{job}.controller.log", "w"))
    print(f"Submitted batch job {job}")


def controller(argv):
    job, par, left, running = argv[0], int(argv[1]), list(argv[2:]), {}
    while left or running:
        for jid, proc in list(running.items()):
            if proc.poll() is not None:
                del running[jid]
                state = "CANCELLED" if read(jid).get("cancelled") else ("COMPLETED" if proc.returncode == 0 else "FAILED")
                write(jid, state=state, ended=time.time())
        while left and len(running) < par:
            jid = left.pop(0)
            if read(jid).get("state") != "PENDING":
                continue
            main, _, task = jid.partition("_")
            env = dict(os.environ, SLURM_JOB_ID=str(int(main) * 1000 + int(task or 0)), SLURM_CLUSTER_NAME="fake")
            if task:
                env.update(SLURM_ARRAY_JOB_ID=main, SLURM_ARRAY_TASK_ID=task)
            running[jid] = subprocess.Popen(["bash", str(D / f"{job}.sh")], env=env, start_new_session=True,
                                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
            write(jid, state="RUNNING", pgid=running[jid].pid)
        time.sleep(0.2)


def srun(argv):
    files, i = {}, 0
    while argv[i].startswith("-"):
        if argv[i] in ("--output", "--error"):
            files[argv[i]] = argv[i + 1]
            i += 2
        else:
            i += 1
    e = os.environ
    subst = {"%A": e.get("SLURM_ARRAY_JOB_ID", e["SLURM_JOB_ID"]), "%a": e.get("SLURM_ARRAY_TASK_ID", "0"),
             "%j": e["SLURM_JOB_ID"], "%t": "0"}
    for fd, key in ((1, "--output"), (2, "--error")):
        p = files.get(key) or files.get("--output")
        if p:
            for k, v in subst.items():
                p = p.replace(k, v)
            os.dup2(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), fd)
    os.execvp(argv[i], argv[i:])


def scancel(argv):
    # SIGTERM to the task's process group, SIGKILL KillWait seconds later (a process that left the
    # group, as the isolated cell does, is not signalled: proctrack/pgid)
    killwait = os.environ.get("FAKE_SLURM_KILLWAIT", "30")
    for jid in tasks([a for a in argv if not a.startswith("-")]):
        rec = read(jid)
        if rec["state"] == "PENDING":
            write(jid, state="CANCELLED", cancelled=True, ended=time.time())
        elif rec["state"] == "RUNNING":
            write(jid, cancelled=True)
            try:
                os.killpg(rec["pgid"], signal.SIGTERM)
            except ProcessLookupError:
                continue
            subprocess.Popen(["bash", "-c", f"sleep {killwait}; kill -KILL -- -{rec['pgid']} 2>/dev/null"],
                             start_new_session=True)


def listing(argv, forget_after=None):
    for jid in tasks(job_ids(argv)):
        rec = read(jid)
        if forget_after is None or time.time() - rec.get("ended", time.time()) <= forget_after:
            yield jid, rec["state"]


def sacct(argv):
    if os.environ.get("FAKE_SLURM_NO_SACCT"):
        sys.exit("sacct: error: Slurm accounting storage is disabled")
    for jid, state in listing(argv):
        print(f"{jid}|{state}")


def squeue(argv):
    # like squeue -t all: ended jobs too, for MinJobAge seconds
    for jid, state in listing(argv, float(os.environ.get("FAKE_SLURM_MINJOBAGE", "300"))):
        print(f"{jid}|{state}")


def scontrol(argv):
    print("ClusterName = fake")


if __name__ == "__main__":
    globals()[sys.argv[1]](sys.argv[2:])
'''


@pytest.fixture
def fake_slurm(tmp_path):
    """A bin directory of stand-in SLURM commands and the environment that puts it first."""
    bin_dir, state = tmp_path / "fake-slurm-bin", tmp_path / "fake-slurm"
    bin_dir.mkdir()
    state.mkdir()
    (state / "tasks").mkdir()
    tool = bin_dir / "fake_slurm.py"
    tool.write_text(textwrap.dedent(FAKE_SLURM))
    for cmd in ("sbatch", "squeue", "sacct", "scancel", "srun", "scontrol"):
        (bin_dir / cmd).write_text(f'#!/bin/sh\nexec {sys.executable} {tool} {cmd} "$@"\n')
        (bin_dir / cmd).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SLURM_CONF")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_SLURM_DIR=str(state),
               MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT="true")
    return env


@pytest.fixture
def sweep():
    """Starts a sweep through hydra/launcher=slurm_cpu in the background, its output in
    <sweep dir>.log; whatever is still running when the test ends is killed."""
    procs: list[subprocess.Popen] = []

    def start(sweep_dir: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
        argv = [sys.executable, "-m", "pipeline.run", "-m", *BRIEF, "hydra/launcher=slurm_cpu",
                "hydra.launcher.poll_s=1", "hydra.launcher.array_parallelism=8", f"hydra.sweep.dir={sweep_dir}",
                "timeout_s=120", *args]
        sweep_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{sweep_dir}.log", "w") as out:
            procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
        return procs[-1]

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _finish(proc: subprocess.Popen, sweep_dir: Path) -> str:
    try:
        proc.wait(timeout=LIMIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = Path(f"{sweep_dir}.log").read_text()
    assert proc.returncode == 0, out[-4000:]
    return out


def _sweep_id(sweep_dir: Path, proc: subprocess.Popen) -> str:
    deadline = time.monotonic() + LIMIT_S
    while not (sweep_dir / SWEEP_FILE).exists():
        assert proc.poll() is None, Path(f"{sweep_dir}.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.5)
    return json.loads((sweep_dir / SWEEP_FILE).read_text())["sweep_id"]


def _running(tr: Tracker, sweep_id: str, target: str, seq_len: int, procs) -> object:
    """Wait for the RUNNING run of one cell of a sweep (its task has started it) and return it."""
    deadline = time.monotonic() + LIMIT_S
    while True:
        for r in tr.search(f"tags.{R.SWEEP_ID} = '{sweep_id}' and attributes.status = 'RUNNING'"):
            p = r.data.params
            if p.get("model._target_") == target and p.get(R.SEQ_LEN) == str(seq_len) and R.SLURM_JOB_ID in r.data.tags:
                return r
        assert all(p.poll() is None for p in procs), "a sweep ended before its cell started"
        assert time.monotonic() < deadline, f"{target} n={seq_len} never started"
        time.sleep(0.5)


def _cells(tr: Tracker, sweep_id: str) -> dict[tuple[str, int], list]:
    """(model target, seq_len) -> the sweep's child runs of that cell."""
    out: dict[tuple[str, int], list] = {}
    for r in tr.search(f"tags.{R.SWEEP_ID} = '{sweep_id}'"):
        if r.data.tags.get(R.ROLE) == R.ROLE_SWEEP:
            continue
        out.setdefault((r.data.params["model._target_"], int(r.data.params[R.SEQ_LEN])), []).append(r)
    return out


def _parent(tr: Tracker, sweep_id: str):
    (p,) = [r for r in tr.search(f"tags.{R.SWEEP_ID} = '{sweep_id}'") if r.data.tags.get(R.ROLE) == R.ROLE_SWEEP]
    return p



@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """scripts/mlflow_server.sh on a free loopback port over a fresh SQLite store, stopped (its
    process group) when the module is done."""
    d = tmp_path_factory.mktemp("cluster-server")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PORT=str(port), MLFLOW_BACKEND_STORE_URI=f"sqlite:///{d / 'server.db'}",
               MLFLOW_ARTIFACTS_DESTINATION=str(d / "artifacts"), MLFLOW_WORKERS="2")
    log = open(d / "server.log", "w")
    proc = subprocess.Popen(["bash", str(REPO / "scripts" / "mlflow_server.sh")], env=env, cwd=d, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (d / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(uri + "/health", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, (d / "server.log").read_text()[-3000:]
                time.sleep(0.5)
        yield uri
    finally:
        with _suppress():
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        with _suppress():
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], (ProcessLookupError, subprocess.TimeoutExpired))


# ----------------------------------------------------------------------------- the scheduler's word


def test_states_read_from_sacct_and_squeue_lines():
    text = "5_0|COMPLETED\n5_0.batch|COMPLETED\n5_1|CANCELLED by 0\n5_[2-4%2]|PENDING\n7|NODE_FAIL\n\nJobID|State\n"
    assert cluster.parse_states(text) == {"5_0": "COMPLETED", "5_1": "CANCELLED", "5_2": "PENDING",
                                          "5_3": "PENDING", "5_4": "PENDING", "7": "NODE_FAIL"}
    # sacct keeps an array's pending record, with its last state, after a task of it started
    assert cluster.parse_states("3_1|RUNNING\n3_[1-2%1]|CANCELLED by 0\n") == {"3_1": "RUNNING", "3_2": "CANCELLED"}
    assert [cluster.status_for_state(s) for s in ("TIMEOUT", "NODE_FAIL", "CANCELLED", "PREEMPTED", "OUT_OF_MEMORY")] \
        == ["timeout", "error", "error", "error", "oom"]
    assert cluster.current_job({"SLURM_JOB_ID": "5003", "SLURM_ARRAY_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "3"}) == "5_3"
    assert cluster.current_job({"SLURM_JOB_ID": "9"}) == "9" and cluster.current_job({}) is None


def test_without_accounting_the_states_come_from_squeue_or_the_reason_why_not(fake_slurm, monkeypatch):
    for k in ("PATH", "FAKE_SLURM_DIR"):
        monkeypatch.setenv(k, fake_slurm[k])
    tasks = Path(fake_slurm["FAKE_SLURM_DIR"]) / "tasks"
    (tasks / "5_0.json").write_text(json.dumps({"state": "CANCELLED", "ended": time.time()}))
    assert cluster.job_states(["5_0"]) == ({"5_0": "CANCELLED"}, "sacct")
    monkeypatch.setenv("FAKE_SLURM_NO_SACCT", "1")
    assert cluster.job_states(["5_0"]) == ({"5_0": "CANCELLED"}, "squeue")
    monkeypatch.setenv("PATH", "/nonexistent")
    states, why = cluster.job_states(["5_0"])
    assert states == {} and why == "sacct not found; squeue not found"


def test_the_wait_gives_every_task_its_due_and_never_hangs():
    """With a fake clock: a task with its result; one CANCELLED without one (a grace for the file
    first); one pre-empted and requeued, which then finishes; one that leaves the queue without a
    result on a cluster without accounting, given up a grace after; and, when the scheduler does
    not answer at all, a task given up after lost_after_s. Each with a one-line note."""
    t = [0.0]
    results = {"a"}
    script = {"b": ["RUNNING", "CANCELLED"], "c": ["PREEMPTED", "PENDING", "RUNNING"], "d": ["RUNNING"]}

    def states(pending):
        step = int(t[0] // 10)
        out = {j: s[min(step, len(s) - 1)] for j, s in script.items() if j in pending}
        if t[0] >= 30:
            out.pop("d", None)  # ended, and squeue forgot it: nothing says how
        if t[0] >= 60:
            results.add("c")
        return out, "squeue"

    said = []
    fake_time = {"clock": lambda: t[0], "sleep": lambda s: t.__setitem__(0, t[0] + s)}
    endings = slurm_array.wait_for_tasks(["a", "b", "c", "d"], lambda j: j in results, states=states, poll_s=10,
                                     lost_after_s=100, grace_s=15, say=said.append, **fake_time)
    assert endings["a"] == slurm_array.Ending("a", None, True)
    assert endings["b"] == slurm_array.Ending("b", "CANCELLED", False)
    assert endings["c"].has_result and 60 <= t[0] <= 70
    assert endings["d"].state is None and not endings["d"].has_result and "no accounting" in endings["d"].note
    assert any("squeue" in s for s in said) and any("SLURM job d" in s for s in said)

    t[0], said[:] = 0.0, []
    silent = slurm_array.wait_for_tasks(["e"], lambda j: False, states=lambda p: ({}, "sacct: down; squeue: down"),
                                    poll_s=10, lost_after_s=100, grace_s=15, say=said.append, **fake_time)
    assert silent["e"].note.startswith("no result, and the scheduler has not reported the task for 100 s")
    assert 100 <= t[0] <= 110, "given up once lost_after_s had passed, not before"
    assert len(said) == 2 and "no job states from the scheduler" in said[0]


def test_runs_of_dead_tasks_are_cleared_from_any_host(store_uri, fake_slurm, monkeypatch):
    """RUNNING runs written on another host: cleared by their SLURM job's end state where the
    scheduler knows it, else by a heartbeat gone stale; a live job or a fresh beat is left."""
    for k in ("PATH", "FAKE_SLURM_DIR"):
        monkeypatch.setenv(k, fake_slurm[k])
    tasks = Path(fake_slurm["FAKE_SLURM_DIR"]) / "tasks"
    for jid, state in (("41_0", "NODE_FAIL"), ("41_1", "RUNNING"), ("41_2", "TIMEOUT")):
        (tasks / f"{jid}.json").write_text(json.dumps({"state": state}))
    tr = Tracker(store_uri, "orphans-any-host")
    now = int(time.time())
    elsewhere = {R.HOST: "node-17", R.PID: "1", R.STATUS: R.RUNNING}
    runs = {
        "node-failed": {R.SLURM_JOB_ID: "41_0", R.SLURM_CLUSTER: "fake"},
        "still-running": {R.SLURM_JOB_ID: "41_1", R.SLURM_CLUSTER: "fake"},
        "timed-out": {R.SLURM_JOB_ID: "41_2"},
        "other-cluster": {R.SLURM_JOB_ID: "41_0", R.SLURM_CLUSTER: "elsewhere", R.HEARTBEAT: str(now)},
        "beat-stale": {R.HEARTBEAT: str(now - 3600)},
        "beat-fresh": {R.HEARTBEAT: str(now - 30)},
        "no-word": {},
    }
    ids = {name: tr.create_run(name, {**elsewhere, **tags}) for name, tags in runs.items()}
    marked = set(tr.mark_orphans())
    assert marked == {ids["node-failed"], ids["timed-out"], ids["beat-stale"]}
    got = {name: tr.client.get_run(rid) for name, rid in ids.items()}
    assert got["node-failed"].data.tags[R.STATUS] == "error"
    assert "SLURM job 41_0 ended NODE_FAIL" in got["node-failed"].data.tags[R.FAILURE_REASON]
    assert got["timed-out"].data.tags[R.STATUS] == "timeout"
    assert "no heartbeat from node-17" in got["beat-stale"].data.tags[R.FAILURE_REASON]
    assert {name for name, r in got.items() if r.info.status == "RUNNING"} == \
        {"still-running", "other-cluster", "beat-fresh", "no-word"}


_PLAIN_OPEN = "import sys; from mlflow.tracking import MlflowClient; MlflowClient(sys.argv[1]).search_experiments()"
_OUR_OPEN = "import sys; from pipeline.tracking import Tracker; Tracker(sys.argv[1], 'x'); print('opened')"


def test_a_store_created_by_a_plain_client_at_the_same_moment_is_used(tmp_path):
    """A plain MLflow client (no first-open lock) creating a fresh SQLite store in the same second
    as a sweep opens it: two migrations of one new store at once break it (`already exists`,
    circular dependencies, a half-applied revision). The tracker never runs the second one: it
    creates a store whole and links it into place, or waits for the other client's migration.
    Both opens succeed."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    plain = subprocess.Popen([sys.executable, "-c", _PLAIN_OPEN, uri], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ours = subprocess.run([sys.executable, "-c", _OUR_OPEN, uri], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=LIMIT_S)
    _, plain_err = plain.communicate(timeout=LIMIT_S)
    assert ours.returncode == 0 and "opened" in ours.stdout, ours.stderr[-2000:]
    assert plain.returncode == 0, plain_err[-2000:]
    assert Tracker(uri, "x").search("") == []


def test_a_new_store_appears_whole_and_an_existing_path_is_never_replaced(tmp_path):
    from pipeline.store_open import create_store_whole

    taken = tmp_path / "taken.db"
    taken.write_bytes(b"")  # another client's connect has just created it
    create_store_whole(f"sqlite:///{taken}")
    assert taken.read_bytes() == b""
    fresh = tmp_path / "sub" / "fresh.db"
    create_store_whole(f"sqlite:///{fresh}")
    assert fresh.stat().st_size > 0 and sorted(p.name for p in fresh.parent.iterdir()) == ["fresh.db"]
    assert Tracker(f"sqlite:///{fresh}", "x").search("") == []


def test_a_file_system_without_hard_links_gets_its_store_created_in_place(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    db = tmp_path / "nolinks.db"
    assert Tracker(f"sqlite:///{db}", "x").search("") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nolinks.db", "nolinks.db.lock"]


# ----------------------------------------------------------------------------- the launcher's choices


def test_make_submit_takes_free_form_sweeps(fake_slurm):
    env = dict(fake_slurm, MLFLOW_TRACKING_URI="http://127.0.0.1:1")
    for grid in ("GRID=", "GRID=null"):
        r = subprocess.run(["make", "-n", "submit", grid, "LAUNCHER=slurm_cpu", "ARGS=model=vanilla seq_len=64,128"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        (cmd,) = [ln for ln in r.stdout.splitlines() if "pipeline.run -m" in ln]
        assert "grid=" not in cmd and "hydra/launcher=slurm_cpu" in cmd and cmd.endswith("model=vanilla seq_len=64,128")


def _captured_script(tmp_path, env, *args) -> str:
    """The sbatch script of a sweep, caught by a stand-in sbatch that refuses to submit it."""
    bin_dir, captured = tmp_path / "capture-bin", tmp_path / "captured"
    bin_dir.mkdir(exist_ok=True)
    shutil.rmtree(captured, ignore_errors=True)
    captured.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {captured}/\necho "sbatch: error: stand-in" >&2\nexit 1\n')
    (bin_dir / "sbatch").chmod(0o755)
    env = dict(env, PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'c.db'}")
    r = subprocess.run([sys.executable, "-m", "pipeline.run", "-m", *BRIEF, f"hydra.sweep.dir={tmp_path / 'mr'}", *args],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=LIMIT_S)
    assert r.returncode != 0 and "stand-in" in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    (script,) = [p.read_text() for p in captured.iterdir()]
    return script


@pytest.mark.slow  # 12 s of fake-SLURM submissions; the sbatch array test stays fast
def test_gpus_are_asked_for_by_the_cells_that_use_them(tmp_path, fake_slurm):
    """hydra/launcher=slurm asks for no GPU for a grid of CPU cells (a CPU partition refuses any
    GPU request), for trainer.devices GPUs per task for a grid with GPU cells, and for what
    hydra.launcher.gpus_per_node says when it is set; slurm_cpu's cores and memory fit a small node."""
    cpu = _captured_script(tmp_path, fake_slurm, "model=vanilla", "seq_len=32,48", "hydra/launcher=slurm")
    assert "--gpus-per-node" not in cpu and "#SBATCH --cpus-per-task=8" in cpu
    gpu = _captured_script(tmp_path, fake_slurm, "model=vanilla", "seq_len=32,48", "hydra/launcher=slurm",
                           "trainer=gpu")
    assert "#SBATCH --gpus-per-node=1" in gpu.splitlines()
    from pipeline.config import compose

    small = compose(["hydra/launcher=slurm_cpu"], return_hydra_config=True).hydra.launcher
    assert (small.gpus_per_node, small.cpus_per_task, small.mem_gb) == (None, 2, 4)
    assert small._target_.endswith("attnbench_sweeper.slurm_launcher.SlurmLauncher")


# ----------------------------------------------------------------------------- dying tasks, end to end


@pytest.mark.slow  # 55 s; scripts/ci_cluster.sh kills and cancels tasks on a real SLURM too
def test_dying_tasks_are_recorded_and_the_sweeps_go_on(tmp_path, fake_slurm, server, sweep):
    """Two sweeps at once through the stand-in SLURM into one tracking server. Sweep A (with
    accounting): two cells that run ok, one cancelled mid-run (scancel: SIGTERM, SIGKILL only
    after KillWait = 30 s) and one whose task is killed by SIGKILL. Sweep B (no accounting, and
    squeue forgetting an ended task at once): one ok cell, one whose forward raises and one whose
    task is killed, which nothing then reports. Every cell gets one run with its status, the SLURM
    job and state in the failure's reason; both parents finish with their counts; nothing stays
    RUNNING; the cancelled cell stopped at once. Rerunning A reruns exactly its two failed cells."""
    tr = Tracker(server, "attnbench")
    env = dict(fake_slurm, MLFLOW_TRACKING_URI=server, FAKE_SLURM_KILLWAIT="30")
    env_b = dict(env, FAKE_SLURM_NO_SACCT="1", FAKE_SLURM_MINJOBAGE="0")
    # one fresh interpreter per cell: a task runs one cell, a warm fork server would only add imports
    grid_a = ["model=custom", f"model._target_={VANILLA},{SLEEPY}", "seq_len=32,48", "tracking=server", "isolation=spawn"]
    grid_b = ["model=custom", f"model._target_={VANILLA},{RAISING},{SLEEPY}", "seq_len=64", "tracking=server", "isolation=spawn"]
    a = sweep(tmp_path / "a", env, *grid_a)
    b = sweep(tmp_path / "b", env_b, *grid_b)
    sid_a, sid_b = _sweep_id(tmp_path / "a", a), _sweep_id(tmp_path / "b", b)
    # the sleeping cells hold the device lock in turn: act once all three have started
    cancel = _running(tr, sid_a, SLEEPY, 32, (a, b))
    kill_a = _running(tr, sid_a, SLEEPY, 48, (a, b))
    kill_b = _running(tr, sid_b, SLEEPY, 64, (a, b))
    cancelled_at = time.time()
    subprocess.run(["scancel", cancel.data.tags[R.SLURM_JOB_ID]], env=env, check=True)
    for r in (kill_a, kill_b):
        os.kill(int(r.data.tags[R.PID]), signal.SIGKILL)
    _finish(a, tmp_path / "a")
    out_b = _finish(b, tmp_path / "b")

    cells_a, cells_b = _cells(tr, sid_a), _cells(tr, sid_b)
    assert all(len(runs) == 1 for runs in [*cells_a.values(), *cells_b.values()]), "a cell recorded twice"
    st = {k: (runs[0].data.tags[R.STATUS], runs[0].data.tags.get(R.FAILURE_REASON, "")) for k, runs in cells_a.items()}
    assert st[(VANILLA, 32)][0] == st[(VANILLA, 48)][0] == "ok"
    job = cancel.data.tags[R.SLURM_JOB_ID]
    assert st[(SLEEPY, 32)][0] == "error" and f"SLURM job {job} ended CANCELLED" in st[(SLEEPY, 32)][1] \
        and "SIGTERM" in st[(SLEEPY, 32)][1], st[(SLEEPY, 32)]
    ended = cells_a[(SLEEPY, 32)][0].info.end_time / 1000
    assert ended - cancelled_at < 20, "the cancelled cell ran on until SIGKILL instead of stopping on SIGTERM"
    job = kill_a.data.tags[R.SLURM_JOB_ID]
    assert st[(SLEEPY, 48)] == ("error", f"SLURM job {job} ended FAILED without a result")
    st_b = {k: (runs[0].data.tags[R.STATUS], runs[0].data.tags.get(R.FAILURE_REASON, "")) for k, runs in cells_b.items()}
    assert st_b[(VANILLA, 64)][0] == "ok"
    assert st_b[(RAISING, 64)] == ("error", "ValueError: injected failure in forward")
    assert st_b[(SLEEPY, 64)][0] == "error" and "no accounting (sacct)" in st_b[(SLEEPY, 64)][1]
    assert "job states from squeue" in out_b or "no job states" in out_b
    for sid, cells in ((sid_a, "2 error, 2 ok"), (sid_b, "2 error, 1 ok")):
        p = _parent(tr, sid)
        assert p.info.status == "FINISHED" and p.data.tags[R.STATUS] == "ok" and p.data.tags[R.CELLS] == cells
    assert tr.search("attributes.status = 'RUNNING'") == []

    # the rerun: the ok cells reused, the two others run again (to timeout_s, sleeping)
    rerun = sweep(tmp_path / "a2", env, *grid_a, "timeout_s=3")
    _finish(rerun, tmp_path / "a2")
    sid = json.loads((tmp_path / "a2" / SWEEP_FILE).read_text())["sweep_id"]
    again = _cells(tr, sid)
    assert sorted(again) == sorted(k for k in cells_a if k[0] != VANILLA)
    assert all(len(runs) == 1 for runs in again.values())
    assert {runs[0].data.tags[R.STATUS] for runs in again.values()} == {"timeout"}
    parent = _parent(tr, sid)
    assert sum(k.startswith(R.REUSED_PREFIX) for k in parent.data.tags) == 2
    assert tr.search("attributes.status = 'RUNNING'") == []


# ----------------------------------------------------------------------------- a real SLURM


def _real_slurm() -> str | None:
    """Why the real-SLURM tests cannot run here, or None."""
    if shutil.which("sbatch") is None:
        return "no sbatch: not a SLURM host (scripts/ci_cluster.sh starts one)"
    try:
        ok = subprocess.run(["sinfo", "-h"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return None if ok else "sbatch is here but no SLURM controller answers"


def _scancel(env: dict[str, str], *args: str) -> None:
    """scancel, again while slurmctld answers `Job can not be altered now, try again later` (it
    does while it splits an array's record, e.g. right after another task of it was signalled)."""
    for _ in range(20):
        r = subprocess.run(["scancel", *args], env=env, capture_output=True, text=True)
        if r.returncode == 0 or "try again" not in r.stderr:
            break
        time.sleep(0.5)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_real_slurm_time_limit_signal_raise_and_a_cancelled_pending_task(tmp_path, sweep):
    """On a real SLURM, one task at a time: a cell that gets the time-limit signal (USR2, which
    sbatch's --signal sends signal_delay_s ahead of --time; sent here by scancel --signal so as not
    to wait for a limit) is recorded as timeout; a cell whose forward raises as error; a task
    cancelled while still pending, which never starts its cell, gets a run with CANCELLED and its
    job id. The sweep finishes with its counts, nothing stays RUNNING."""
    why = _real_slurm()
    if why:
        pytest.skip(why)
    env = dict(os.environ)
    uri = env.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith("http"):
        uri = env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'real.db'}"
    exp = f"real-slurm-{os.getpid()}"
    tr = Tracker(uri, exp)
    sweep_dir = tmp_path / "real"
    proc = sweep(sweep_dir, env, "model=custom", f"model._target_={SLEEPY},{RAISING},{VANILLA}", "seq_len=32",
                  f"tracking.experiment={exp}", "hydra.launcher.array_parallelism=1",
                  "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1")
    sid = _sweep_id(sweep_dir, proc)
    sleepy = _running(tr, sid, SLEEPY, 32, (proc,))
    array = sleepy.data.tags[R.SLURM_JOB_ID].split("_")[0]
    # the pending task first: once the sleepy cell stops, the next ones start within a second
    _scancel(env, f"{array}_2")  # still pending behind the other two
    # once only: a second USR2 after the cell stopped would reach submitit's own handler (a requeue)
    subprocess.run(["scancel", "--signal=USR2", sleepy.data.tags[R.SLURM_JOB_ID]], env=env, check=False)
    _finish(proc, sweep_dir)
    cells = _cells(tr, sid)
    assert len(cells) == 3 and all(len(runs) == 1 for runs in cells.values())
    st = {k[0]: (runs[0].data.tags[R.STATUS], runs[0].data.tags.get(R.FAILURE_REASON, "")) for k, runs in cells.items()}
    assert st[SLEEPY][0] == "timeout" and "SIGUSR2" in st[SLEEPY][1], st[SLEEPY]
    assert st[RAISING] == ("error", "ValueError: injected failure in forward")
    # SLURM 22.05 accounts a pending array task's cancel under the array's pending record, or
    # not at all: the state, or that nothing lists the task any more
    assert st[VANILLA][0] == "error" and st[VANILLA][1] in (
        f"SLURM job {array}_2 ended CANCELLED without a result",
        f"SLURM job {array}_2: gone from the queue without a result, and accounting has no record of it "
        "(cancelled before it started?)"), st[VANILLA]
    assert _parent(tr, sid).data.tags[R.CELLS] == "2 error, 1 timeout"
    assert tr.search("attributes.status = 'RUNNING'") == []
