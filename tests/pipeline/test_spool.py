"""Nothing measured is lost while the tracking store is away: a cell whose record the store
cannot take is spooled whole, the sweep goes on, and a replay writes every record exactly once
(pipeline/spool.py, pipeline/replay.py)."""
from __future__ import annotations

import json

import pytest

from pipeline import cell as cell_mod
from pipeline import record as R
from pipeline import spool
from pipeline.cell import SweepInfo, run_cell
from pipeline.config import to_dict
from pipeline.replay import replay_dir
from pipeline.tracking import Tracker
from tests.support import compose, run_cli

FAST = ["scenario.min_time_s=0", "scenario.noise_max_s=0", "scenario.min_repeats=2", "scenario.warmup=1",
        "scenario.warmup_s=0", "isolate=false"]
OUTAGE = "API request to http://tracking:5000/api/2.0/mlflow/runs/log-batch failed with exception " \
         "HTTPConnectionPool(host='tracking', port=5000): Max retries exceeded with url"


class FlakyClient:
    """MLflow's client, failing as a server that is down fails (after its retries) for the calls
    numbered in `down` (1-based), and answering otherwise."""

    def __init__(self, client, down: range):
        self._client, self.down, self.calls, self.failed = client, down, 0, 0

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*a, **k):
            self.calls += 1
            if self.calls in self.down:
                self.failed += 1
                raise ConnectionError(OUTAGE)
            return attr(*a, **k)
        return call


def _flaky(uri: str, experiment: str, down: range) -> Tracker:
    tr = Tracker(uri, experiment)
    tr.client = FlakyClient(tr.client, down)
    return tr


def _cell(uri: str, experiment: str, *overrides: str) -> dict:
    return to_dict(compose([*FAST, f"tracking.uri={uri}", f"tracking.experiment={experiment}", *overrides]))


def _sweep_runs(uri: str, experiment: str, sweep_id: str):
    runs = Tracker(uri, experiment).search(f"tags.{R.SWEEP_ID} = '{sweep_id}'")
    return [r for r in runs if r.data.tags.get(R.ROLE) != R.ROLE_SWEEP]


def test_outage_cases_are_told_from_refused_requests():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    assert spool.is_outage(ConnectionError(OUTAGE))
    assert spool.is_outage(MlflowException(OUTAGE))
    assert spool.is_outage(MlflowException("(sqlite3.OperationalError) database is locked"))
    assert spool.is_outage(MlflowException("(sqlite3.OperationalError) database or disk is full"))
    assert spool.is_outage(MlflowException("API request to http://h/x failed with error code 503 != 200"))
    # the store answered and refused: an error of the record, never spooled
    assert not spool.is_outage(MlflowException("Changing param values is not allowed. Param with key='seq_len'",
                                               error_code=INVALID_PARAMETER_VALUE))
    assert not spool.is_outage(MlflowException("could not serialize the payload"))
    assert not spool.is_outage(ValueError("bad metric value"))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBENCH_CACHE", str(tmp_path / "cache"))


def test_store_down_for_some_calls_spools_then_replays_each_cell_once(tmp_path, store_uri, cache, monkeypatch):
    """A store that fails a stretch of calls and recovers: the cells it could not take are
    spooled whole (one line each), the later ones are recorded directly, the replay writes the
    spooled ones once, a second replay writes nothing, and no run stays RUNNING."""
    exp = "outage"
    Tracker(store_uri, exp)
    parent = Tracker(store_uri, exp).create_run("sweep-outage", {R.SWEEP_ID: "s1", R.ROLE: R.ROLE_SWEEP})
    # calls 4 and 5 fail: the first cell's config artifact (after its run and params went in),
    # and the second cell's resume look-up; from then on the store answers
    tr = _flaky(store_uri, exp, range(4, 6))
    monkeypatch.setattr(cell_mod, "_tracker", lambda uri, experiment: tr)
    sweep = SweepInfo(sweep_id="s1", parent_run_id=parent, sweep_dir=str(tmp_path / "mr"))
    lines: list[str] = []
    with monkeypatch.context() as m:
        m.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
        statuses = [run_cell(_cell(store_uri, exp, "model=vanilla", f"seq_len={n}"), sweep=sweep) for n in (16, 24, 32, 40)]
    assert statuses == ["ok"] * 4
    assert tr.client.failed > 0
    kept = spool.pending(tmp_path / "mr" / spool.SPOOL)
    assert len(kept) == 2, [p.name for p in kept]  # the first two cells; the last two went in directly
    told = [line for line in lines if "not in the store" in line]
    assert len(told) == 2 and all("make replay" in line and "Max retries exceeded" in line for line in told)

    # before the replay: the first cell's run exists but was never ended; the second has none
    runs = _sweep_runs(store_uri, exp, "s1")
    assert sorted(r.data.params[R.SEQ_LEN] for r in runs) == ["16", "32", "40"]
    assert [r.info.status for r in runs if r.data.params[R.SEQ_LEN] == "16"] == ["RUNNING"]

    real = Tracker(store_uri, exp)
    done = replay_dir(real, tmp_path / "mr" / spool.SPOOL)
    assert done.cells == 2 and not spool.pending(tmp_path / "mr" / spool.SPOOL)
    again = replay_dir(real, tmp_path / "mr" / spool.SPOOL)
    assert again.cells == 0
    runs = _sweep_runs(store_uri, exp, "s1")
    assert sorted(int(r.data.params[R.SEQ_LEN]) for r in runs) == [16, 24, 32, 40]  # each cell once
    assert {r.info.status for r in runs} == {"FINISHED"} and {r.data.tags[R.STATUS] for r in runs} == {"ok"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent for r in runs)
    # a replayed record carries what a directly recorded one does, with each metric once
    by_n = {int(r.data.params[R.SEQ_LEN]): r for r in runs}
    direct, replayed = by_n[32], by_n[24]
    assert set(replayed.data.metrics) == set(direct.data.metrics)
    assert set(replayed.data.params) == set(direct.data.params)
    assert set(direct.data.tags) - set(replayed.data.tags) <= {R.HEARTBEAT}
    names = lambda r: sorted(a.path for a in real.client.list_artifacts(r.info.run_id))  # noqa: E731
    assert names(replayed) == names(direct)
    history = real.client.get_metric_history(by_n[16].info.run_id, R.KERNEL_FWD_MS)
    assert len(history) == 1


def test_an_interrupted_replay_run_again_records_each_cell_once(tmp_path, store_uri, cache):
    exp = "interrupted"
    d = tmp_path / "mr" / spool.SPOOL
    for n in (16, 24, 32):
        rec = spool.RunRecord(kind=spool.CELL, uri=store_uri, experiment=exp, sweep_id="s2", name=f"vanilla-n{n}-kernel",
                              config_hash=f"h{n}", create_tags={R.CONFIG_HASH: f"h{n}", R.SWEEP_ID: "s2", R.STATUS: R.RUNNING},
                              params={R.SEQ_LEN: n}, tags={R.STATUS: "ok", R.FAILURE_REASON: ""},
                              metrics={R.KERNEL_FWD_MS: 1.0 + n}, series={"kernel/calls_ms": [1.0, 2.0]},
                              artifacts={"config.json": {"json": {"seq_len": n}}, "note.txt": {"text": "x"}}, status="ok")
        spool.write(d, rec)
    sweep = spool.RunRecord(kind=spool.SWEEP, uri=store_uri, experiment=exp, sweep_id="s2", name="sweep-custom-s2",
                            create_tags={R.SWEEP_ID: "s2", R.ROLE: R.ROLE_SWEEP, R.STATUS: R.RUNNING},
                            params={R.N_CELLS: 3}, status="ok")
    spool.write(d, sweep)
    Tracker(store_uri, exp)
    # the store goes away halfway through the second cell's writes
    with pytest.raises(ConnectionError):
        replay_dir(_flaky(store_uri, exp, range(12, 10_000)), d)
    left = spool.pending(d)
    assert len([p for p in left if p.name.startswith("cell-")]) == 2 and any(p.name.startswith("sweep-") for p in left)
    assert spool.read(d / "cell-s2-h24.json").run_id  # created before the store went away: the replay goes on in it
    done = replay_dir(Tracker(store_uri, exp), d)
    assert not spool.pending(d) and done.sweeps == ["s2"]
    runs = _sweep_runs(store_uri, exp, "s2")
    assert sorted(int(r.data.params[R.SEQ_LEN]) for r in runs) == [16, 24, 32]
    assert {r.info.status for r in runs} == {"FINISHED"}
    tr = Tracker(store_uri, exp)
    for r in runs:
        assert len(tr.client.get_metric_history(r.info.run_id, "kernel/calls_ms")) == 2
    (parent,) = tr.search(f"tags.`{R.ROLE}` = '{R.ROLE_SWEEP}'")
    assert parent.info.status == "FINISHED" and parent.data.tags[R.CELLS] == "3 ok"
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}


def test_offline_sweep_spools_everything_then_a_sweep_replays_it_first_and_reuses(tmp_path):
    """tracking=offline writes no store (exit 3: records wait); the next sweep on the store
    replays them first, then reuses those cells instead of measuring them again."""
    uri = f"sqlite:///{tmp_path / 'off.db'}"
    env = {"MLFLOW_TRACKING_URI": uri, "ATTNBENCH_CACHE": str(tmp_path / "cache")}
    args = ["-m", "model=vanilla,ssm", "seq_len=16,24", *FAST[:-1], "hydra.sweeper.report=false"]
    r = run_cli([*args, "tracking=offline", f"hydra.sweep.dir={tmp_path / 'mr1'}"], env=env)
    assert r.returncode == spool.EXIT_WAITING, r.stdout[-2000:] + r.stderr[-2000:]
    assert not (tmp_path / "off.db").exists()
    assert "4 cells waiting in" in r.stdout and "make replay" in r.stdout
    kept = spool.pending(tmp_path / "mr1" / spool.SPOOL)
    assert sorted(p.name.split("-")[0] for p in kept) == ["cell"] * 4 + ["sweep"]
    assert json.loads(kept[0].read_text())["why"] == "tracking=offline"

    r = run_cli([*args, f"hydra.sweep.dir={tmp_path / 'mr2'}"], env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "replayed 4 spooled cell(s) of earlier sweeps into the store first" in r.stdout
    assert "done: 0 run, 4 reused from earlier runs" in r.stdout
    assert not spool.pending(tmp_path / "mr1" / spool.SPOOL)
    tr = Tracker(uri, "attnbench")
    cells = [x for x in tr.search("") if x.data.tags.get(R.ROLE) != R.ROLE_SWEEP]
    assert len(cells) == 4 and {x.info.status for x in cells} == {"FINISHED"}
    sweeps = {x.data.tags[R.SWEEP_ID]: x for x in tr.search(f"tags.`{R.ROLE}` = '{R.ROLE_SWEEP}'")}
    assert len(sweeps) == 2 and {x.info.status for x in sweeps.values()} == {"FINISHED"}
    offline_sweep = sweeps[cells[0].data.tags[R.SWEEP_ID]]
    assert offline_sweep.data.tags[R.CELLS] == "4 ok"


@pytest.mark.slow  # 65-80 s each (2-core Xeon): a live server, killed for longer than the client's retry budget
@pytest.mark.parametrize("back", ["mid-sweep", "after the sweep"])
def test_server_down_longer_than_its_retries(tmp_path, back, monkeypatch):
    """The real `mlflow server` killed after the second cell, with the client's retries cut to a
    few seconds (MLflow's own settings) so that the outage outlasts them. Back 25 s later: the
    sweep spools what it could not record, goes on, replays its spool itself and exits 0. Back
    only after the sweep: it exits 3 saying what waits, and `python -m pipeline.replay` records
    it. Either way every cell is in the store exactly once, ok, and nothing is RUNNING."""
    import os
    import subprocess
    import sys
    import time

    from pipeline.replay import main as replay_main
    from tests.support import REPO, free_port, start_mlflow_server, stop_process_group

    d = tmp_path / "server"
    d.mkdir()
    port = free_port()
    base = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    uri, server = start_mlflow_server(d, port, base)
    env = {**base, "MLFLOW_TRACKING_URI": uri, "ATTNBENCH_CACHE": str(tmp_path / "cache"),
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    n_cells = 8
    sweep = subprocess.Popen(
        [sys.executable, "-m", "pipeline.run", "-m", "model=vanilla,ssm", "seq_len=16,24,32,40", "tracking=server",
         "scenario.min_time_s=1.5", "scenario.noise_max_s=0", "scenario.warmup_s=0", "hydra.sweeper.report=false",
         f"hydra.sweep.dir={tmp_path / 'mr'}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    try:
        for line in sweep.stdout:
            out.append(line)
            if line.startswith("[2/"):
                break
        stop_process_group(server)
        server = None
        if back == "mid-sweep":
            t_down = time.monotonic()
            while time.monotonic() - t_down < 25:
                time.sleep(1)
            uri, server = start_mlflow_server(d, port, base)
        out += sweep.stdout.readlines()
        rc = sweep.wait(timeout=600)
        text = "".join(out)
        if back == "mid-sweep":
            assert rc == 0, text[-4000:]
            assert "replayed" in text
        else:
            assert rc == spool.EXIT_WAITING, text[-4000:]
            assert "waiting in" in text and "make replay" in text
            assert len(spool.pending(tmp_path / "mr" / spool.SPOOL, spool.CELL)) == n_cells - 2
            uri, server = start_mlflow_server(d, port, base)
            monkeypatch.setenv("ATTNBENCH_CACHE", env["ATTNBENCH_CACHE"])
            assert replay_main([str(tmp_path / "mr"), "--no-report"]) == 0
        runs = Tracker(uri, "attnbench").search("")
    finally:
        if sweep.poll() is None:
            sweep.kill()
        if server is not None:
            stop_process_group(server)
    assert "not in the store" in text, "no cell met the outage:\n" + text[-4000:]
    cells = [r for r in runs if r.data.tags.get(R.ROLE) != R.ROLE_SWEEP]
    assert len(cells) == n_cells, sorted(r.info.run_name for r in cells)
    assert len({r.info.run_name for r in cells}) == n_cells  # none twice
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags[R.STATUS] for r in cells} == {"ok"}
    (parent,) = [r for r in runs if r.data.tags.get(R.ROLE) == R.ROLE_SWEEP]
    assert parent.data.tags[R.CELLS] == f"{n_cells} ok"
    assert not spool.pending(tmp_path / "mr" / spool.SPOOL)


def test_a_task_lost_on_the_cluster_is_spooled_without_overwriting_its_own_record(tmp_path, cache):
    from pipeline.slurm_array import spool_lost

    d = _cell("sqlite:////nonexistent/x.db", "lost", "seq_len=16")
    sweep = SweepInfo(sweep_id="s3", parent_run_id=None, sweep_dir=str(tmp_path))
    spool_lost(tmp_path / spool.SPOOL, sweep, d, "12_3", "error", "SLURM job 12_3 ended NODE_FAIL without a result")
    (p,) = spool.pending(tmp_path / spool.SPOOL)
    rec = spool.read(p)
    assert rec.status == "error" and "NODE_FAIL" in rec.tags[R.FAILURE_REASON] and rec.create_tags[R.SLURM_JOB_ID] == "12_3"
    rec.status, rec.tags[R.STATUS] = "ok", "ok"  # the task had kept its measured record: it stands
    spool.write(tmp_path / spool.SPOOL, rec)
    spool_lost(tmp_path / spool.SPOOL, sweep, d, "12_3", "error", "later")
    assert spool.read(p).status == "ok"


@pytest.mark.slow  # 25 s (2-core Xeon): SQLite's busy timeout (20 s, MLflow's setting) is waited out once
def test_a_sqlite_store_locked_beyond_its_timeout_or_on_a_full_disk_spools(tmp_path, monkeypatch):
    import sqlite3
    import subprocess

    from pipeline import tracking

    monkeypatch.setenv("ATTNBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tracking, "LOCK_TRIES", 1)  # one busy timeout, not eight
    db = tmp_path / "locked.db"
    uri = f"sqlite:///{db}"
    tr = Tracker(uri, "attnbench")  # opened before the lock, as a sweep's cells share their open client
    parent = tr.create_run("sweep", {R.SWEEP_ID: "s4", R.ROLE: R.ROLE_SWEEP})
    monkeypatch.setattr(cell_mod, "_tracker", lambda u, e: tr)
    sweep = SweepInfo(sweep_id="s4", parent_run_id=parent, sweep_dir=str(tmp_path / "mr"))
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another process holds the file
    try:
        assert run_cell(_cell(uri, "attnbench", "seq_len=16"), sweep=sweep, quiet=True) == "ok"
    finally:
        other.execute("ROLLBACK")
        other.close()
    (kept,) = spool.pending(tmp_path / "mr" / spool.SPOOL)
    assert "locked" in spool.read(kept).why
    assert replay_dir(Tracker(uri, "attnbench"), tmp_path / "mr" / spool.SPOOL).cells == 1
    assert [r.data.tags[R.STATUS] for r in _sweep_runs(uri, "attnbench", "s4")] == ["ok"]

    # a full disk under the store: a tmpfs of 6 MiB, filled once the store is made
    fs = tmp_path / "fs"
    fs.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(fs)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        uri = f"sqlite:///{fs / 'full.db'}"
        tr = Tracker(uri, "attnbench")
        parent = tr.create_run("sweep", {R.SWEEP_ID: "s5", R.ROLE: R.ROLE_SWEEP})
        sweep = SweepInfo(sweep_id="s5", parent_run_id=parent, sweep_dir=str(tmp_path / "mr5"))
        with open(fs / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        assert run_cell(_cell(uri, "attnbench", "seq_len=16"), sweep=sweep, quiet=True) == "ok"
        (kept,) = spool.pending(tmp_path / "mr5" / spool.SPOOL)
        assert "full" in spool.read(kept).why or "No space" in spool.read(kept).why, spool.read(kept).why
        (fs / "filler").unlink()
        assert replay_dir(Tracker(uri, "attnbench"), tmp_path / "mr5" / spool.SPOOL).cells == 1
        runs = _sweep_runs(uri, "attnbench", "s5")
        assert [(r.data.tags[R.STATUS], r.info.status) for r in runs] == [("ok", "FINISHED")]
    finally:
        subprocess.run(["umount", "-l", str(fs)], check=False)


def test_replay_into_another_store_keeps_each_record_in_its_experiment(tmp_path, cache, capsys):
    from pipeline.replay import main as replay_main

    d = tmp_path / "mr" / spool.SPOOL
    for exp in ("exp-a", "exp-b"):
        spool.write(d, spool.RunRecord(kind=spool.CELL, uri="http://unreachable:1", experiment=exp, sweep_id=None,
                                       name=f"{exp}-cell", config_hash=f"h-{exp}", params={R.SEQ_LEN: 16},
                                       tags={R.STATUS: "ok"}, metrics={R.KERNEL_FWD_MS: 1.0}, status="ok"))
    uri = f"sqlite:///{tmp_path / 'other.db'}"
    assert replay_main([str(tmp_path / "mr"), "--uri", uri, "--no-report"]) == 0
    assert "2 cell(s)" in capsys.readouterr().out
    for exp in ("exp-a", "exp-b"):
        assert [r.info.run_name for r in Tracker(uri, exp).search("")] == [f"{exp}-cell"]
    assert replay_main(["/nonexistent/folder"]) == 2
