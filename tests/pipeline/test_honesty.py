"""The harness does not distort what it measures: one mixer's forward through the pipeline (a
forked cell, recorded in MLflow) and through a bare time_calls loop in a plain process with the
cells' allocator setup and thread count, interleaved, agree within a generous stated bound. A
guard against harness artefacts (wrong threads, the allocator setup lost in the fork, timing
that includes logging), not a speed target."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from pipeline import record as R
from pipeline.allocator import ALLOCATOR_ENV
from pipeline.cell import run_cell
from pipeline.config import to_dict
from pipeline.registry import REPO_ROOT
from pipeline.tracking import Tracker
from tests.support import compose

BOUND = 0.25  # |pipeline / bare - 1| of the medians of medians

BARE = """
import json, sys
from pipeline.overhead import bare_fwd_ms
print(json.dumps(bare_fwd_ms(json.loads(sys.argv[1]))))
"""


def _bare(d: dict) -> float:
    env = {**os.environ, **ALLOCATOR_ENV, "PYTHONPATH": str(REPO_ROOT)}
    r = subprocess.run([sys.executable, "-c", BARE, json.dumps(d)], env=env, capture_output=True, text=True,
                       timeout=300, cwd=REPO_ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return float(r.stdout.strip().splitlines()[-1])


def test_pipeline_and_bare_loop_agree(store_uri):
    threads = len(os.sched_getaffinity(0))
    d = to_dict(compose(["model=vanilla", "seq_len=1024", "backbone=small", "scenario=kernel", "overwrite=true",
                         "scenario.fwdbwd=false", "scenario.count_flops=false", "scenario.min_time_s=0.5",
                         f"trainer.num_threads={threads}", f"tracking.uri={store_uri}",
                         "tracking.experiment=honesty"]))
    piped, bare = [], []
    for _ in range(2):  # interleaved, so a noisy moment hits both sides
        assert run_cell(d, quiet=True) == "ok"
        bare.append(_bare(d))
    runs = Tracker(store_uri, "honesty").search(f"tags.{R.STATUS} = 'ok'")
    assert {r.data.tags[R.ISOLATION] for r in runs} == {"fork"}
    assert {r.data.tags[R.NUM_THREADS] for r in runs} == {str(threads)}
    assert all(r.data.tags[R.ALLOCATOR] != "default" for r in runs), "the allocator setup was lost in the fork"
    piped = [r.data.metrics[R.KERNEL_FWD_MS] for r in runs]
    ratio = statistics.median(piped) / statistics.median(bare)
    assert abs(ratio - 1) <= BOUND, f"pipeline {piped} ms vs bare loop {bare} ms: ratio {ratio:.2f}"
