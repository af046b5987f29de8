"""Isolation: a cell measured in a fresh child process with the one allocator setup every cell
uses, so peak memory starts clean and a crash, an out-of-memory kill or a hang becomes the cell's
recorded status instead of the end of the sweep.

    result = run_isolated(cell_dict)     # CellResult from pipeline.execute in the child, or a failure
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipeline.registry import REPO_ROOT
from pipeline.scenarios.base import CellResult

# One allocator setup for every benchmark child process (CPU timings of T x T buffers depend on
# it: fresh pages fault on every call otherwise). THP_MEM_ALLOC_ENABLE makes torch's CPU allocator
# back large tensors with transparent huge pages; glibc then keeps freed heap memory instead of
# unmapping it (no mmap for big blocks, no trimming), so repeats reuse already-faulted pages.
ALLOCATOR_ENV = {
    "THP_MEM_ALLOC_ENABLE": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "18446744073709551615",
}


def allocator_tag(env: dict[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    keys = list(ALLOCATOR_ENV)
    set_ = [f"{k}={env[k]}" for k in keys if k in env]
    return ",".join(set_) if set_ else "default"


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


def run_isolated(d: dict[str, Any]) -> CellResult:
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
