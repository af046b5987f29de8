"""A sweep's progress, one line per finished cell: its index of the total, name, status, headline
figure and wall time, the sweep's elapsed time and an estimate of the time left. The estimate
comes from an analytic cost model of the cells still to run (`cell_units`), calibrated on the
cells finished so far (seconds = a + b * units, per scenario). The lines go to stdout and to
`progress.log` in the sweep's output folder; `progress.jsonl` beside it is what every job of the
sweep (in this process or another) reads to calibrate.

    [12/62] vanilla-n512-kernel ok  fwd 1.84 ms  cell 2.1 s  elapsed 1:23  left ~4:05
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from pipeline import record as R

PROGRESS_FILE, LOG_FILE = "progress.jsonl", "progress.log"


def cell_units(d: dict[str, Any]) -> float:
    """Analytic work of a cell, in GFLOP-like units: the mixer's projections (n D^2) and mixing
    (n^order D, order from the variant's `time_order`), times the training steps of a trained
    cell, plus one unit of fixed cost. Only a relative measure: the calibration turns it into s."""
    n, D = int(d["seq_len"]), int(d["backbone"]["d_model"])
    B = int(d.get("batch_size", 1))
    order = _time_order(d["model"])
    work = B * (n * D * D + n ** order * D) / 1e9
    sc, task = d["scenario"], d.get("task") or {}
    if sc.get("uses_task", True):
        steps = int((task.get("train") or {}).get("max_steps", 1)) if sc["name"] in ("train", "full") else 1
        work *= int(d["backbone"].get("n_layers", 1)) * 3 * max(1, steps)  # forward + backward
    return 1.0 + work


def _time_order(model: dict[str, Any]) -> float:
    """The variant's promised time order: its class's, or the config's for a plain module (model=custom)."""
    if model.get("time_order") is not None:
        return float(model["time_order"])
    try:
        from hydra.utils import get_class

        return float(getattr(get_class(model.get("_target_", "")), "time_order", 2.0))
    except Exception:  # noqa: BLE001 - a test double or a bad target: the exact order is the safe guess
        return 2.0


def headline(scenario: str, metrics: dict[str, float]) -> str:
    """The one figure a person looks for first in a finished cell."""
    for key, label, unit in ((R.KERNEL_FWD_MS, "fwd", "ms"), (R.DECODE_MS_PER_TOKEN, "token", "ms"),
                             (R.VAL_ACC, R.VAL_ACC, ""), (R.VAL_BPC, R.VAL_BPC, ""),
                             (R.QUALITY_REL_ERR_VS_EXACT, "err", ""), (R.INFER_LATENCY_MS, "latency", "ms")):
        if key in metrics and metrics[key] is not None and math.isfinite(metrics[key]):
            v = metrics[key]
            text = f"{label} {v:.3g}{' ' + unit if unit else ''}"
            if key in R.TIMED and v > 0:  # the median's 95 % CI, as ± its larger side
                lo, hi = (metrics.get(n) for n in R.ci_names(key))
                if lo is not None and hi is not None:
                    text += f" ±{max(v - lo, hi - v) / v:.0%}"
            return text
    return ""


def _clock(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _rate(done: list[dict], scenario: str) -> tuple[float, float]:
    """(a, b) of seconds = a + b * units, fitted on finished cells of this scenario (all cells
    when it has fewer than two), by least squares; b >= 0, a >= 0."""
    rows = [r for r in done if r["scenario"] == scenario and not r.get("reused")]
    if len(rows) < 2:
        rows = [r for r in done if not r.get("reused")]
    if not rows:
        return 0.0, 0.0
    xs, ys = [r["units"] for r in rows], [r["wall_s"] for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var > 0 else 0.0
    if b <= 0:
        return my, 0.0
    a = my - b * mx
    if a < 0:  # through the origin instead
        return 0.0, sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
    return a, b


def eta_s(done: list[dict], todo: list[dict]) -> float | None:
    """Seconds left for the cells in `todo` ({scenario, units}), or None before any cell finished."""
    if not any(not r.get("reused") for r in done):
        return None
    total = 0.0
    for cell in todo:
        a, b = _rate(done, cell["scenario"])
        total += a + b * cell["units"]
    return total


class Progress:
    """One sweep's progress files in its output folder; `plan` is every cell's {scenario, units}."""

    def __init__(self, sweep_dir: str | Path, plan: list[dict], started: float):
        self.dir, self.plan, self.started = Path(sweep_dir), plan, started

    def done(self) -> list[dict]:
        f = self.dir / PROGRESS_FILE
        if not f.exists():
            return []
        return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]

    def finished(self, index: int, name: str, status: str, wall_s: float, metrics: dict[str, float],
                 reused: bool = False, reason: str = "", stability: str = "") -> str:
        """Record one finished cell; return (and write to progress.log) its line."""
        cell = self.plan[index] if 0 <= index < len(self.plan) else {"scenario": "?", "units": 1.0}
        row = {"index": index, "name": name, "status": status, "wall_s": wall_s, "reused": reused, **cell}
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / PROGRESS_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")
        done = self.done()
        finished = {r["index"] for r in done}
        todo = [c for i, c in enumerate(self.plan) if i not in finished]
        left = eta_s(done, todo)
        what = "reused" if reused else status
        parts = [f"[{len(finished)}/{len(self.plan)}] {name} {what}"]
        figure = headline(cell["scenario"], metrics)
        if figure:
            parts.append(figure)
        if reason and status != "ok":
            parts.append(f"({reason[:120]})")
        if stability and stability != R.STABLE:
            attempts = metrics.get(R.CELL_ATTEMPTS)
            parts.append(stability.upper() + (f" after {attempts:.0f} attempts" if attempts and attempts > 1 else ""))
        parts.append(f"cell {wall_s:.1f} s")
        parts.append(f"elapsed {_clock(time.time() - self.started)}")
        if todo and left is not None:
            parts.append(f"left ~{_clock(left)}")
        line = "  ".join(parts)
        with open(self.dir / LOG_FILE, "a") as f:
            f.write(line + "\n")
        return line
