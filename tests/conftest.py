"""Shared fixtures, in one place: a temporary MLflow store per test module, the GEMM-peak cache
away from the user's home, one intra-op thread. Helpers that compose the real config tree or
run the CLI are plain functions in tests/support.py."""
from __future__ import annotations

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
