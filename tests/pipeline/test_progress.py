"""The sweep's progress lines: the time-left estimate from the analytic cost model, calibrated on
the cells finished so far, with closed-form answers."""
from __future__ import annotations

from pipeline import record as R
from pipeline.progress import Progress, _clock, eta_s, headline


def test_eta_is_the_calibrated_cost_of_the_cells_left():
    # seconds = 2 + 3 * units on the finished kernel cells: the two left cost 2+3*4 and 2+3*10
    done = [{"scenario": "kernel", "units": u, "wall_s": 2 + 3 * u} for u in (1.0, 2.0, 5.0)]
    todo = [{"scenario": "kernel", "units": 4.0}, {"scenario": "kernel", "units": 10.0}]
    assert abs(eta_s(done, todo) - (14 + 32)) < 1e-9
    assert eta_s([], todo) is None
    # a scenario with no finished cell is estimated from all cells
    assert abs(eta_s(done, [{"scenario": "decode", "units": 1.0}]) - 5.0) < 1e-9


def test_lines_count_index_status_figure_and_time_left(tmp_path):
    plan = [{"scenario": "kernel", "units": 1.0}, {"scenario": "kernel", "units": 1.0}, {"scenario": "kernel", "units": 1.0}]
    p = Progress(tmp_path, plan, started=0.0)
    line = p.finished(0, "vanilla-n64-kernel", "ok", 2.0, {R.KERNEL_FWD_MS: 1.234})
    assert line.startswith("[1/3] vanilla-n64-kernel ok  fwd 1.23 ms  cell 2.0 s")
    assert line.endswith("left ~0:04")  # two cells left at 2 s each
    line = p.finished(2, "ssm-n64-kernel", "ok", 2.0, {}, reused=True)
    assert line.startswith("[2/3] ssm-n64-kernel reused")
    last = p.finished(1, "x-n64-kernel", "oom", 1.0, {}, reason="out of memory")
    assert "[3/3]" in last and "(out of memory)" in last and "left" not in last
    assert (tmp_path / "progress.log").read_text().splitlines()[-1] == last


def test_headline_and_clock():
    assert headline("train", {R.VAL_ACC: 0.987}) == "val/acc 0.987"
    assert headline("decode", {R.DECODE_MS_PER_TOKEN: 0.5}) == "token 0.5 ms"
    assert _clock(3725) == "1:02:05" and _clock(65) == "1:05"
