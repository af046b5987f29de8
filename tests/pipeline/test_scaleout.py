"""Scale-out: sweeps whose cells run as hydra-submitit-launcher jobs (on this machine, and the
sbatch script a SLURM submission would use), a shared `mlflow server` written by concurrent
sweeps, and concurrent writers on one SQLite store. Nothing is lost, duplicated or left RUNNING.

    pytest tests/test_scaleout.py
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import record as R
from pipeline.registry import discover_variants
from pipeline.sweep import SWEEP_FILE
from pipeline.tracking import Tracker
from tests.support import REPO, free_port, start_mlflow_server, stop_process_group

# The smoke grid's kernel cells (every variant) at a toy length, measured as briefly as the
# kernel scenario allows: what is under test is where cells run and what reaches MLflow.
BRIEF = ["scenario=kernel", "scenario.min_time_s=0", "scenario.noise_max_s=0", "scenario.min_repeats=2", "scenario.warmup=1", "scenario.warmup_s=0",
         "hydra.sweeper.report=false"]
KERNEL_GRID = ["model=glob(*)", "seq_len=32", *BRIEF]
# Many-writer tests: two cells of the reference variant per sweep, recorded as cheaply as possible.
TWO_CELLS = ["model=vanilla", "seq_len=32,48", *BRIEF, "isolate=false"]
TWO_CELL_NAMES = ["vanilla-n32-kernel", "vanilla-n48-kernel"]
# The machine may be shared with other benchmarks: bounds are generous, never timing targets.
CLI_TIMEOUT_S = 600


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # the client's "View run at" lines
    env.update(extra)
    return env


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(_pipeline(*args), cwd=REPO, env=env, check=False, capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S)


def _pipeline(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.run", *args]


def _run_concurrently(runs: list[tuple[list[str], dict[str, str]]], logs: Path) -> list[tuple[int, str]]:
    """Start every (argv, env) at once, output to files (no pipe to fill); (exit code, output) of
    each. Whatever is still running on the way out is killed."""
    procs = []
    try:
        for i, (argv, env) in enumerate(runs):
            with open(logs / f"run{i}.log", "w") as out:
                procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + CLI_TIMEOUT_S
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, (logs / f"run{i}.log").read_text()) for i, p in enumerate(procs)]


def _all_succeed(results: list[tuple[int, str]]) -> None:
    for i, (rc, out) in enumerate(results):
        assert rc == 0, f"process {i} exited {rc}:\n{out[-4000:]}"


def _sweeps(tr: Tracker) -> dict[str, tuple]:
    """sweep_id -> (parent run, [child runs]), every run of the experiment accounted for."""
    runs = tr.search("")
    parents = {r.data.tags[R.SWEEP_ID]: r for r in runs if r.data.tags.get(R.ROLE) == "sweep"}
    out = {sid: (p, []) for sid, p in parents.items()}
    for r in runs:
        if r.data.tags.get(R.ROLE) == "sweep":
            continue
        sid = r.data.tags.get(R.SWEEP_ID)
        assert sid in out, f"run {r.info.run_name} belongs to no sweep: {r.data.tags}"
        assert r.data.tags.get("mlflow.parentRunId") == out[sid][0].info.run_id, r.info.run_name
        out[sid][1].append(r)
    return out


def _assert_complete(parent, children, names: list[str]) -> None:
    """One FINISHED ok child per expected cell under a FINISHED ok parent: none lost, none twice."""
    assert parent.info.status == "FINISHED" and parent.data.tags[R.STATUS] == "ok"
    assert sorted(c.info.run_name for c in children) == sorted(names)
    assert {c.info.status for c in children} == {"FINISHED"}
    assert {c.data.tags[R.STATUS] for c in children} == {"ok"}



# ----------------------------------------------------------------------------- submitit


@pytest.mark.slow  # 22 s of submitit_local jobs; the sbatch array test stays fast
def test_submitit_local_jobs_record_every_cell(tmp_path, store_uri):
    """Each cell runs as its own submitit job process; every job finds the sweep file (its run
    is a child of the sweep's parent) and its isolated cell process finds the repo packages."""
    sweep_dir = tmp_path / "multirun"
    argv = _pipeline("-m", *KERNEL_GRID, "hydra/launcher=submitit_local", "tracking.experiment=submitit",
                     f"hydra.sweep.dir={sweep_dir}")
    _all_succeed(_run_concurrently([(argv, _env(MLFLOW_TRACKING_URI=store_uri))], tmp_path))

    variants = discover_variants()
    (parent, children), = _sweeps(Tracker(store_uri, "submitit")).values()
    _assert_complete(parent, children, [f"{v}-n32-kernel" for v in variants])
    assert (sweep_dir / SWEEP_FILE).exists()
    # one job process per cell, none of them the sweeping process
    pids = {c.data.tags[R.PID] for c in children}
    assert len(pids) == len(variants) and parent.data.tags[R.PID] not in pids
    # a submitit job folder with a result per cell
    assert len(list((sweep_dir / ".submitit").glob("*/*_result.pkl"))) == len(variants)
    # the measurement ran in the isolated child, which alone gets the allocator environment
    assert "default" not in {c.data.tags[R.ALLOCATOR] for c in children}


def test_slurm_launcher_writes_one_sbatch_array(tmp_path, store_uri):
    """The sbatch script submitit writes for `hydra/launcher=slurm`, captured by a stand-in
    `sbatch` that refuses the submission (no cluster here): one array over the cells, the
    launcher's partition, GPUs, time and parallelism, and the tracking URI exported to jobs."""
    bin_dir, captured = tmp_path / "bin", tmp_path / "captured"
    bin_dir.mkdir()
    captured.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$SBATCH_CAPTURE/"\n'
                                    'echo "sbatch: error: stand-in, nothing submitted" >&2\nexit 1\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit only checks it is on PATH
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    sweep_dir = tmp_path / "multirun"
    env = _env(MLFLOW_TRACKING_URI=store_uri, SBATCH_CAPTURE=str(captured),
               PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    r = _cli(["-m", *KERNEL_GRID, "hydra/launcher=slurm", "tracking.experiment=slurm",
              f"hydra.sweep.dir={sweep_dir}", "hydra.launcher.partition=bench",
              "hydra.launcher.array_parallelism=2", "hydra.launcher.timeout_min=30",
              "hydra.launcher.gpus_per_node=2"], env)
    assert r.returncode != 0 and "nothing submitted" in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]

    (script,) = [p.read_text() for p in captured.iterdir()]
    lines = script.splitlines()
    n = len(discover_variants())
    for flag in (f"--array=0-{n - 1}%2", "--partition=bench", "--gpus-per-node=2", "--time=30",
                 "--cpus-per-task=8", "--mem=64GB", "--job-name=attnbench"):
        assert f"#SBATCH {flag}" in lines, f"{flag} missing from:\n{script}"
    assert f"export MLFLOW_TRACKING_URI='{store_uri}'" in lines
    # the task runs the submitting interpreter on the pickled jobs of this sweep
    (srun,) = [ln for ln in lines if ln.startswith("srun ")]
    assert f"{sys.executable} -u -m submitit.core._submit {sweep_dir}/.submitit/" in srun
    assert len(list((sweep_dir / ".submitit").glob("*.pkl"))) == n

    # the refused submission is on the sweep's parent run; no cell ran
    (parent, children), = _sweeps(Tracker(store_uri, "slurm")).values()
    assert children == []
    assert parent.info.status == "FAILED" and "nothing submitted" in parent.data.tags[R.FAILURE_REASON]


# ----------------------------------------------------------------------------- tracking server


def test_tracking_server_needs_a_reachable_uri(tmp_path):
    """`tracking=server` fails in one line, before any cell, without a server URI or server.
    An `mlflow` that refuses to import stands in for the client: a missing check then fails
    loudly instead of falling back to the project's own store."""
    poison = tmp_path / "poison" / "mlflow"
    poison.mkdir(parents=True)
    (poison / "__init__.py").write_text("raise ImportError('mlflow imported before the tracking check')\n")
    args = ["-m", *KERNEL_GRID, "tracking=server", f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    unset = _cli(args, _env(PYTHONPATH=str(poison.parent)))
    down = _cli(args, _env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}"))
    for r, says in ((unset, "MLFLOW_TRACKING_URI"), (down, "not reachable")):
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1, r.stderr[-2000:]
        assert err[0].startswith("attnbench: error:") and says in err[0], err[0]
    assert not (tmp_path / "multirun" / "0").exists(), "a cell ran"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """scripts/mlflow_server.sh on a free loopback port over a fresh SQLite store; stopped (its
    whole process group) when the module's tests are done."""
    d = tmp_path_factory.mktemp("server")
    uri, proc = start_mlflow_server(d, free_port(), _env())
    try:
        assert f"export MLFLOW_TRACKING_URI={uri}" in (d / "server.log").read_text()
        yield uri, d
    finally:
        stop_process_group(proc)


@pytest.mark.slow  # 17 s: two whole sweeps at once on a live server
def test_concurrent_sweeps_through_the_server(tmp_path, mlflow_server):
    """Two sweeps at once on one server, one of them as submitit jobs two at a time: every
    cell recorded once, under its own sweep, artifacts stored by the server."""
    uri, server_dir = mlflow_server
    env = _env(MLFLOW_TRACKING_URI=uri)
    common = ["-m", *TWO_CELLS, "tracking=server"]
    _all_succeed(_run_concurrently([
        (_pipeline(*common, "seed=1", f"hydra.sweep.dir={tmp_path / 'a'}"), env),
        (_pipeline(*common, "seed=2", f"hydra.sweep.dir={tmp_path / 'b'}", "hydra/launcher=submitit_local",
                   "hydra.sweeper.max_batch_size=2"), env),
    ], tmp_path))

    tr = Tracker(uri, "attnbench")
    sweeps = _sweeps(tr)
    assert len(sweeps) == 2
    for parent, children in sweeps.values():
        _assert_complete(parent, children, TWO_CELL_NAMES)
    hashes = [c.data.tags[R.CONFIG_HASH] for _, cs in sweeps.values() for c in cs]
    assert len(set(hashes)) == 4, "the two seeds are different cells"
    assert tr.search("attributes.status = 'RUNNING'") == []
    run = sweeps[next(iter(sweeps))][1][0]
    assert {a.path for a in tr.client.list_artifacts(run.info.run_id)} >= {"config.json"}
    assert list((server_dir / "artifacts").rglob("config.json")), "artifacts not kept by the server"


# ----------------------------------------------------------------------------- one SQLite store


@pytest.mark.slow  # 18 s: two whole sweeps at once; a fresh store's concurrent first open stays fast
def test_concurrent_sweeps_on_one_sqlite_store(tmp_path):
    """Four sweeps at once on one SQLite store, created first as a sweep creates it before its
    jobs start: SQLite's single writer plus the tracker's retries lose nothing."""
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    Tracker(uri, "attnbench")
    env = _env(MLFLOW_TRACKING_URI=uri)
    argvs = [_pipeline("-m", *TWO_CELLS, f"seed={i}", f"hydra.sweep.dir={tmp_path / str(i)}") for i in range(4)]
    _all_succeed(_run_concurrently([(argv, env) for argv in argvs], tmp_path))

    tr = Tracker(uri, "attnbench")
    sweeps = _sweeps(tr)
    assert len(sweeps) == 4
    for parent, children in sweeps.values():
        _assert_complete(parent, children, TWO_CELL_NAMES)
    assert tr.search("attributes.status = 'RUNNING'") == []


_OPEN_AND_RECORD = """
import sys
from pipeline.tracking import Tracker
tr = Tracker(sys.argv[1], "first-open")
run = tr.create_run("writer-" + sys.argv[2], {"status": "running"})
tr.log(run, params={"writer": sys.argv[2]}, metrics={"x": 1.0})
tr.end_run(run, "ok")
"""


def test_first_open_of_a_fresh_store_by_concurrent_writers(tmp_path):
    """Four processes opening a store nobody has created yet (two sweeps or single cells started
    together on a new machine): MLflow creates and migrates the tables on first open, which
    must happen once, not four times over each other."""
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    results = _run_concurrently([([sys.executable, "-c", _OPEN_AND_RECORD, uri, str(i)], _env())
                                 for i in range(4)], tmp_path)
    # the error's own line, not the traceback's last (SQLAlchemy ends with a link)
    failed = {i: ([ln for ln in out.splitlines() if "Error" in ln] or [out[-300:]])[-1]
              for i, (rc, out) in enumerate(results) if rc != 0}
    assert not failed, f"concurrent first opens failed: {failed}"
    runs = Tracker(uri, "first-open").search("")
    assert sorted(r.info.run_name for r in runs) == [f"writer-{i}" for i in range(4)]
    assert {r.info.status for r in runs} == {"FINISHED"}
