"""Shared fixtures: a temporary MLflow store per test module, and Hydra composition of the real
config tree (shrunk for CPU, pointed at tmp paths)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """A fresh SQLite store (created once per module: table creation takes seconds)."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    uri = f"sqlite:///{path}"
    from pipeline.tracking import Tracker

    Tracker(uri, "warmup")  # create the tables now, not in the first test
    return uri


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """GEMM-peak cache away from the user's home."""
    cache = tmp_path_factory.getbasetemp() / "attnbench-cache"
    monkeypatch.setenv("ATTNBENCH_CACHE", str(cache))


@pytest.fixture
def one_thread():
    """One intra-op thread: for tests that check behaviour, not speed; tiny tensors on an
    oversubscribed machine make OpenMP workers wait on each other (steps 10-50x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def compose(overrides: list[str]):
    """The real config tree, composed as `python -m pipeline.run <overrides>` would."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hcompose(config_name="config", overrides=overrides)


def run_cli(args: list[str], env: dict | None = None, cwd: Path | None = None, timeout: int = 300):
    import subprocess

    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "pipeline.run", *args], cwd=cwd or REPO, env=e,
                          capture_output=True, text=True, timeout=timeout)
