"""What a scenario is: a function run inside the cell's (child) process that fills a CellResult.

A scenario never talks to MLflow: it returns numbers, and the parent process records them
(pipeline/tracking.py is the one writer). Exceptions are classified by the cell runner:
out-of-memory -> `oom`, `Diverged` -> `diverged`, anything else -> `error`.

    @register("kernel")
    def run_kernel(cfg, device, result): ...
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SCENARIOS: dict[str, Callable] = {}


def register(name: str):
    def wrap(fn):
        SCENARIOS[name] = fn
        return fn

    return wrap


class Diverged(RuntimeError):
    """Raised when a loss becomes non-finite; the cell is recorded with status `diverged`."""


def failure_text(e: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:500]


def is_oom(e: BaseException) -> bool:
    """An allocation the device refused: CUDA's OutOfMemoryError, or the CPU allocator's."""
    import torch

    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


@dataclass
class CellResult:
    status: str = "ok"
    failure_reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)  # one value each, e.g. kernel/fwd_ms
    series: dict[str, list[float]] = field(default_factory=dict)  # per step, e.g. train/loss
    tags: dict[str, str] = field(default_factory=dict)  # e.g. backend, memory_method
    params: dict[str, Any] = field(default_factory=dict)  # extra params, e.g. gemm peak
    artifacts: dict[str, Any] = field(default_factory=dict)  # name.json -> JSON-able payload

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CellResult:
        return cls(**d)

    def note_backend(self, backend: str, mixers) -> None:
        """Tags `backend` (the kernel that ran), `backend_note` (why a preferred kernel did
        not run) and `backend_detail` (which operator ran, how its library loaded) from the
        mixers' attributes of those names."""
        self.tags["backend"] = str(backend)
        for attr, tag in (("fallback_reason", "backend_note"), ("backend_detail", "backend_detail")):
            texts = {str(getattr(m, attr)) for m in mixers if getattr(m, attr, None)}
            if texts:
                self.tags[tag] = "; ".join(sorted(texts))
