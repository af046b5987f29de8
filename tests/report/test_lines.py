"""How the report groups cells (pipeline/report/lines.py): which params are line axes, the
checkpointing on/off pairs, and the memory budget a line is judged against.

    .venv/bin/pytest tests/report/test_lines.py
"""
from __future__ import annotations

import pandas as pd
import pytest

from pipeline import record as R
from pipeline.report.figures import variant_colours
from pipeline.report.lines import CKPT, Line, checkpointing_effect, memory_budget_mb, varying_axes


def test_varying_axes():
    base = {
        R.col(R.MODEL): "m",
        "params.backbone.d_model": 64,
        "params.seed": 0,
        R.col(R.GEMM_PEAK_TFLOPS): 1.0,
    }
    rows = []
    for n in (256, 512):
        for dtype in ("float32", "bfloat16"):
            for seed in (0, 1):
                rows.append(
                    {
                        **base,
                        "params.seq_len": n,
                        "params.backbone.dtype": dtype,
                        "params.seed": seed,
                        "params.batch_size": n // 256,  # scaled with n: not an axis of its own
                        R.col(R.GEMM_PEAK_TFLOPS): 1.0 + seed,
                    }
                )  # added by the scenario: not an axis
    assert varying_axes(pd.DataFrame(rows)) == ["params.backbone.dtype"]


def test_timing_knobs_and_run_switches_are_not_axes():
    rows = [{R.col(R.MODEL): "m", "params.seq_len": 256, "params.scenario.min_time_s": t,
             "params.tracking.uri": f"sqlite:///{t}.db", "params.timeout_s": 100 * t,
             "params.budget.memory_gb": t, "params.model.window": w}
            for t in (1, 2) for w in (8, 16)]
    assert varying_axes(pd.DataFrame(rows)) == ["params.model.window"]


def test_variant_colours_are_stable():
    a = variant_colours(["performer", "vanilla", "longformer"])
    b = variant_colours(["vanilla", "longformer", "performer", "vanilla"])
    assert a == b and len(set(a.values())) == 3


def test_checkpointing_effect_pairs_on_and_off():
    rows = []
    for ckpt, mem, step in ((False, 200.0, 10.0), (True, 50.0, 13.0)):
        rows.append(
            {
                R.col(R.MODEL): "m",
                R.col(R.SCENARIO): "train",
                R.col(R.TASK): "t",
                R.col(R.STATUS): "ok",
                "params.seq_len": 128,
                CKPT: ckpt,
                R.col(R.TRAIN_PEAK_MEM_MB): mem,
                R.col(R.TRAIN_STEP_MS): step,
            }
        )
    eff = checkpointing_effect(pd.DataFrame(rows))
    assert len(eff) == 1
    assert eff["mem_saved_pct"].iloc[0] == pytest.approx(75.0)
    assert eff["time_added_pct"].iloc[0] == pytest.approx(30.0)


def test_memory_budget_sources():
    rows = pd.DataFrame(
        [{R.col(R.MODEL): "m", R.col(R.DEVICE): "cuda", R.col(R.STATUS): "ok", "params.seq_len": 1}]
    )
    line = Line("m", {}, rows, exact=True)
    assert memory_budget_mb(line, 2.0)[0] == 2048
    budget, why = memory_budget_mb(line, None)
    assert budget is None and "--budget-gb" in why  # no silent guess for an accelerator
    line.rows = rows.assign(**{R.col(R.DEVICE_MEMORY_GB): 80.0})
    assert memory_budget_mb(line, None)[0] == 80 * 1024
    # a cpu line is judged by what its cells logged too, never by this machine's RAM
    line.rows = rows.assign(**{R.col(R.DEVICE): "cpu"})
    budget, why = memory_budget_mb(line, None)
    assert budget is None and "--budget-gb" in why


def test_memory_budget_is_the_one_pre_flight_logged():
    rows = pd.DataFrame({R.col(R.MODEL): "m", R.col(R.DEVICE): "cpu", R.col(R.STATUS): "ok",
                         "params.seq_len": [256, 512], R.col(R.DEVICE_MEMORY_GB): 64.0,
                         R.col(R.BUDGET_MEM_MB): [4096.0, 3072.0]})
    line = Line("m", {}, rows, exact=True)
    assert memory_budget_mb(line, None) == (3072.0, "3.00 GiB (logged budget_mem_mb, the smallest of its cells)")
    line.rows = rows.assign(**{R.col(R.BUDGET_MEM_MB): 4096.0})
    assert memory_budget_mb(line, None) == (4096.0, "4.00 GiB (logged budget_mem_mb)")
    assert memory_budget_mb(line, 1.5) == (1536.0, "1.5 GiB (--budget-gb)")  # the explicit override wins
