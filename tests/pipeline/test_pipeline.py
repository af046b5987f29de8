"""A cell end to end: its MLflow record, isolation, every failure status, pre-flight, resume,
orphans, and the sweep's parent/child structure."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline import record as R
from pipeline.cell import run_cell
from pipeline.config import to_dict
from pipeline.registry import discover_variants
from pipeline.tracking import Tracker
from tests.support import REPO, compose, run_cli, runs_compiled

FAST = ["scenario.min_time_s=0", "scenario.noise_max_s=0", "scenario.min_repeats=2", "scenario.warmup=1", "scenario.warmup_s=0", "seq_len=32"]


def cell(store_uri, experiment, *overrides):
    return to_dict(compose([*FAST, f"tracking.uri={store_uri}", f"tracking.experiment={experiment}", *overrides]))


def runs_of(store_uri, experiment, filter_string=""):
    tr = Tracker(store_uri, experiment)
    return tr.search(filter_string)


def test_inline_cell_record(store_uri):
    status = run_cell(cell(store_uri, "record", "isolate=false", "backbone=small"), quiet=True)
    assert status == "ok"
    (run,) = runs_of(store_uri, "record")
    assert run.info.run_name == "vanilla-n32-kernel" and run.info.status == "FINISHED"
    p, t, m = run.data.params, run.data.tags, run.data.metrics
    assert p["model.name"] == "vanilla" and p["seq_len"] == "32" and p["backbone.d_model"] == "256"
    assert p["trainer.grad_checkpointing"] == "False"
    for tag in ("model", "scenario", "task", "status", "backend", "config_hash", "device", "device_name",
                "num_threads", "torch_version", "xformers_version", "git_sha", "host", "memory_method",
                "allocator", "fp32_matmul"):
        assert tag in t, tag
    assert t["fp32_matmul"] == "highest"  # nothing here lowers fp32 matmuls to TF32/bf16
    assert t["status"] == "ok" and t["backend"] == "torch-matmul" and t["device"] == "cpu"
    for metric in (R.KERNEL_FWD_MS, R.KERNEL_FWD_MS_IQR, R.KERNEL_FWDBWD_MS, R.KERNEL_FLOPS_FWD,
                   R.KERNEL_FLOPS_FWD_ANALYTIC, R.KERNEL_TFLOPS, R.KERNEL_PEAK_FRACTION, R.KERNEL_PEAK_MEM_MB):
        assert metric in m and m[metric] == m[metric], metric
    assert m[R.KERNEL_FWD_MS] > 0 and float(p["gemm_peak_tflops"]) > 0
    arts = {a.path for a in Tracker(store_uri, "record").client.list_artifacts(run.info.run_id)}
    assert {"config.json", "timings.json"} <= arts


def test_checkpointing_suffix_in_run_name(store_uri):
    run_cell(cell(store_uri, "ckptname", "isolate=false", "trainer.grad_checkpointing=true"), quiet=True)
    (run,) = runs_of(store_uri, "ckptname")
    assert run.info.run_name == "vanilla-n32-kernel-ckpt"


@pytest.mark.parametrize(
    "target, extra, status, reason",
    [
        ("Raising", [], "error", "injected failure"),
        ("HugeAlloc", [], "oom", "allocate"),
        ("Sleepy", ["timeout_s=8"], "timeout", "timeout_s=8"),
        ("NaNs", [], "diverged", "non-finite"),
        ("Killed", [], "oom", "SIGKILL"),
    ],
)
def test_isolated_failures_are_recorded(store_uri, target, extra, status, reason):
    exp = f"fault-{target}"
    got = run_cell(cell(store_uri, exp, "model=custom", f"model._target_=tests.faults.{target}", f"model.name={target.lower()}", *extra),
                   quiet=True)
    assert got == status
    (run,) = runs_of(store_uri, exp)
    assert run.data.tags[R.STATUS] == status
    assert reason in run.data.tags[R.FAILURE_REASON]
    assert run.info.status == "FAILED"


def test_oom_in_forward_backward_keeps_the_forward(store_uri):
    got = run_cell(cell(store_uri, "oom-bwd", "model=custom", "model._target_=tests.faults.HugeBackward", "model.name=hugebackward",
                        "isolate=false"), quiet=True)
    assert got == "ok"
    (run,) = runs_of(store_uri, "oom-bwd")
    m, t = run.data.metrics, run.data.tags
    assert m[R.KERNEL_FWD_MS] > 0 and m[R.KERNEL_PEAK_MEM_MB] >= 0
    assert R.KERNEL_FWDBWD_MS not in m and R.KERNEL_PEAK_MEM_FWDBWD_MB not in m
    assert t["fwdbwd_skipped"].startswith("out of memory in forward+backward: RuntimeError:"), t["fwdbwd_skipped"]
    assert "allocate" in t["fwdbwd_skipped"]


def test_preflight_budget_skips_without_running(store_uri):
    assert run_cell(cell(store_uri, "budget", "budget.memory_gb=1e-6", "isolate=false"), quiet=True) == "skipped"
    (run,) = runs_of(store_uri, "budget")
    assert "exceeds the memory budget" in run.data.tags[R.FAILURE_REASON]
    assert R.KERNEL_FWD_MS not in run.data.metrics


def test_resume_reuses_ok_runs_and_overwrite_reruns(store_uri):
    d = cell(store_uri, "resume", "isolate=false")
    assert run_cell(d, quiet=True) == "ok"
    assert run_cell(d, quiet=True) == "ok"
    assert len(runs_of(store_uri, "resume")) == 1, "a finished ok cell must be reused"
    run_cell({**d, "overwrite": True}, quiet=True)
    assert len(runs_of(store_uri, "resume")) == 2


def test_orphaned_running_runs_are_marked(store_uri):
    import socket

    tr = Tracker(store_uri, "orphans")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_id = tr.create_run("orphan", {"host": socket.gethostname(), "pid": str(dead.pid), "status": "running"})
    live = tr.create_run("live", {"host": socket.gethostname(), "pid": str(os.getpid()), "status": "running"})
    assert run_id in tr.mark_orphans()
    r = tr.client.get_run(run_id)
    assert r.info.status == "FAILED" and r.data.tags[R.STATUS] == "error"
    assert tr.client.get_run(live).info.status == "RUNNING"
    tr.end_run(live, "ok")


def test_sweep_parent_children_resume_and_oom_skip(tmp_path):
    uri = f"sqlite:///{tmp_path / 'sweep.db'}"
    env = {"MLFLOW_TRACKING_URI": uri, "ATTNBENCH_CACHE": str(tmp_path / "cache")}
    variants = [v for v in discover_variants() if not runs_compiled(v)]  # compiles in every cell: smoke sweep (slow)
    args = ["-m", f"model={','.join(variants)}", "scenario=kernel", "seq_len=32,48", "scenario.min_time_s=0", "scenario.warmup_s=0", "scenario.min_repeats=2",
            "scenario.noise_max_s=0",
            "hydra.sweeper.report=false", f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    r = run_cli(args, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    n_cells = 2 * len(variants)
    assert f"done: {n_cells} run ({n_cells} ok), 0 reused from earlier runs" in r.stdout
    tr = Tracker(uri, "attnbench")
    parents = tr.search("tags.`attnbench.role` = 'sweep'")
    assert len(parents) == 1
    sweep_id = parents[0].data.tags[R.SWEEP_ID]
    children = tr.search(f"tags.sweep_id = '{sweep_id}'")
    children = [c for c in children if c.info.run_id != parents[0].info.run_id]
    assert len(children) == n_cells
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    assert {c.data.tags[R.STATUS] for c in children} == {"ok"}

    # the same sweep again: every cell is reused, no new child run
    r = run_cli(args, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"done: 0 run, {n_cells} reused from earlier runs" in r.stdout
    parents = tr.search("tags.`attnbench.role` = 'sweep'")
    assert len(parents) == 2
    newest = parents[0]
    assert sum(k.startswith("reused/") for k in newest.data.tags) == n_cells
    assert len(tr.search(f"tags.sweep_id = '{newest.data.tags[R.SWEEP_ID]}'")) == 1  # the parent only

    # a cell line that runs out of memory: longer lengths are skipped, pointing at the failure
    r = run_cli(["-m", "seq_len=16,32,48", "model=custom", "model._target_=tests.faults.HugeAlloc", "model.name=huge",
                 "hydra.sweeper.report=false", f"hydra.sweep.dir={tmp_path / 'multirun2'}"],
                env={**env}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = tr.search("tags.model = 'huge'")
    by_n = {int(x.data.params["seq_len"]): x for x in runs}
    assert by_n[16].data.tags[R.STATUS] == "oom"
    assert by_n[32].data.tags[R.STATUS] == "skipped" and by_n[16].info.run_id in by_n[32].data.tags[R.FAILURE_REASON]
    assert by_n[48].data.tags[R.STATUS] == "skipped"


@pytest.mark.slow
def test_sigkilled_sweep_resumes_without_duplicates(tmp_path):
    """Kill a sweep (and its cell) with SIGKILL mid-way, start it again: the grid completes, no
    ok cell is run twice, and nothing is left RUNNING without a status."""
    import signal
    import time

    uri = f"sqlite:///{tmp_path / 'kill.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "ATTNBENCH_CACHE": str(tmp_path / "cache")}
    args = [sys.executable, "-m", "pipeline.run", "-m", "model=vanilla", "scenario=kernel",
            "seq_len=32,48,64,80", "scenario.min_time_s=0.5", "hydra.sweeper.report=false"]
    proc = subprocess.Popen(args + [f"hydra.sweep.dir={tmp_path / 'a'}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = ""
    deadline = time.time() + 300
    while "vanilla-n32-kernel ok" not in seen and time.time() < deadline:  # its progress line
        seen += proc.stdout.readline()
    time.sleep(2.0)  # inside the next cell
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    r = subprocess.run(args + [f"hydra.sweep.dir={tmp_path / 'b'}"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "orphaned" in r.stdout
    tr = Tracker(uri, "attnbench")
    cells = [x for x in tr.search("") if x.data.tags.get(R.ROLE) != "sweep"]
    ok = [x for x in cells if x.data.tags.get(R.STATUS) == "ok"]
    assert sorted(int(x.data.params["seq_len"]) for x in ok) == [32, 48, 64, 80]
    assert not [x for x in tr.search("attributes.status = 'RUNNING'")]


def test_each_round_gets_a_server_of_its_own():
    """Forks share their server's address-space layout, so a new round starts a new server;
    cells outside rounds (round None) keep whichever server runs."""
    from multiprocessing import forkserver

    from pipeline import isolation

    isolation._fork_context(1)
    first = forkserver._forkserver._forkserver_pid
    isolation._fork_context(None)
    isolation._fork_context(1)
    assert forkserver._forkserver._forkserver_pid == first
    isolation._fork_context(2)
    assert forkserver._forkserver._forkserver_pid not in (None, first)
