"""Test helpers (plain functions, imported as `from tests.support import compose`): Hydra
composition of the real config tree and the command line, as a user would run them."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def table_row(section: str, *starts: str) -> str:
    """The Markdown table row of a report section whose first cells are `starts`."""
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[: len(starts)] == list(starts):
            return line
    raise AssertionError(f"no row starting {starts} in:\n{section}")
