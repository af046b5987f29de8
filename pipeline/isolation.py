"""Isolation: a cell measured in a child process of its own with the one allocator setup every
cell uses, so peak memory starts clean and a crash, an out-of-memory kill or a hang becomes the
cell's recorded status instead of the end of the sweep.

    result = run_isolated(cell_dict)     # CellResult from pipeline.execute in the child, or a failure

Two ways to start that child (`isolation=` in the config):
- `fork` (default): a fresh fork of a warm server process (multiprocessing's forkserver), started
  once per sweep process with the allocator environment, that has imported torch, the variants
  and the scenarios (pipeline/preload.py) but has allocated no tensors, started no OpenMP pool
  and never touched CUDA: each cell still gets a process of its own, without paying 5-10 s of
  imports. CUDA stays safe to use in the child because the server never initialises it (the
  preload checks `torch.cuda.is_initialized()`); the thread count is set per cell in the child.
- `spawn`: a fresh interpreter per cell (pipeline/worker.py). Used for several ranks
  (trainer=ddp), since Lightning's DDP launcher re-runs the cell's command line for every rank.
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

from pipeline.allocator import ALLOCATOR_ENV
from pipeline.registry import REPO_ROOT
from pipeline.scenarios.base import CellResult


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


def isolation_mode(d: dict[str, Any]) -> str:
    """`fork` or `spawn` for this cell: several ranks always spawn (see the module docstring)."""
    tr = d.get("trainer") or {}
    if str(tr.get("strategy", "auto")).startswith("ddp") or int(tr.get("devices", 1)) > 1:
        return "spawn"
    return str(d.get("isolation", "fork"))


def run_isolated(d: dict[str, Any]) -> CellResult:
    """Run `execute` in a child process of its own: a clean peak-memory baseline, and a crash, a
    kill by the OOM killer or a hang becomes a recorded status instead of the end of the sweep."""
    timeout = float(d.get("timeout_s", 900))
    with tempfile.TemporaryDirectory(prefix="attnbench-cell-") as tmp:
        cell_file, result_file = Path(tmp) / "cell.json", Path(tmp) / "result.json"
        cell_file.write_text(json.dumps(d))
        start = _start_forked if isolation_mode(d) == "fork" else _start_spawned
        wait, kill = start(d, cell_file, result_file)
        try:
            rc = wait(timeout)
        except subprocess.TimeoutExpired:
            kill()
            return CellResult(status="timeout", failure_reason=f"cell exceeded timeout_s={timeout:g} and was killed")
        except KeyboardInterrupt:
            kill()
            raise
        if result_file.exists():
            return CellResult.from_dict(json.loads(result_file.read_text()))
        if rc < 0:
            sig = signal.Signals(-rc).name
            if -rc == signal.SIGKILL:
                return CellResult(status="oom", failure_reason=f"cell process killed by {sig} (most likely the kernel's OOM killer)")
            return CellResult(status="error", failure_reason=f"cell process died of {sig}")
        return CellResult(status="error", failure_reason=f"cell process exited with code {rc} without a result")


def _start_spawned(d, cell_file: Path, result_file: Path):
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.worker", str(cell_file), str(result_file)],
                            env=_child_env(d), start_new_session=True, preexec_fn=_die_with_parent)

    def kill():
        _kill_group(proc.pid)
        proc.wait()

    return (lambda timeout: proc.wait(timeout=timeout)), kill


_SERVER_ENV_KEYS = ("PYTHONPATH", "PYTHONUNBUFFERED", *ALLOCATOR_ENV)


_SERVER_ROUND: list = []  # the round of the last cell that had one (rounds > 1)


def _fork_context(round_=None):
    """multiprocessing's forkserver context, its server started (once per process) with the
    cells' environment: the allocator setup must be there when glibc and torch initialise.

    A new round gets a new server: forks share their server's address-space layout, and the
    heap's layout decides how many freed n×n buffers glibc reuses (peak memory on a CPU moved by
    a whole score tensor between sweeps, never between forks of one server) and moves some
    timings; rounds of separate servers carry that variance, as separate sweeps do."""
    import multiprocessing as mp
    from multiprocessing import forkserver

    if round_ is not None:  # cells outside rounds (round None) use whichever server runs
        if _SERVER_ROUND and _SERVER_ROUND[0] != round_:
            forkserver._forkserver._stop()  # the next ensure_running starts a fresh one
        _SERVER_ROUND[:] = [round_]
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["pipeline.preload"])
    env = _child_env({})
    saved = {k: os.environ.get(k) for k in _SERVER_ENV_KEYS}
    os.environ.update({k: env[k] for k in _SERVER_ENV_KEYS if k in env})
    try:
        forkserver.ensure_running()  # a no-op once it runs
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return ctx


def _start_forked(d, cell_file: Path, result_file: Path):
    proc = _fork_context(d.get("round")).Process(target=_forked_cell, args=(str(cell_file), str(result_file)), daemon=False)
    proc.start()

    def wait(timeout: float) -> int:
        proc.join(timeout)
        if proc.exitcode is None:
            raise subprocess.TimeoutExpired("forked cell", timeout)
        return proc.exitcode

    def kill():
        _kill_group(proc.pid)
        proc.join()

    return wait, kill


def _forked_cell(cell_file: str, result_file: str) -> None:
    """The child of the warm server: its own session (so a timeout kills all it started), killed
    with its parent, then the same work as pipeline.worker."""
    os.setsid()
    _die_with_parent()
    d = json.loads(Path(cell_file).read_text())
    threads = (d.get("trainer") or {}).get("num_threads")
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for libraries started later; torch is set in execute
    from pipeline.worker import main

    main([cell_file, result_file])


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, be killed when the cell's parent dies (a killed sweep
    must not leave its cell measuring on, unrecorded, beside the resumed one)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
