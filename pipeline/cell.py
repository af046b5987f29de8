"""One grid cell, end to end: validate, resume or skip, run (isolated in a child process by
default), classify the outcome, record it in MLflow. A failing cell is recorded, never fatal.

    status = run_cell(cfg_dict, sweep=SweepInfo(...))     # parent side (no torch import needed)
    result = execute(cfg_dict)                            # what runs in the child process
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.config import config_hash, family_hash, flatten, validate
from pipeline.registry import REPO_ROOT
from pipeline.scenarios.base import CellResult, Diverged, failure_text, is_oom

# One allocator setup for every benchmark child process (CPU timings of T x T buffers depend on
# it: fresh pages fault on every call otherwise). THP_MEM_ALLOC_ENABLE makes torch's CPU allocator
# back large tensors with transparent huge pages; glibc then keeps freed heap memory instead of
# unmapping it (no mmap for big blocks, no trimming), so repeats reuse already-faulted pages.
ALLOCATOR_ENV = {
    "THP_MEM_ALLOC_ENABLE": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "18446744073709551615",
}


class SkipCell(Exception):
    """Pre-flight said no: the cell is recorded as `skipped` with this reason."""


@dataclass
class SweepInfo:
    sweep_id: str
    parent_run_id: str


def allocator_tag(env: dict[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    keys = list(ALLOCATOR_ENV)
    set_ = [f"{k}={env[k]}" for k in keys if k in env]
    return ",".join(set_) if set_ else "default"


# ----------------------------------------------------------------------------- parent side


def run_cell(d: dict[str, Any], sweep: SweepInfo | None = None, quiet: bool = False) -> str:
    """Run and record one cell; returns its status. Raises only for bad config or tracking."""
    validate(d)
    tcfg = d.get("tracking") or {}
    tr = tracking.Tracker(tracking.tracking_uri(tcfg.get("uri")), tcfg.get("experiment", "attnbench"))
    h, fam = config_hash(d), family_hash(d)
    name = tracking.run_name(d)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))

    if not d.get("overwrite"):
        prev = tr.find_reusable(h)
        if prev is not None:
            say(f"[attnbench] {name}: reusing finished run {prev.info.run_id} (config_hash {h}; overwrite=true reruns)")
            if sweep:
                tr.set_tag(sweep.parent_run_id, f"reused/{h}", prev.info.run_id)
            return "ok"

    tags = {
        "model": d["model"]["name"], "scenario": d["scenario"]["name"], "task": d["task"]["name"],
        "config_hash": h, "family_hash": fam, "status": "running", **tracking.host_tags(),
    }
    if sweep:
        tags["sweep_id"] = sweep.sweep_id
    run_id = tr.create_run(name, tags, sweep.parent_run_id if sweep else None)
    try:
        tr.log(run_id, params=flatten(d))
        tr.log_json(run_id, d, "config.json")
        result = _preflight_from_sweep(tr, d, sweep, fam)
        if result is None:
            with device_lock(d, say):
                t0 = time.perf_counter()
                result = _run_isolated(d) if d.get("isolate", True) else execute(d)
                result.metrics.setdefault("cell/wall_s", time.perf_counter() - t0)
        _record(tr, run_id, result)
    except BaseException as e:  # interrupted (Ctrl-C) or the tracker failed mid-way: leave no RUNNING run
        try:
            reason = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
            tr.log(run_id, tags={"status": "error", "failure_reason": reason.splitlines()[0][:500]})
            tr.end_run(run_id, "error")
        finally:
            raise
    msg = f"[attnbench] {name}: {result.status}"
    if result.failure_reason:
        msg += f" ({result.failure_reason})"
    say(msg)
    return result.status


@contextlib.contextmanager
def device_lock(d: dict[str, Any], say=print):
    """One measuring cell per device of a host at a time: parallel jobs (submitit arrays, several
    sweeps) would otherwise share cores or a GPU and distort each other's timings. An advisory
    `flock` on a file named after the host and device; released when the cell ends or dies."""
    import fcntl
    import socket

    from pipeline.registry import cache_dir

    tr = d.get("trainer") or {}
    if tr.get("accelerator") in ("gpu", "cuda"):
        # the physical GPU: SLURM names it even where cgroups renumber every task's GPU as 0
        visible = (os.environ.get("SLURM_STEP_GPUS") or os.environ.get("SLURM_JOB_GPUS")
                   or os.environ.get("CUDA_VISIBLE_DEVICES") or "0")
        device = "cuda" + visible.split(",")[0]
    else:
        device = "cpu"
    path = cache_dir() / f"device-{socket.gethostname()}-{device}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"[attnbench] waiting for another cell measuring on {device} ({path})")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _preflight_from_sweep(tr, d, sweep, fam) -> CellResult | None:
    """A longer n of a cell line that already ran out of memory in this sweep is not attempted."""
    if sweep is None:
        return None
    failed = tr.find_family_oom(sweep.sweep_id, fam, d["seq_len"])
    if failed is None:
        return None
    n = failed.data.params.get("seq_len")
    return CellResult(status="skipped", failure_reason=f"same cell ran out of memory at n={n} (run {failed.info.run_id})",
                      tags={"skipped_after": failed.info.run_id})


def _record(tr, run_id: str, result: CellResult) -> None:
    tags = {**result.tags, "status": result.status, "failure_reason": result.failure_reason[:5000]}
    tr.log(run_id, params=result.params, tags=tags, metrics=result.metrics, series=result.series)
    for name, payload in result.artifacts.items():
        if isinstance(payload, str):
            with tempfile.TemporaryDirectory() as tmp:
                p = Path(tmp) / name
                p.write_text(payload)
                tr.log_file(run_id, p)
        else:
            tr.log_json(run_id, payload, name)
    tr.end_run(run_id, result.status)


def _child_env(d: dict[str, Any]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(ALLOCATOR_ENV)
    paths = [str(REPO_ROOT), os.getcwd()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    threads = (d.get("trainer") or {}).get("num_threads")
    if threads and int((d.get("trainer") or {}).get("devices", 1)) == 1:
        # one process: OpenMP may size its pool from the start (several ranks must not: DDP sets it per rank)
        env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _run_isolated(d: dict[str, Any]) -> CellResult:
    """Run `execute` in a fresh interpreter: a clean peak-memory baseline, and a crash, a kill by
    the OOM killer or a hang becomes a recorded status instead of the end of the sweep."""
    timeout = float(d.get("timeout_s", 900))
    with tempfile.TemporaryDirectory(prefix="attnbench-cell-") as tmp:
        cell_file, result_file = Path(tmp) / "cell.json", Path(tmp) / "result.json"
        cell_file.write_text(json.dumps(d))
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.worker", str(cell_file), str(result_file)],
                                env=_child_env(d), start_new_session=True, preexec_fn=_die_with_parent)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return CellResult(status="timeout", failure_reason=f"cell exceeded timeout_s={timeout:g} and was killed")
        except KeyboardInterrupt:
            _kill_group(proc)
            raise
        if result_file.exists():
            return CellResult.from_dict(json.loads(result_file.read_text()))
        if rc < 0:
            sig = signal.Signals(-rc).name
            if -rc == signal.SIGKILL:
                return CellResult(status="oom", failure_reason=f"cell process killed by {sig} (most likely the kernel's OOM killer)")
            return CellResult(status="error", failure_reason=f"cell process died of {sig}")
        return CellResult(status="error", failure_reason=f"cell process exited with code {rc} without a result")


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, be killed when the cell's parent dies (a killed sweep
    must not leave its cell measuring on, unrecorded, beside the resumed one)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# ----------------------------------------------------------------------------- child side


def execute(d: dict[str, Any]) -> CellResult:
    """Set up threads, seed and device, run the scenario, classify any failure. Never raises."""
    result = CellResult()
    try:
        import torch
        from omegaconf import OmegaConf

        from pipeline.scenarios import load_all

        cfg = OmegaConf.create(d)
        device = _device(cfg)
        # several ranks share the cores: each gets its share, never the whole machine
        world = int(cfg.trainer.devices) if str(cfg.trainer.get("strategy", "auto")).startswith("ddp") else 1
        threads = cfg.trainer.get("num_threads") or max(1, len(os.sched_getaffinity(0)) // world)
        torch.set_num_threads(int(threads))
        torch.manual_seed(int(cfg.seed))
        from pipeline.measure import device_name

        result.tags.update({
            "device": device.type, "device_name": device_name(device),
            "num_threads": str(torch.get_num_threads()), "world_size": str(world), "torch_version": torch.__version__,
            "allocator": allocator_tag(),
            "fp32_matmul": fp32_matmul_tag(),
        })
        preflight(cfg, device, result)
        load_all()[cfg.scenario.name](cfg, device, result)
    except SkipCell as e:
        result.status, result.failure_reason = "skipped", str(e)
    except Diverged as e:
        result.status, result.failure_reason = "diverged", str(e) or "non-finite loss"
    except BaseException as e:
        result.status = "oom" if is_oom(e) else "error"
        result.failure_reason = failure_text(e)
        result.artifacts["traceback.txt"] = traceback.format_exc()
        if isinstance(e, KeyboardInterrupt):
            raise
    return result


def fp32_matmul_tag() -> str:
    """The precision fp32 matmuls run at: "highest" is full fp32; "high"/"medium" let CUDA use TF32
    (bf16 on some CPUs). The getter refuses once the newer per-backend setting has been used."""
    import torch

    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return f"cuda matmul fp32_precision={torch.backends.cuda.matmul.fp32_precision}"


def wants_cuda(d) -> bool:
    """Whether a cell config (dict or DictConfig) asks for a CUDA device."""
    return str((d.get("trainer") or {}).get("accelerator")) in ("gpu", "cuda")


def cuda_missing() -> str | None:
    """Why a cell asking for a GPU cannot run on this machine (None when CUDA is there). Imports
    torch: call it only for such cells. `is_available` counts devices without creating a context."""
    import torch

    if torch.cuda.is_available():
        return None
    build = "built without CUDA" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, no device visible"
    return f"trainer.accelerator=gpu but this machine has no usable CUDA device (torch {torch.__version__}: {build})"


def _device(cfg):
    import torch

    if wants_cuda(cfg):
        why = cuda_missing()
        if why is not None:
            raise RuntimeError(why)
        return torch.device("cuda", 0)
    return torch.device("cpu")


def preflight(cfg, device, result: CellResult) -> None:
    """Check the variant accepts this length and predict the cell's memory from the variant's
    analytic model; over budget -> SkipCell, before any compute."""
    import torch

    from pipeline.measure import available_memory_bytes, total_memory_bytes
    from pipeline.registry import build_mixer

    bb = cfg.backbone
    mixer = build_mixer(cfg.model, d_model=bb.d_model, n_heads=bb.n_heads, causal=cfg.causal)
    mixer.check_seq_len(int(cfg.seq_len))
    for flag in ("exact", "is_attention", "materialises_scores", "time_order", "memory_order"):
        result.tags[flag] = str(getattr(mixer, flag))
    dtype_bytes = torch.empty((), dtype=getattr(torch, bb.dtype)).element_size()
    B, T = int(cfg.batch_size), int(cfg.seq_len)
    per_mixer = mixer.memory_bytes(B, T, dtype_bytes)
    budget_gb = cfg.get("budget", {}).get("memory_gb")
    budget = float(budget_gb) * 2**30 if budget_gb else 0.8 * available_memory_bytes(device)
    result.params["budget_mem_mb"] = round(budget / 2**20, 3)
    result.params["device_memory_gb"] = round(total_memory_bytes(device) / 2**30, 3)
    if cfg.scenario.name == "kernel":
        # the forward must fit; forward+backward (activations kept, plus their gradients: about
        # twice) is a separate phase the kernel scenario drops, with a tag, when it would not
        predicted = per_mixer
        result.params["predicted_mem_fwdbwd_mb"] = round(2 * per_mixer / 2**20, 3)
    else:
        # every block keeps its mixer's and MLP's activations for backward; x2 for gradients
        mlp = B * T * bb.d_model * (2 * bb.mlp_ratio + 6) * dtype_bytes
        predicted = bb.n_layers * (per_mixer + mlp) * 2
    result.params["predicted_mem_mb"] = round(predicted / 2**20, 3)
    if predicted > budget:
        raise SkipCell(f"predicted peak {predicted / 2**30:.2f} GiB exceeds the memory budget {budget / 2**30:.2f} GiB")
