"""The CUDA side, and the pieces of `make gpu-check` that can be checked without a GPU.

`gpu`-marked tests need CUDA and are skipped without it (scripts/gpu_check.sh runs them on the
device): xFormers' own kernel runs bf16 and agrees with vanilla on the same weights; vanilla's
forward holds its T x T scores in GPU memory and xFormers' does not; an oversized cell is recorded
as `oom` and the next cell still runs. The rest runs here: the dry run of gpu_check.sh (every cell
of grid=gpu_check composed and validated) and the summary it ends with, on a synthetic store.

    pytest -m gpu tests/gpu/test_gpu.py     # on a CUDA machine
    pytest tests/gpu/test_gpu.py            # anywhere
"""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest
import torch

from models.vanilla import VanillaAttention
from models.xformers_attn import XformersAttention
from pipeline import record as R
from pipeline.cell import run_cell
from pipeline.config import to_dict
from pipeline.measure import PeakMemory
from pipeline.registry import discover_variants
from pipeline.report import gpu_summary
from pipeline.tracking import Tracker
from tests.support import REPO, compose

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ============================================================================ on a GPU


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("causal", [True, False])
def test_xformers_kernel_runs_bf16_and_matches_vanilla(causal):
    """Same weights, same input: xFormers' kernel (not the SDPA fallback) agrees with exact
    attention to bf16 rounding, forward and input gradient, against an fp32 vanilla reference."""
    dev = torch.device("cuda", 0)
    torch.manual_seed(0)
    van = VanillaAttention(256, 4, causal=causal).to(dev)
    xf = XformersAttention(256, 4, causal=causal).to(dev)
    xf.load_state_dict(van.state_dict())
    x_BTD = torch.randn(2, 1024, 256, device=dev)
    g_BTD = torch.randn_like(x_BTD)

    x32 = x_BTD.clone().requires_grad_(True)
    y_ref = van(x32)
    y_ref.backward(g_BTD)

    outs = {}
    for name, mixer in (("xformers", xf.to(torch.bfloat16)), ("vanilla", van.to(torch.bfloat16))):
        x16 = x_BTD.to(torch.bfloat16).requires_grad_(True)
        y16 = mixer(x16)
        y16.backward(g_BTD.to(torch.bfloat16))
        outs[name] = (_rel(y16, y_ref), _rel(x16.grad, x32.grad))
    assert xf.backend == "xformers", f"fell back to {xf.backend}: {xf.fallback_reason}"
    assert xf.fallback_reason is None

    (err_x, gerr_x), (err_v, gerr_v) = outs["xformers"], outs["vanilla"]
    # bf16 keeps 8 bits of mantissa: both bf16 runs sit ~1e-3..1e-2 from the fp32 reference;
    # xformers may differ from vanilla's rounding, not by more than a few times it
    assert err_x < 2e-2, f"xformers bf16 vs fp32 exact: relative error {err_x:.2e}"
    assert err_x < 3 * err_v + 1e-3, f"xformers {err_x:.2e} vs vanilla bf16 {err_v:.2e}: more than rounding"
    assert gerr_x < max(3e-2, 3 * gerr_v), f"input gradient: xformers {gerr_x:.2e}, vanilla bf16 {gerr_v:.2e}"


@pytest.mark.gpu
@needs_cuda
def test_peak_memory_vanilla_holds_the_scores_xformers_does_not():
    """bf16 forward at n=8192, B=1, H=4, K=64: one (B, H, T, T) score tensor is 512 MiB. Vanilla
    must allocate more than that; xFormers' peak must stay below an eighth of it."""
    dev = torch.device("cuda", 0)
    B, H, K, T = 1, 4, 64, 8192
    score_bytes = B * H * T * T * 2
    peaks = {}
    for name, cls in (("vanilla", VanillaAttention), ("xformers", XformersAttention)):
        mixer = cls(H * K, H, causal=True).to(dev, torch.bfloat16)
        x_BTD = torch.randn(B, T, H * K, device=dev, dtype=torch.bfloat16)
        with torch.no_grad():
            mixer(x_BTD)  # lazy init (cuBLAS workspace, kernel selection) outside the measurement
            with PeakMemory(dev) as pm:
                mixer(x_BTD)
        assert pm.method == "cuda.max_memory_allocated"
        peaks[name] = (pm.peak_mb * 2**20, mixer.backend)
        del mixer, x_BTD
        torch.cuda.empty_cache()
    assert peaks["vanilla"][0] > score_bytes, peaks
    assert peaks["xformers"][1] == "xformers", peaks
    assert peaks["xformers"][0] < score_bytes / 8, peaks


@pytest.mark.gpu
@needs_cuda
def test_oversized_cell_is_recorded_as_oom_and_the_next_cell_runs(store_uri):
    """Vanilla at n=262144 asks for a 512 GiB score matrix. With pre-flight opened (a huge
    budget) the isolated cell really runs out of GPU memory: recorded `oom`, FAILED; the sweep's
    next cell, in a fresh process, runs ok on the same GPU."""
    exp = "gpu-oom"
    base = ["model=vanilla", "trainer=gpu", "backbone=small", "backbone.dtype=bfloat16", "isolate=true",
            "timeout_s=120", "scenario.min_time_s=0", "scenario.noise_max_s=0", "scenario.min_repeats=2", "scenario.warmup=1", "scenario.warmup_s=0",
            "scenario.count_flops=false", f"tracking.uri={store_uri}", f"tracking.experiment={exp}"]
    big = to_dict(compose([*base, "seq_len=262144", "budget.memory_gb=1000000"]))
    assert run_cell(big, quiet=True) == "oom"
    assert run_cell(to_dict(compose([*base, "seq_len=1024"])), quiet=True) == "ok"

    runs = {r.data.params["seq_len"]: r for r in Tracker(store_uri, exp).search("")}
    oom, ok = runs["262144"], runs["1024"]
    assert oom.info.status == "FAILED" and oom.data.tags[R.STATUS] == "oom"
    assert "out of memory" in oom.data.tags[R.FAILURE_REASON].lower()
    assert ok.info.status == "FINISHED" and ok.data.tags[R.STATUS] == "ok"
    assert ok.data.tags[R.DEVICE] == "cuda" and ok.data.tags[R.BACKEND] == "torch-matmul"
    assert ok.data.tags[R.MEMORY_METHOD] == "cuda.max_memory_allocated"
    assert ok.data.metrics[R.KERNEL_FWD_MS] > 0 and ok.data.metrics[R.KERNEL_PEAK_MEM_MB] > 0


# ============================================================================ anywhere


def test_gpu_check_dry_run_prints_the_plan_and_validates_every_cell(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "GPU_CHECK_WORK": str(tmp_path / "work")}
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for name in ("install", "gpu", "probe", "xformers", "plan", "pytest", "sweep", "report", "summary", "collect"):
        assert re.search(rf"^  {name} +timeout +\d+s", out, re.MULTILINE), f"step {name} missing:\n{out}"
    assert "pipeline.run -m grid=gpu_check" in out and "-m gpu tests/gpu/test_gpu.py" in out
    m = re.search(r"^grid=gpu_check: (\d+) cells in (\d+) grids, every one composes and validates$", out, re.MULTILINE)
    assert m, out
    assert int(re.search(r"^cells: (\d+)$", out, re.MULTILINE).group(1)) == int(m.group(1)) > 0
    for variant in discover_variants():  # model=glob(*): every variant in the bf16 kernel grid
        assert re.search(rf"^  kernel +{variant} +dtype=bfloat16 +n=", out, re.MULTILINE), variant
    assert re.search(r"^  train +\w+ .*precision=bf16-mixed n=(\d+),\1\+ckpt$", out, re.MULTILINE), out
    for variant in ("vanilla", "xformers"):  # fp32 too, from n = 1024
        assert re.search(rf"^  kernel +{variant} +dtype=float32 +n=1024,", out, re.MULTILINE), out
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()  # a dry run writes nothing


# the default sweep's grid and the smoke grid stay in `make test`; composing every other cell of
# every other grid takes 3-20 s a grid, and runs with the slow tests (.ci/run runs them)
_FAST_GRIDS = ("cpu", "smoke")


@pytest.mark.parametrize("grid", [pytest.param(g, marks=() if g in _FAST_GRIDS else pytest.mark.slow)
                                  for g in sorted(p.stem for p in (REPO / "conf" / "grid").glob("*.yaml"))])
def test_every_shipped_grid_composes_and_validates(grid, capsys):
    assert gpu_summary.plan(grid, []) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert re.search(rf"^grid={grid}: [1-9]\d* cells in \d+ grids, every one composes and validates$", out, re.MULTILINE)


def test_plan_rejects_a_cell_that_does_not_validate(capsys):
    assert gpu_summary.plan("gpu_check", ["backbone.n_heads=3"]) == 1
    assert "FAIL cell does not validate" in capsys.readouterr().out
    # as the sweeper does: a task that cannot be laid out at the cell's length (MQAR in 16 tokens)
    assert gpu_summary.plan("smoke", ["seq_len=16"]) == 1  # its full and train cells are MQAR
    out = capsys.readouterr().out
    assert "FAIL cell does not validate" in out and "mqar" in out


# --- the summary, on a store shaped like a gpu_check sweep, with known answers ---

N = (1024, 4096, 16384, 32768, 65536, 131072)


def _write_sweep(uri: str, exp: str, xformers_backend: str = "xformers", cut: int = 0, never_started: int = 0) -> None:
    """vanilla fwd = 1e-6 n^2 ms until oom at 65536 (131072 skipped); xformers 1e-7 n^2 ms at
    every n; ssm 1e-4 n ms; training: vanilla 4000 -> 1000 MB with checkpointing, xformers 800 -> 600."""
    tr = Tracker(uri, exp)
    parent = tr.create_run("sweep-gpu_check-s1", {"sweep_id": "s1", "attnbench.role": "sweep", "status": "ok"})
    i = 0

    def cell(model, scenario, n, status, metrics=(), dtype="bfloat16", ckpt=False, backend="", reason="", tags=None):
        nonlocal i
        i += 1
        tags = {"model": model, "scenario": scenario, "task": "mqar", "status": status, "sweep_id": "s1",
                "config_hash": f"h{i}", "device": "cuda", "device_name": "Test GPU", "torch_version": "2.11.0",
                "xformers_version": "0.0.35", "failure_reason": reason, **(tags or {})}
        if backend:
            tags[R.BACKEND] = backend
        if backend == "xformers":
            tags[R.BACKEND_DETAIL] = "op fa2F@2.7.4-pt; xformers C++ extension not loaded (test)"
        elif model == "xformers" and backend:
            tags[R.BACKEND_NOTE] = "xformers has no operator for these inputs: (test)"
        run = tr.create_run(f"{model}-n{n}-{scenario}", tags, parent)
        params = {"seq_len": n, "backbone.dtype": dtype, "trainer.grad_checkpointing": ckpt,
                  "trainer.precision": "bf16-mixed" if scenario == "train" else "32-true"}
        tr.log(run, params=params, metrics=dict(metrics))
        tr.end_run(run, status)

    for n in N:
        if n <= 32768:
            cell("vanilla", "kernel", n, "ok", {R.KERNEL_FWD_MS: 1e-6 * n**2, R.KERNEL_FWDBWD_MS: 3e-6 * n**2,
                                                R.KERNEL_PEAK_MEM_MB: 1e-5 * n**2}, backend="torch-matmul")
        elif n == 65536:
            cell("vanilla", "kernel", n, "oom", reason="OutOfMemoryError: CUDA out of memory. Tried to allocate 32 GiB")
        else:
            cell("vanilla", "kernel", n, "skipped", reason="same cell ran out of memory at n=65536 (run x)")
        cell("xformers", "kernel", n, "ok", {R.KERNEL_FWD_MS: 1e-7 * n**2, R.KERNEL_FWDBWD_MS: 2e-7 * n**2,
                                             R.KERNEL_PEAK_MEM_MB: 1e-3 * n},
             backend=xformers_backend if n == 4096 else "xformers")
        cell("ssm", "kernel", n, "ok", {R.KERNEL_FWD_MS: 1e-4 * n, R.KERNEL_FWDBWD_MS: 3e-4 * n,
                                        R.KERNEL_PEAK_MEM_MB: 1e-3 * n}, backend="fft-conv")
    cell("vanilla", "kernel", 4096, "ok", {R.KERNEL_FWD_MS: 2.0}, dtype="float32", backend="torch-matmul",
         tags={"fwdbwd_skipped": "out of memory in forward+backward: OutOfMemoryError: CUDA out of memory (test)"})
    for _ in range(cut):  # what the deadline's SIGINT leaves of the cell it stops (pipeline/cell.py)
        cell("xformers", "kernel", 4096, "error", dtype="float32", reason="interrupted")
    cell("vanilla", "kernel", 32768, "skipped", dtype="float32",
         reason="predicted peak 96.50 GiB exceeds the memory budget 63.00 GiB")
    for model, (off, on), be in (("vanilla", (4000, 1000), "torch-matmul"), ("xformers", (800, 600), "xformers")):
        for ckpt, mem, ms in ((False, off, 40.0), (True, on, 52.0)):
            cell(model, "train", 4096, "ok", {R.TRAIN_PEAK_MEM_MB: mem, R.TRAIN_STEP_MS: ms}, ckpt=ckpt, backend=be)
    tr.log(parent, params={"n_cells": i + never_started})
    tr.end_run(parent, "ok")


def test_summary_of_a_gpu_check_sweep(store_uri):
    _write_sweep(store_uri, "summary-ok")
    buf = io.StringIO()
    failed = gpu_summary.summarize("summary-ok", None, store_uri, out=buf)  # None: the newest sweep
    text = buf.getvalue()
    assert failed == 0, text
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.split() and ln.split()[0] in ("vanilla", "xformers", "ssm")}
    # vanilla bf16: 4 timings, then oom and skip; exponents exact for pure power laws
    van = next(ln for ln in text.splitlines() if ln.startswith("vanilla ") and "oom" in ln)
    assert van.split()[1:] == ["torch-matmul", "1.05", "16.8", "268", "1074", "oom", "skip", "2.00", "2.00", "2.00"]
    assert lines["ssm"].split()[-3:] == ["1.00", "1.00", "1.00"]
    assert "xformers vs vanilla (bfloat16) at n=32768, the largest both ran: forward 10.0x faster" in text
    assert "forward+backward 15.0x faster" in text
    assert "vanilla (bfloat16) n=65536: oom: OutOfMemoryError: CUDA out of memory" in text
    assert "vanilla (float32) n=32768: skipped: predicted peak 96.50 GiB" in text
    assert ("vanilla (float32) n=4096: forward ok, forward+backward not run: out of memory in forward+backward: "
            "OutOfMemoryError: CUDA out of memory (test)") in text
    assert re.search(r"^vanilla +4096 torch-matmul +4000 +1000 +-75% +40\.0 +52\.0 +\+30%$", text, re.MULTILINE), text
    assert "PASS  vanilla bf16 ran, then hit the memory limit within the grid (first at n=65536: oom)" in text
    assert "PASS  xformers bf16 ran at every length the sweep reached, up to n=131072" in text
    assert "24 cells of 24 planned: " in text and "not reached" not in text
    assert "xformers operator: op fa2F@2.7.4-pt; xformers C++ extension not loaded (test)" in text
    assert "fell back because" not in text
    assert text.rstrip().endswith("result: 5/5 checks passed")


def test_summary_fails_when_xformers_fell_back_in_bf16(store_uri):
    _write_sweep(store_uri, "summary-fallback", xformers_backend="sdpa-flash")
    buf = io.StringIO()
    assert gpu_summary.summarize("summary-fallback", "s1", store_uri, out=buf) == 1
    assert "FAIL  xformers reports backend `xformers` in every bf16 cell that ran (8 cells; other: sdpa-flash)" \
        in buf.getvalue()
    assert "xformers fell back because: xformers has no operator for these inputs: (test)" in buf.getvalue()


def test_summary_counts_cells_the_deadline_stopped_as_not_reached(store_uri):
    _write_sweep(store_uri, "summary-cut", cut=1, never_started=2)
    buf = io.StringIO()
    failed = gpu_summary.summarize("summary-cut", "s1", store_uri, out=buf)
    text = buf.getvalue()
    assert failed == 0, text
    assert "25 cells of 27 planned: " in text and "1 cut" in text
    assert "not reached before the deadline: 1 cut short (interrupted), 2 never started" in text
    assert "PASS  no cell ended in error, timeout or divergence" in text
    # a cell that failed on its own still fails the check
    _write_sweep(store_uri, "summary-error")
    tr = Tracker(store_uri, "summary-error")
    run = tr.create_run("performer-n4096-kernel", {"model": "performer", "scenario": "kernel", "status": "error",
                                                   "sweep_id": "s1", "config_hash": "hx",
                                                   "failure_reason": "RuntimeError: boom"}, None)
    tr.log(run, params={"seq_len": 4096, "backbone.dtype": "bfloat16"})
    tr.end_run(run, "error")
    buf = io.StringIO()
    assert gpu_summary.summarize("summary-error", "s1", store_uri, out=buf) == 1
    assert "FAIL  no cell ended in error, timeout or divergence: performer n=4096 kernel error: RuntimeError: boom" \
        in buf.getvalue()


def test_summary_command_line(store_uri, capsys):
    _write_sweep(store_uri, "summary-cli")
    assert gpu_summary.main(["summary", "--experiment", "summary-cli", "--uri", store_uri]) == 0
    assert capsys.readouterr().out.rstrip().endswith("result: 5/5 checks passed")
    assert gpu_summary.main(["summary", "--experiment", "no-such-experiment", "--uri", store_uri]) == 1
    assert "FAIL nothing to summarise: no MLflow experiment named 'no-such-experiment'" in capsys.readouterr().out
