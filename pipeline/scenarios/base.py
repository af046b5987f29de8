"""What a scenario is: a function run inside the cell's (child) process that fills a CellResult
from its own config section, the workload and the pre-flight plan.

A scenario never talks to MLflow: it returns numbers, and the parent process records them
(pipeline/tracking.py is the one writer). Exceptions are classified by the cell runner:
out-of-memory -> `oom`, `Diverged` -> `diverged`, anything else -> `error`.

    @register("kernel")
    def run_kernel(sc: KernelScenario, w: Workload, plan: Plan, device, result: CellResult): ...
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline import record as R
from pipeline.stability import Assessment, Timing, assess, combine

SCENARIOS: dict[str, Callable] = {}


def register(name: str):
    def wrap(fn):
        SCENARIOS[name] = fn
        return fn

    return wrap


class SkipCell(Exception):
    """Pre-flight said no: the cell is recorded as `skipped` with this reason."""


@dataclass
class Plan:
    """Pre-flight's decision for one cell, made before any compute and handed to the scenario."""

    budget_bytes: float  # the memory budget judged against (budget.memory_gb, else 80% available)
    device_memory_bytes: float  # the device's total memory
    predicted_bytes: float | None  # predicted peak of the cell (a kernel cell: one forward); None: no analytic model
    predicted_fwdbwd_bytes: float | None = None  # a kernel cell's forward+backward, else None
    tags: dict[str, str] = field(default_factory=dict)  # the variant's capability flags
    skip_reason: str | None = None  # over budget: the cell is recorded skipped with this

    @property
    def fwdbwd_fits(self) -> bool:
        return self.predicted_fwdbwd_bytes is None or self.predicted_fwdbwd_bytes <= self.budget_bytes

    def params(self) -> dict[str, float]:
        """What the record keeps of the plan (MiB and GiB, rounded as logged)."""
        out = {R.BUDGET_MEM_MB: round(self.budget_bytes / 2**20, 3),
               R.DEVICE_MEMORY_GB: round(self.device_memory_bytes / 2**30, 3)}
        if self.predicted_fwdbwd_bytes is not None:
            out[R.PREDICTED_MEM_FWDBWD_MB] = round(self.predicted_fwdbwd_bytes / 2**20, 3)
        if self.predicted_bytes is not None:
            out[R.PREDICTED_MEM_MB] = round(self.predicted_bytes / 2**20, 3)
        return out


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
    figures: list[dict[str, Any]] = field(default_factory=list)  # each timed figure's stability (add_timing)

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CellResult:
        return cls(**d)

    def add_timing(self, metric: str, timing: Timing, iqr: str | None = None, minimum: str | None = None,
                   count: str | None = None) -> Assessment:
        """Record a timed figure: its median over the undisturbed calls, the median's 95 % CI,
        the calls left out, and optionally its IQR, min and count under the given names; the
        cell's `stability` tags become the worst of its figures (pipeline/stability.py)."""
        a = assess(timing)
        lo, hi = R.ci_names(metric)
        m = self.metrics
        m.update({metric: a.median, lo: a.ci_lo, hi: a.ci_hi, R.left_out_name(metric): float(a.excluded)})
        for name, value in ((iqr, a.iqr), (minimum, a.minimum), (count, float(a.used))):
            if name:
                m[name] = value
        if timing.others_cores is not None:
            m[R.CELL_OTHERS_CORES] = max(m.get(R.CELL_OTHERS_CORES, 0.0), timing.others_cores)
        if timing.steal_frac is not None:
            m[R.CELL_STEAL_FRAC] = max(m.get(R.CELL_STEAL_FRAC, 0.0), timing.steal_frac)
        self.figures.append({"metric": metric, "label": a.label, "reason": a.reason, "median": a.median,
                             "ci": [a.ci_lo, a.ci_hi], "left_out": a.excluded, "calls": len(timing.ms), "stop": timing.stop,
                             "others_cores": timing.others_cores})
        label, reason = combine((f["metric"], f) for f in self.figures)
        self.tags[R.STABILITY], self.tags[R.STABILITY_REASON] = label, reason
        return a

    def note_backend(self, backend: str, mixers) -> None:
        """Tags `backend` (the kernel that ran), `backend_note` (why a preferred kernel did
        not run) and `backend_detail` (which operator ran, how its library loaded) from the
        mixers' attributes of those names."""
        self.tags[R.BACKEND] = str(backend)
        for attr, tag in (("fallback_reason", R.BACKEND_NOTE), ("backend_detail", R.BACKEND_DETAIL)):
            texts = {str(getattr(m, attr)) for m in mixers if getattr(m, attr, None)}
            if texts:
                self.tags[tag] = "; ".join(sorted(texts))
