"""Test helpers (plain functions, imported as `from tests.support import compose`): Hydra
composition of the real config tree and the command line, as a user would run them."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from pipeline.registry import REPO_ROOT as REPO


def compose(overrides: list[str]):
    """The real config tree, composed as `python -m pipeline.run <overrides>` would."""
    from pipeline.config import compose as compose_cell

    return compose_cell(overrides)


def run_cli(args: list[str], env: dict | None = None, cwd: Path | None = None, timeout: int = 300):
    import subprocess

    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "pipeline.run", *args], cwd=cwd or REPO, env=e,
                          capture_output=True, text=True, timeout=timeout)


def runs_compiled(name: str) -> bool:
    """Whether the variant runs only compiled (a compile for each new shape: 3-20 s on 2 cores)."""
    from hydra.utils import get_class

    from pipeline.registry import load_variant_cfg

    return bool(getattr(get_class(load_variant_cfg(name)["_target_"]), "runs_compiled", False))


def variant_params() -> list:
    """Every discovered variant as a pytest parameter; a variant that runs only compiled goes to
    the slow suite (its own tests keep a fast share), so `make test` stays in its time."""
    import pytest

    from pipeline.registry import discover_variants

    return [pytest.param(n, marks=pytest.mark.slow) if runs_compiled(n) else n for n in discover_variants()]


def table_row(section: str, *starts: str) -> str:
    """The Markdown table row of a report section whose first cells are `starts`."""
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[: len(starts)] == list(starts):
            return line
    raise AssertionError(f"no row starting {starts} in:\n{section}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(d: Path, port: int, env: dict[str, str], wait_s: float = 240):
    """scripts/mlflow_server.sh on a loopback port over the SQLite store `d/server.db`, in a
    process group of its own; returns (uri, process) once /health answers."""
    import subprocess
    import time
    import urllib.request

    log = d / "server.log"
    env = {**env, "PORT": str(port), "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{d / 'server.db'}",
           "MLFLOW_ARTIFACTS_DESTINATION": str(d / "artifacts"), "MLFLOW_WORKERS": env.get("MLFLOW_WORKERS", "1")}
    with open(log, "a") as out:
        proc = subprocess.Popen(["bash", str(REPO / "scripts" / "mlflow_server.sh")], env=env, cwd=d,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + wait_s  # a fresh store's tables and the workers' imports
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(uri + "/health", timeout=5) as r:
                if r.status == 200:
                    return uri, proc
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_process_group(proc)
            raise AssertionError(f"no /health after {wait_s:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def stop_process_group(proc, sigs=None) -> None:
    """Stop a process and its whole group: SIGTERM, then SIGKILL if it lingers."""
    import signal
    import subprocess

    for sig, wait_s in sigs or ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
