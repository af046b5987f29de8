"""The trust rules (pipeline/stability.py) on synthetic series with known answers, the timing
loop's evidence, and the measure-again path of a cell (pipeline/cell.py)."""
from __future__ import annotations

import random
import statistics

import pytest

from pipeline import record as R
from pipeline.cell import measure_until_stable
from pipeline.scenarios.base import CellResult
from pipeline.stability import (
    CONTAMINATED,
    STABLE,
    UNSTABLE,
    Timing,
    assess,
    combine,
    median_ci,
    median_ci_ranks,
    noise_reached,
    step_change,
)


def _series(n=200, median=10.0, spread=0.02, seed=0):
    rng = random.Random(seed)
    return [median * rng.lognormvariate(0, spread) for _ in range(n)]


# ----------------------------------------------------------------------------- estimators
def test_median_ci_ranks_are_the_binomial_ones():
    assert median_ci_ranks(5) is None            # [min, max] covers only 1 - 2/32 = 94 %
    assert median_ci_ranks(6) == (0, 5)          # 1 - 2/64 = 96.9 %
    assert median_ci_ranks(10) == (1, 8)         # 1 - 2·11/1024 = 97.9 %; (2, 7) would be 89 %
    lo, hi = median_ci_ranks(2000)
    assert 2000 // 2 - 50 < lo < 2000 // 2 < hi < 2000 // 2 + 50  # ≈ n/2 ∓ 1.96·√n/2


def test_median_ci_covers_the_true_median_at_its_confidence():
    rng = random.Random(1)
    hits, trials = 0, 600
    for _ in range(trials):
        xs = [rng.lognormvariate(0, 0.3) for _ in range(25)]  # true median exp(0) = 1
        lo, hi = median_ci(xs)
        hits += lo <= 1.0 <= hi
    assert hits / trials >= 0.93


def test_step_change_finds_a_step_and_not_noise():
    flat = _series(60, spread=0.03)
    assert step_change(flat) is None
    stepped = _series(30, 10.0, 0.01, seed=2) + _series(30, 14.0, 0.01, seed=3)
    assert step_change(stepped) == pytest.approx(0.4, abs=0.05)


# ----------------------------------------------------------------------------- the rules
def test_a_clean_series_is_stable():
    xs = _series()
    a = assess(Timing(ms=xs, wait=[0.0] * len(xs), threads=2, cpus=2, others_cores=0.02))
    assert a.label == STABLE and a.reason == "" and a.excluded == 0
    assert a.ci_lo <= a.median <= a.ci_hi and a.rel_half_width < 0.01


def test_disturbed_calls_are_left_out_and_the_estimate_is_the_clean_one():
    xs, waits = _series(), []
    rng = random.Random(4)
    for i in range(len(xs)):
        if rng.random() < 0.3:  # 30 % of calls preempted: 3-6x slower, most of their time waiting
            xs[i] *= rng.uniform(3, 6)
            waits.append(0.7)
        else:
            waits.append(0.001)
    a = assess(Timing(ms=xs, wait=waits, threads=2, cpus=2))
    clean = [x for x, w in zip(xs, waits) if w < 0.05]
    assert a.excluded == len(xs) - len(clean) > 40
    assert a.median == statistics.median(clean) == pytest.approx(10.0, rel=0.01)
    assert a.label == STABLE
    # the same outliers without the OS's evidence: the median moves and the spread shows it
    blind = assess(Timing(ms=xs, wait=[None] * len(xs)))
    assert blind.median > a.median and blind.label == UNSTABLE and "spread" in blind.reason


def test_mostly_disturbed_is_contaminated():
    xs = _series(50)
    waits = [0.8] * 40 + [0.0] * 10
    a = assess(Timing(ms=[x * 2 for x in xs[:40]] + xs[40:], wait=waits))
    assert a.label == CONTAMINATED and "40 of 50 calls waited" in a.reason
    assert a.excluded == 0  # too few clean calls to stand for the whole: all are used, and flagged


def test_other_processes_beside_idle_cores_contaminate_and_not_when_every_core_is_ours():
    xs = _series(50)
    beside = assess(Timing(ms=xs, wait=[0.0] * 50, threads=1, cpus=2, others_cores=0.95))
    assert beside.label == CONTAMINATED and "0.95 cores" in beside.reason
    # every core is the cell's: another process would have preempted it, which the waits show
    assert assess(Timing(ms=xs, wait=[0.0] * 50, threads=2, cpus=2, others_cores=0.95)).label == STABLE
    assert assess(Timing(ms=xs, wait=[0.0] * 50, steal_frac=0.2)).label == CONTAMINATED


def test_wide_spread_a_step_and_too_few_samples_are_unstable():
    wide = assess(Timing(ms=_series(100, spread=0.4)))
    assert wide.label == UNSTABLE and "spread" in wide.reason
    step = assess(Timing(ms=_series(30, 10.0, 0.01, seed=5) + _series(30, 13.0, 0.01, seed=6)))
    assert step.label == UNSTABLE and "step" in step.reason
    few = assess(Timing(ms=[5.0, 5.1, 5.05]))
    assert few.label == UNSTABLE and "too few" in few.reason
    assert (few.ci_lo, few.ci_hi) == (5.0, 5.1)


def test_noise_target_and_combine():
    tight, loose = _series(100, spread=0.01), _series(8, spread=0.3)
    assert noise_reached(Timing(ms=tight), 0.03)
    assert not noise_reached(Timing(ms=loose), 0.03)
    label, reason = combine([("kernel/fwd_ms", {"label": STABLE, "reason": ""}),
                             ("kernel/fwdbwd_ms", {"label": UNSTABLE, "reason": "step of +20 %"})])
    assert label == UNSTABLE and reason == "kernel/fwdbwd_ms: step of +20 %"


def test_add_timing_records_the_ci_the_left_out_calls_and_the_cells_stability():
    r = CellResult()
    xs = _series(40)
    r.add_timing(R.KERNEL_FWD_MS, Timing(ms=xs, wait=[0.0] * 39 + [0.9]), iqr=R.KERNEL_FWD_MS_IQR)
    lo, hi = R.ci_names(R.KERNEL_FWD_MS)
    m = r.metrics
    assert m[lo] <= m[R.KERNEL_FWD_MS] <= m[hi] and m[R.left_out_name(R.KERNEL_FWD_MS)] == 1
    assert r.tags[R.STABILITY] == STABLE
    r.add_timing(R.KERNEL_FWDBWD_MS, Timing(ms=[1.0, 3.0, 2.0]))
    assert r.tags[R.STABILITY] == UNSTABLE and r.tags[R.STABILITY_REASON].startswith("kernel/fwdbwd_ms:")


# ----------------------------------------------------------------------------- the timing loop
def test_time_calls_reads_the_scheduler_around_every_call_and_says_why_it_stopped():
    import torch

    from pipeline.measure import time_calls

    x = torch.randn(64, 64)
    t = time_calls(lambda: x @ x, "cpu", warmup=1, min_repeats=20, min_time_s=0.0, noise_target=0.5,
                   noise_max_s=1.0)
    assert len(t.ms) == len(t.wait) >= 20
    assert all(w is None or w >= 0 for w in t.wait)
    assert t.stop and t.threads >= 1 and t.cpus >= 1
    capped = time_calls(lambda: x @ x, "cpu", warmup=0, min_repeats=3, min_time_s=0.0, max_time_s=0.0)
    assert len(capped.ms) == 1 and capped.stop.startswith("max_time_s")


# ----------------------------------------------------------------------------- measure again
def _attempt(label: str, width: float = 0.01, status: str = "ok", why: str = "step of +20 %") -> CellResult:
    r = CellResult(status=status)
    if status == "ok":
        r.metrics[R.KERNEL_FWD_MS] = 10.0
        r.tags[R.STABILITY] = label
        reason = "" if label == STABLE else why
        r.tags[R.STABILITY_REASON] = reason
        r.figures = [{"metric": R.KERNEL_FWD_MS, "label": label, "reason": reason, "median": 10.0,
                      "ci": [10.0 * (1 - width), 10.0 * (1 + width)], "left_out": 0, "stop": ""}]
    return r


def _run(attempts, remeasure=2):
    queue, said, slept = list(attempts), [], []
    result = measure_until_stable({"remeasure": remeasure, "remeasure_pause_s": 7}, lambda: queue.pop(0),
                                  say=said.append, sleep=slept.append)
    return result, said, slept, queue


def test_a_contaminated_first_attempt_is_measured_again_and_the_stable_one_stands():
    result, said, slept, left = _run([_attempt(CONTAMINATED), _attempt(STABLE), _attempt(STABLE)])
    assert len(left) == 1 and slept == [7] and len(said) == 1 and "contaminated" in said[0]
    assert result.tags[R.STABILITY] == STABLE
    assert result.metrics[R.CELL_ATTEMPTS] == 2 and result.metrics[R.CELL_ATTEMPT] == 2
    assert result.tags[R.STABILITY_REASON].startswith("attempt 2 of 2 stands (attempt 1 contaminated)")
    arts = result.artifacts["attempts.json"]
    assert [a["stability"] for a in arts] == [CONTAMINATED, STABLE] and [a["stands"] for a in arts] == [False, True]


def test_never_stable_stops_at_the_limit_and_keeps_the_least_disturbed():
    result, said, _, _ = _run([_attempt(CONTAMINATED), _attempt(UNSTABLE, 0.2), _attempt(UNSTABLE, 0.05)])
    assert result.metrics[R.CELL_ATTEMPTS] == 3 and result.metrics[R.CELL_ATTEMPT] == 3
    assert result.tags[R.STABILITY] == UNSTABLE and len(said) == 2


def test_a_stable_first_attempt_or_a_failure_is_not_measured_again():
    result, said, slept, left = _run([_attempt(STABLE), _attempt(STABLE)])
    assert len(left) == 1 and not said and not slept and result.metrics[R.CELL_ATTEMPTS] == 1
    failed, said, _, left = _run([_attempt("", status="oom"), _attempt(STABLE)])
    assert failed.status == "oom" and len(left) == 1 and R.CELL_ATTEMPTS not in failed.metrics
    once, _, _, left = _run([_attempt(CONTAMINATED), _attempt(STABLE)], remeasure=0)
    assert len(left) == 1 and once.tags[R.STABILITY] == CONTAMINATED


def test_unstable_without_a_sign_of_another_process_is_not_measured_again():
    # a wide spread on a clean series is the kernel's own: a new process would measure the same
    own = _attempt(UNSTABLE, why="spread 30 % of the median (IQR/1.349; limit 25 %)")
    result, said, slept, left = _run([own, _attempt(STABLE)])
    assert len(left) == 1 and not said and not slept
    assert result.tags[R.STABILITY] == UNSTABLE and result.metrics[R.CELL_ATTEMPTS] == 1
    # the same spread with calls left out as disturbed is measured again
    hit = _attempt(UNSTABLE, why="spread 30 % of the median (IQR/1.349; limit 25 %)")
    hit.figures[0].update(left_out=2, calls=100)  # 2 % left out: a quiet machine's kworkers
    _, said, _, left = _run([hit, _attempt(STABLE)])
    assert len(left) == 1 and not said
    hit.figures[0].update(left_out=30, calls=100)
    result, said, _, left = _run([hit, _attempt(STABLE)])
    assert not left and result.tags[R.STABILITY] == STABLE and result.metrics[R.CELL_ATTEMPT] == 2


# ----------------------------------------------------------------------------- rounds
def test_rounds_interleave_every_cell_in_a_new_shuffled_order_per_round():
    from pipeline.sweep import interleave_rounds

    jobs = [[f"model=m{i}", "scenario=kernel"] for i in range(6)] + [["scenario=train"]]
    plan = [{"scenario": "kernel", "units": float(i)} for i in range(6)] + [{"scenario": "train", "units": 9.0}]
    out, out_plan = interleave_rounds(jobs, plan, [3] * 6 + [1], seed=1)
    assert len(out) == 6 * 3 + 1 and len(out_plan) == len(out)
    rounds = [next((a for a in j if a.startswith("+round=")), None) for j in out]
    # round 1 of every cell (and the cell without rounds) before any round 2, then round 3
    assert rounds[:7].count("+round=1") == 6 and rounds[:7].count(None) == 1
    assert set(rounds[7:13]) == {"+round=2"} and set(rounds[13:]) == {"+round=3"}
    firsts = [j[0] for j in out[7:13]]
    assert sorted(firsts) == [f"model=m{i}" for i in range(6)]
    assert firsts != [j[0] for j in out[13:]]  # a new order each round (seeded: fixed here)
    assert all(p["units"] == float(j[0][len("model=m"):]) for j, p in zip(out, out_plan) if "scenario=kernel" in j)


def test_a_short_series_keeps_a_disturbed_minority_and_flags_a_disturbed_half():
    five = Timing(ms=[5.0, 5.1, 5.05, 4.95, 9.0], wait=[0.0, 0.0, 0.0, 0.0, 0.7])
    a = assess(five)
    assert a.label != CONTAMINATED and a.excluded == 0 and a.median == 5.05
    half = Timing(ms=[5.0, 5.1, 9.0, 9.5], wait=[0.0, 0.0, 0.7, 0.8])
    assert assess(half).label == CONTAMINATED
