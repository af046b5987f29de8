"""Measurement engine: timing rule, summaries, peak memory, FLOPs (analytic vs counted)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from models.vanilla import VanillaAttention
from pipeline.analytic import score_entries, score_macs
from pipeline.measure import PeakMemory, count_flops, loss_fall_last_quarter, summarize, time_calls
from tests.support import REPO


def test_time_calls_meets_count_and_duration():
    calls = []
    samples = time_calls(lambda: (calls.append(1), time.sleep(0.01)), "cpu", warmup=2, min_repeats=3, min_time_s=0.15).ms
    assert len(calls) == len(samples) + 2
    assert len(samples) >= 3 and sum(samples) >= 150 * 0.9
    assert all(s >= 9 for s in samples)


def test_time_calls_warms_up_by_count_and_by_time():
    calls = []
    samples = time_calls(lambda: (calls.append(1), time.sleep(0.01)), "cpu", warmup=1, warmup_s=0.1,
                         min_repeats=2, min_time_s=0).ms
    assert len(samples) == 2 and len(calls) - 2 >= 8  # ~0.1 s of 10 ms calls, untimed


def test_time_calls_stops_at_max_time_with_one_sample():
    samples = time_calls(lambda: time.sleep(0.05), "cpu", warmup=0, min_repeats=1000, min_time_s=0, max_time_s=0.01).ms
    assert len(samples) == 1


def test_summarize():
    s = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    # 5 samples: too few for a 95 % CI of the median, so [min, max] (which covers 94 %)
    assert s == {"median": 3.0, "iqr": 2.0, "min": 1.0, "count": 5.0, "ci_lo": 1.0, "ci_hi": 5.0}
    with pytest.raises(ValueError):
        summarize([])


def test_loss_fall_over_the_last_quarter():
    # 8 steps: quarters of 2; third quarter mean 3, last 2: fell (3 - 2) / 2
    assert loss_fall_last_quarter([5, 5, 5, 5, 3, 3, 2, 2]) == pytest.approx(0.5)
    assert loss_fall_last_quarter([1.0] * 9) == 0.0  # flat (quarters of 9 // 4 = 2 steps, from the end)
    assert loss_fall_last_quarter([2, 1, 3, 4, 5, 6, 7]) is None  # fewer than 8 steps
    assert loss_fall_last_quarter([1.0] * 6 + [0.0, 0.0]) is None  # nothing to divide by


def test_cpu_peak_memory_sees_an_allocation():
    with PeakMemory("cpu") as pm:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    assert pm.method.startswith("VmHWM")
    assert 60 <= pm.peak_mb <= 200


def test_seed_figures():
    assert f"{score_macs(512, 768):.1e}" == "2.0e+08"
    assert f"{score_entries(512):.1e}" == "2.6e+05"
    assert f"{score_macs(8192, 1024):.1e}" == "6.9e+10"
    assert f"{score_entries(8192):.1e}" == "6.7e+07"
    assert score_macs(16 * 512, 768) == 256 * score_macs(512, 768)


@pytest.mark.parametrize("causal", [False, True])
def test_vanilla_analytic_flops_match_counter(causal):
    B, T, D, H = 2, 256, 128, 4
    attn = VanillaAttention(D, H, causal=causal)
    x = torch.randn(B, T, D)
    with torch.no_grad():
        counted = count_flops(lambda: attn(x))
    analytic = attn.flops(B, T)["total"]
    if causal:
        # this kernel computes the full square and masks it: the counter sees the whole square,
        # the analytic count only the useful (lower) half
        analytic += attn.mixing_flops(B, T)
    assert abs(counted - analytic) / analytic < 0.05


def _child_peak(model: str, n: int) -> float:
    """Forward peak of one kernel cell in a fresh process (clean baseline), in MiB."""
    code = f"""
import json, torch
from pipeline.registry import build_mixer, load_variant_cfg
from pipeline.measure import PeakMemory
torch.set_num_threads(2)
m = build_mixer(load_variant_cfg({model!r}), d_model=256, n_heads=4, causal=True)
x = torch.randn(1, {n}, 256)
with torch.no_grad():
    m(x)
    with PeakMemory("cpu") as pm:
        m(x)
print(json.dumps({{"peak": pm.peak_mb, "backend": m.backend}}))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "THP_MEM_ALLOC_ENABLE": "1", "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def test_memory_sanity_vanilla_vs_memory_efficient():
    """Vanilla at n=4096 (B=1, H=4, fp32) holds at least one n x n score tensor per head;
    the memory-efficient exact variant stays well under it."""
    n = 4096
    scores_mb = 4 * n * n * 4 / 2**20  # 256 MiB
    vanilla = _child_peak("vanilla", n)
    assert vanilla >= scores_mb, vanilla
    from pipeline.registry import discover_variants

    if "xformers" in discover_variants():
        efficient = _child_peak("xformers", n)
        assert efficient < scores_mb / 4, efficient
