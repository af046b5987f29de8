"""Two-rank CPU DDP (gloo) through the pipeline: one MLflow record, world_size 2, finite metrics."""
from __future__ import annotations

import math

from pipeline import record as R
from pipeline.cell import run_cell
from pipeline.config import to_dict
from pipeline.tracking import Tracker
from tests.support import compose


def test_two_rank_cpu_ddp_cell(store_uri):
    d = to_dict(compose([
        "scenario=train", "task=mqar", "trainer=ddp", "trainer.devices=2", "seq_len=64",
        "task.train.max_steps=12", "task.train.batch_size=8", "scenario.warmup_steps=2",
        "task.val_samples=32", "task.eval_batch_size=16", f"tracking.uri={store_uri}",
        "tracking.experiment=ddp"]))
    assert run_cell(d, quiet=True) == "ok"
    (run,) = Tracker(store_uri, "ddp").search("")
    m, t = run.data.metrics, run.data.tags
    assert m[R.TRAIN_WORLD_SIZE] == 2 and t["world_size"] == "2"
    assert t["num_threads"] == "1"  # 2 cores shared by 2 ranks
    for key in (R.TRAIN_STEP_MS, R.TRAIN_TOKENS_PER_S, R.TRAIN_PEAK_MEM_MB, R.VAL_ACC, R.VAL_LOSS):
        assert math.isfinite(m[key]) and m[key] > 0 or key == R.VAL_ACC, key
