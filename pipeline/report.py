"""The report (DESIGN §7): one experiment, or one sweep of it, read back from MLflow and turned
into `report.md`, a self-contained `report.html`, `results.csv` and PNG figures. Every number in
it is computed from the runs (or, for the seed figures, from the formulas in pipeline/analytic.py).

    python -m pipeline.report --experiment attnbench [--sweep SWEEP_ID] [--out DIR] [--budget-gb 16]
    build_report("attnbench", sweep_id=None, out_dir=None, budget_gb=None, tracking_uri=None)

Layout: loading (MLflow -> one row per cell) / pure analysis (fits, crossovers, Pareto fronts,
arrays in, numbers out) / tables / figures / a tiny document model rendered to Markdown and HTML.
"""
from __future__ import annotations

import argparse
import base64
import html
import math
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pandas as pd

from pipeline.registry import CONF_DIR, REPO_ROOT

SWEEP_ROLE_TAG = "attnbench.role"
REUSED_PREFIX = "reused/"
FIT_POINTS = 3  # exponents are fitted over this many of the largest lengths that ran ok

# quality metrics, best first when a task logs several; True = higher is better
QUALITY_METRICS: dict[str, bool] = {
    "val/acc": True,
    "val/bpc": False,
    "quality/rel_err_vs_exact": False,
    "quality/rel_err_uniform_mean": False,
    "val/loss": False,
}
# reference values shown beside quality, never ranked
QUALITY_REFERENCES = ("val/bpc_unigram",)
# cost of a quality cell, first one every point of a panel has wins (label, metric, to-axis-value)
TIME_COSTS = (
    ("training time per token (µs)", "train/tokens_per_s"),
    ("inference time per token (µs)", "infer/tokens_per_s"),
)
MEMORY_COSTS = (
    ("training peak memory (MB)", "train/peak_mem_mb"),
    ("inference peak memory (MB)", "infer/peak_mem_mb"),
    ("kernel forward peak memory (MB)", "kernel/peak_mem_mb"),
)
PROVENANCE_TAGS = ("device", "device_name", "num_threads", "torch_version", "xformers_version",
                   "git_sha", "host", "memory_method", "allocator", "fp32_matmul")
CKPT = "params.trainer.grad_checkpointing"


# ============================================================================ loading


def tracking_uri(explicit: str | None = None) -> str:
    """The store the report reads: the same resolution as every writer (pipeline/tracking.py)."""
    from pipeline.tracking import tracking_uri as resolve

    return resolve(explicit)


def redact_uri(uri: str) -> str:
    """A store URI fit to print: no password (postgresql://user:secret@host -> user:***@host)."""
    parts = urlsplit(uri)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return uri


@dataclass
class RunTable:
    """The cells of one report: `frame` has one row per cell, columns `params.*`, `metrics.*`,
    `tags.*` (MLflow's own `search_runs` naming) plus run_id, run_name, start_time, mlflow_status
    and `reused` (the cell was recorded by an earlier sweep and referenced from this one)."""

    frame: pd.DataFrame
    experiment: str
    uri: str
    sweep_id: str | None
    parents: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def grid(self) -> str:
        """The grid a reported sweep ran (from its parent run), or empty."""
        return next((p["grid"] for p in self.parents if p.get("grid")), "")


def _search_all(client, experiment_id: str, filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _row(run, reused: bool) -> dict[str, Any]:
    info, data = run.info, run.data
    row: dict[str, Any] = {
        "run_id": info.run_id,
        "run_name": info.run_name,
        "start_time": pd.Timestamp(info.start_time, unit="ms") if info.start_time else pd.NaT,
        "mlflow_status": info.status,
        "reused": reused,
    }
    row.update({f"params.{k}": v for k, v in data.params.items()})
    row.update({f"metrics.{k}": v for k, v in data.metrics.items()})  # latest value of a history
    row.update({f"tags.{k}": v for k, v in data.tags.items()})
    return row


def latest_per_config(frame: pd.DataFrame) -> pd.DataFrame:
    """One run per config_hash: the latest `ok` one, else the latest of any status (a failure
    later fixed by a rerun is not a failure of the experiment). Runs without a hash all stay."""
    if "tags.config_hash" not in frame or frame.empty:
        return frame
    has = frame["tags.config_hash"].notna()
    keep = [frame[~has]]
    for _, g in frame[has].groupby("tags.config_hash", sort=False):
        ok = g[g["tags.status"] == "ok"] if "tags.status" in g else g.iloc[0:0]
        pool = ok if len(ok) else g
        keep.append(pool.sort_values("start_time").tail(1))
    return pd.concat(keep).sort_index()


def _numeric_params(frame: pd.DataFrame) -> pd.DataFrame:
    """MLflow stores params as strings; turn a column numeric when every value parses."""
    out = frame.copy()
    for c in [c for c in out.columns if c.startswith("params.")]:
        conv = pd.to_numeric(out[c], errors="coerce")
        if conv.notna().sum() == out[c].notna().sum():
            out[c] = conv
    for c in [c for c in out.columns if c.startswith("metrics.")]:
        out[c] = pd.to_numeric(out[c], errors="coerce")
    return out


def load_runs(experiment: str, sweep_id: str | None = None, uri: str | None = None) -> RunTable:
    """Every cell of an experiment (latest per config_hash), or of one sweep (its child runs plus
    the earlier runs its parent references as reused)."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment named {experiment!r} in {redact_uri(uri)}")
    notes: list[str] = []
    if sweep_id:
        if "'" in sweep_id:
            raise ValueError(f"sweep id {sweep_id!r} contains a quote")
        runs = _search_all(client, exp.experiment_id, f"tags.sweep_id = '{sweep_id}'")
        if not runs:
            raise ValueError(f"no runs with sweep_id {sweep_id!r} in experiment {experiment!r}")
    else:
        runs = _search_all(client, exp.experiment_id, "")
    parents = [r for r in runs if r.data.tags.get(SWEEP_ROLE_TAG) == "sweep"]
    cells = [r for r in runs if r.data.tags.get(SWEEP_ROLE_TAG) != "sweep"]
    rows = [_row(r, reused=False) for r in cells]
    if sweep_id:
        if not parents:
            notes.append(f"no parent run tagged {SWEEP_ROLE_TAG}=sweep found for sweep {sweep_id}; "
                         "reused cells cannot be listed")
        have = {r.info.run_id for r in cells}
        reused_ids = sorted({v for p in parents for k, v in p.data.tags.items()
                             if k.startswith(REUSED_PREFIX)} - have)
        rows += [_row(client.get_run(rid), reused=True) for rid in reused_ids]
    if not rows:
        raise ValueError(f"experiment {experiment!r} has no cell runs")
    frame = pd.DataFrame(rows)
    before = len(frame)
    frame = latest_per_config(frame)
    if len(frame) < before:
        notes.append(f"{before - len(frame)} superseded run(s) dropped: several runs shared a "
                     "config_hash and only the latest (ok first) is reported")
    frame = _numeric_params(frame)
    for col in ("tags.model", "tags.scenario", "tags.task", "tags.status", "params.seq_len"):
        if col not in frame:
            frame[col] = None
    untagged = "no status tag (mlflow: " + frame["mlflow_status"] + ")"
    frame["tags.status"] = frame["tags.status"].fillna(untagged)
    frame = frame.sort_values(["tags.scenario", "tags.model", "params.seq_len", "start_time"],
                              na_position="last").reset_index(drop=True)
    parent_info = [{"run_id": p.info.run_id, "run_name": p.info.run_name or "",
                    "sweep_id": p.data.tags.get("sweep_id", ""),
                    "reused": str(sum(k.startswith(REUSED_PREFIX) for k in p.data.tags)),
                    "grid": p.data.tags.get("grid", "")} for p in parents]
    return RunTable(frame, experiment, uri, sweep_id, parent_info, notes)


# ============================================================================ pure analysis


@dataclass(frozen=True)
class PowerFit:
    """y ≈ prefactor · n^exponent, fitted in log-log space over `lengths`."""

    exponent: float
    prefactor: float
    lengths: tuple[int, ...]

    def predict(self, n: float) -> float:
        return self.prefactor * n**self.exponent

    def solve(self, y: float) -> float:
        """The n at which the fitted curve reaches y."""
        return (y / self.prefactor) ** (1.0 / self.exponent)


def _median_per_n(n: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distinct lengths (sorted) and the median of the finite, positive values at each."""
    n_arr, y_arr = np.asarray(n, dtype=float), np.asarray(y, dtype=float)
    good = np.isfinite(n_arr) & np.isfinite(y_arr) & (y_arr > 0) & (n_arr > 0)
    n_arr, y_arr = n_arr[good], y_arr[good]
    lengths = np.unique(n_arr)
    return lengths, np.array([np.median(y_arr[n_arr == v]) for v in lengths])


def fit_power_law(n: Sequence[float], y: Sequence[float], largest: int = FIT_POINTS) -> PowerFit | None:
    """Least-squares line through (log n, log y) over the `largest` distinct lengths with a
    finite positive value (repeats at one length -> their median). None below 2 lengths."""
    lengths, values = _median_per_n(n, y)
    lengths, values = lengths[-largest:], values[-largest:]
    if len(lengths) < 2:
        return None
    slope, intercept = np.polyfit(np.log(lengths), np.log(values), 1)
    return PowerFit(float(slope), float(np.exp(intercept)), tuple(int(v) for v in lengths))


@dataclass(frozen=True)
class Crossover:
    """Where a candidate curve drops below a reference curve (both measured at common n)."""

    n: float | None  # interpolated crossing length, when there is one
    verdict: str  # "crosses", "below at every n", "not reached", "no common lengths"
    lengths: tuple[int, ...] = ()

    def describe(self, below: str = "faster") -> str:
        if self.verdict == "crosses":
            return f"n ≈ {self.n:,.0f}"
        if self.verdict == "below at every n":
            return f"{below} at every n measured ({_span(self.lengths)})"
        if self.verdict == "not reached":
            return f"not reached within the grid ({_span(self.lengths)})"
        return "no common lengths that both ran ok"


def _span(lengths: Sequence[int]) -> str:
    return f"n = {lengths[0]:,}…{lengths[-1]:,}" if len(lengths) > 1 else f"n = {lengths[0]:,}"


def crossover(n: Sequence[float], candidate: Sequence[float], reference: Sequence[float]) -> Crossover:
    """The length beyond which `candidate` stays below `reference`, interpolated linearly in
    log-log space between the two measured lengths around the last sign change (a power law
    is a straight line there, so two power laws cross exactly where the interpolation says)."""
    n_arr = np.asarray(n, dtype=float)
    c, r = np.asarray(candidate, dtype=float), np.asarray(reference, dtype=float)
    good = np.isfinite(n_arr) & np.isfinite(c) & np.isfinite(r) & (c > 0) & (r > 0) & (n_arr > 0)
    order = np.argsort(n_arr[good])
    n_arr, diff = n_arr[good][order], (np.log(c[good]) - np.log(r[good]))[order]
    lengths = tuple(int(v) for v in n_arr)
    if len(n_arr) == 0:
        return Crossover(None, "no common lengths")
    if np.all(diff < 0):
        return Crossover(None, "below at every n", lengths)
    last_above = int(np.nonzero(diff >= 0)[0][-1])
    if last_above == len(n_arr) - 1:
        return Crossover(None, "not reached", lengths)
    x0, x1 = np.log(n_arr[last_above]), np.log(n_arr[last_above + 1])
    d0, d1 = diff[last_above], diff[last_above + 1]
    x = x0 + (0.0 - d0) * (x1 - x0) / (d1 - d0)
    return Crossover(float(np.exp(x)), "crosses", lengths)


@dataclass(frozen=True)
class Ratio:
    """reference / candidate at the largest length where both have a positive value."""

    n: int | None
    value: float | None

    def describe(self, more: str = "faster", less: str = "slower") -> str:
        if self.value is None or self.n is None:
            return "no common length that both ran ok"
        word, x = (more, self.value) if self.value >= 1 else (less, 1.0 / self.value)
        digits = 2 if x < 10 else 1 if x < 100 else 0
        return f"{x:,.{digits}f}× {word} (n = {self.n:,})"


def ratio_at_largest(n_cand: Sequence[float], cand: Sequence[float],
                     n_ref: Sequence[float], ref: Sequence[float]) -> Ratio:
    """ref / cand at the largest length both series hold with a finite positive value (so a
    quantity where smaller is better reads as "x times better" when the ratio is above 1)."""
    def usable(n, y):
        n_a, y_a = np.asarray(n, dtype=float), np.asarray(y, dtype=float)
        keep = np.isfinite(n_a) & np.isfinite(y_a) & (y_a > 0)
        return dict(zip(n_a[keep].astype(int), y_a[keep]))

    c, r = usable(n_cand, cand), usable(n_ref, ref)
    common = sorted(set(c) & set(r))
    if not common:
        return Ratio(None, None)
    n = common[-1]
    return Ratio(int(n), float(r[n] / c[n]))


def pareto_front(cost: Sequence[float], quality: Sequence[float], higher_is_better: bool = True) -> np.ndarray:
    """Boolean mask of the points no other point beats: one is dominated when another costs no
    more and is no worse, and is strictly better in at least one of the two."""
    cost_a = np.asarray(cost, dtype=float)
    q = np.asarray(quality, dtype=float) * (1.0 if higher_is_better else -1.0)
    front = np.zeros(len(cost_a), dtype=bool)
    for i in range(len(cost_a)):
        if not (np.isfinite(cost_a[i]) and np.isfinite(q[i])):
            continue
        dominated = (cost_a <= cost_a[i]) & (q >= q[i]) & ((cost_a < cost_a[i]) | (q > q[i]))
        front[i] = not np.any(dominated & np.isfinite(cost_a) & np.isfinite(q))
    return front


def seed_figures() -> dict[str, Any]:
    """The seed's worked figures (DESIGN §1), recomputed with the measurement's own formulas."""
    from pipeline.analytic import score_entries, score_macs

    cases = [(512, 768), (8192, 1024)]
    rows = [{"n": n, "d": d, "score_macs": score_macs(n, d), "score_entries": score_entries(n)}
            for n, d in cases]
    n0, d0 = cases[0]
    ratio = score_macs(16 * n0, d0) / score_macs(n0, d0)
    return {"rows": rows, "length_factor": 16, "work_factor": ratio}


def checkpointing_effect(cells: pd.DataFrame) -> pd.DataFrame:
    """Training cells that differ only in trainer.grad_checkpointing, paired: memory saved and
    step time added by turning checkpointing on (means over seeds)."""
    cols = ["variant", "scenario", "task", "n", "seeds", "mem_off_mb", "mem_on_mb", "mem_saved_pct",
            "step_off_ms", "step_on_ms", "time_added_pct"]
    need = [CKPT, "metrics.train/peak_mem_mb", "metrics.train/step_ms"]
    if any(c not in cells for c in need):
        return pd.DataFrame(columns=cols)
    t = cells[(cells["tags.status"] == "ok") & cells[CKPT].notna()].copy()
    if t.empty:
        return pd.DataFrame(columns=cols)
    t["ckpt"] = t[CKPT].map(_truthy)
    base = ["tags.model", "tags.scenario", "tags.task", "params.seq_len"]
    axes = [a for a in varying_axes(t, base) if a != CKPT]
    keys = base + axes
    rows = []
    for key, g in t.groupby(keys, dropna=False, sort=True):
        on, off = g[g["ckpt"]], g[~g["ckpt"]]
        if on.empty or off.empty:
            continue
        mem_on, mem_off = on["metrics.train/peak_mem_mb"].mean(), off["metrics.train/peak_mem_mb"].mean()
        st_on, st_off = on["metrics.train/step_ms"].mean(), off["metrics.train/step_ms"].mean()
        rows.append({"variant": _label(key[0], dict(zip(axes, key[4:]))), "scenario": key[1], "task": key[2],
                     "n": int(key[3]), "seeds": min(len(on), len(off)),
                     "mem_off_mb": mem_off, "mem_on_mb": mem_on, "mem_saved_pct": 100 * (1 - mem_on / mem_off),
                     "step_off_ms": st_off, "step_on_ms": st_on, "time_added_pct": 100 * (st_on / st_off - 1)})
    return pd.DataFrame(rows, columns=cols)


def _truthy(v: Any) -> bool:
    return str(v).strip().lower() in ("true", "1", "yes")


# ============================================================================ grouping


def _config_keys() -> set[str]:
    """First components of the keys a cell's config can have: conf/ group folders and the root
    config's own keys. Params outside these were added by a scenario (GEMM peak, predicted memory)."""
    from omegaconf import OmegaConf

    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    root = set(OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml")).keys())
    return (groups | root) - {"defaults", "hydra"}


# how long a cell measures, not what: never a line of its own
TIMING_KNOBS = {"scenario.warmup", "scenario.warmup_s", "scenario.min_repeats", "scenario.min_time_s", "scenario.max_time_s",
                "scenario.count_flops", "scenario.warmup_steps", "scenario.batches"}


def varying_axes(cells: pd.DataFrame, by: Sequence[str] = ("tags.model", "params.seq_len")) -> list[str]:
    """Config params that take several values among cells sharing `by` (a variant at one
    length: dtype, causal, window, checkpointing …); each value is then its own line. Seeds are
    replicates; run switches and scenario-added params (GEMM peak, predicted memory) are not axes."""
    from pipeline.config import NON_MEASUREMENT_KEYS

    allowed = _config_keys() - set(NON_MEASUREMENT_KEYS) - {"seed", "seq_len"}
    axes = []
    for c in sorted(c for c in cells.columns if c.startswith("params.")):
        if c[len("params."):].split(".")[0] not in allowed or c[len("params."):] in TIMING_KNOBS:
            continue
        per = cells.groupby(list(by), dropna=False)[c].nunique(dropna=True)
        if len(per) and per.max() > 1:
            axes.append(c)
    if "tags.device" in cells and cells["tags.device"].nunique(dropna=True) > 1:
        axes.append("tags.device")
    return axes


def _short(axis: str) -> str:
    """`params.backbone.dtype` -> `dtype`: the last component names an axis well enough."""
    return axis.rsplit(".", 1)[-1]


def _label(model: str, axis_values: dict[str, Any]) -> str:
    extra = ", ".join(f"{_short(a)}={_fmt_value(v)}" for a, v in axis_values.items())
    return f"{model} [{extra}]" if extra else str(model)


def _fmt_value(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


@dataclass
class Line:
    """One measured line of the kernel scenario: a variant at fixed values of every other axis."""

    model: str
    axes: dict[str, Any]
    rows: pd.DataFrame  # every cell of the line, any status
    exact: bool | None

    @property
    def label(self) -> str:
        return _label(self.model, self.axes)

    def ok(self) -> pd.DataFrame:
        return self.rows[self.rows["tags.status"] == "ok"]

    def series(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """Distinct lengths and the median value of `metrics.<metric>` over ok cells there."""
        col = f"metrics.{metric}"
        ok = self.ok()
        if col not in ok or ok.empty:
            return np.array([]), np.array([])
        return _median_per_n(ok["params.seq_len"], ok[col])

    def fit(self, metric: str) -> PowerFit | None:
        return fit_power_law(*self.series(metric))

    def same_axes(self, other: Line) -> bool:
        """Whether the two lines share every other axis value (compared as text: NaN and types)."""
        return {k: str(v) for k, v in self.axes.items()} == {k: str(v) for k, v in other.axes.items()}


def kernel_lines(cells: pd.DataFrame) -> list[Line]:
    k = cells[cells["tags.scenario"] == "kernel"]
    if k.empty or "params.seq_len" not in k:
        return []
    axes = varying_axes(k)
    lines = []
    for key, g in k.groupby(["tags.model"] + axes, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        exact = _exact_of(g)
        lines.append(Line(str(key[0]), dict(zip(axes, key[1:])), g, exact))
    return lines


def _exact_of(rows: pd.DataFrame) -> bool | None:
    """Exactness from the runs' `exact` tag (written from the variant's capability flag)."""
    if "tags.exact" not in rows:
        return None
    vals = {_truthy(v) for v in rows["tags.exact"].dropna()}
    return vals.pop() if len(vals) == 1 else None


def variant_colours(names: Iterable[str]) -> dict[str, Any]:
    """One colour per variant, fixed by sorted name so every figure agrees."""
    from matplotlib import colormaps

    names = sorted(set(names))
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


# ============================================================================ document model


@dataclass
class Doc:
    """Blocks rendered to both Markdown and HTML. Text may hold `code` spans; nothing else is
    interpreted, so run tags and error messages print as written."""

    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def bullets(self, items: Sequence[str]) -> None:
        self.blocks.append(("ul", list(items)))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.blocks.append(("table", list(headers), [[str(c) for c in r] for r in rows]))

    def figure(self, path: Path, caption: str) -> None:
        self.blocks.append(("img", path, caption))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "ul":
                out.append("\n".join(f"- {i}" for i in b[1]))
            elif b[0] == "table":
                esc = [[c.replace("|", "\\|").replace("\n", " ") for c in r] for r in [b[1]] + b[2]]
                lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(esc[0])]
                lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
                out.append("\n".join(lines))
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1].name})\n\n*{b[2]}*")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        body = []
        for b in self.blocks:
            if b[0] == "h":
                body.append(f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                body.append(f"<p>{_inline(b[1])}</p>")
            elif b[0] == "ul":
                body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b[1]) + "</ul>")
            elif b[0] == "table":
                head = "".join(f"<th>{_inline(c)}</th>" for c in b[1])
                rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>"
                               for r in b[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif b[0] == "img":
                data = base64.b64encode(b[1].read_bytes()).decode("ascii")
                body.append(f'<figure><img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{_inline(b[2])}</figcaption></figure>")
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
                + "\n".join(body) + "\n</body></html>\n")


# inline style only: the file must open offline and reference nothing outside itself
_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:0.25em 0.6em;text-align:left;vertical-align:top}
th{background:#f2f2f2}
code{background:#f4f4f4;padding:0 0.2em}
figure{margin:1.5em 0}
img{max-width:100%}
figcaption{font-style:italic;color:#555}
"""


def _inline(text: str) -> str:
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    # a scheme separator in printed text (an error message, a server URI) becomes an entity,
    # so nothing in the file looks like a reference to fetch
    return out.replace("://", "&#58;//")


# ============================================================================ formatting


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def _sci(x: float, digits: int = 2) -> str:
    """2.0·10⁸ style, `digits` significant digits."""
    mant, exp = f"{float(x):.{digits - 1}e}".split("e")
    return f"{mant}·10{str(int(exp)).translate(_SUPERSCRIPT)}"


def _fmt(x: Any, digits: int = 3) -> str:
    """Significant digits; scientific from 1e6 up or below 1e-3; '—' for missing."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    x = float(x)
    if x == 0:
        return "0"
    if abs(x) >= 1e6 or abs(x) < 1e-3:
        return _sci(x, digits)
    short = f"{x:.{digits}g}"
    return f"{x:,.0f}" if "e" in short else short  # 1234 -> "1,234", not "1.23e+03"


def _mean_std(values: pd.Series, digits: int = 3) -> str:
    v = values.dropna()
    if v.empty:
        return "—"
    if len(v) == 1:
        return _fmt(v.iloc[0], digits)
    return f"{_fmt(v.mean(), digits)} ± {_fmt(v.std(ddof=1), 2)} ({len(v)} seeds)"


def _fmt_n(n: Any) -> str:
    try:
        return f"{int(n):,}"
    except (TypeError, ValueError):
        return "—"


def _lengths(lengths: Sequence[int]) -> str:
    return ", ".join(f"{v:,}" for v in lengths)


# ============================================================================ figures


def _new_figure(ncols: int = 1, width: float = 6.4, height: float = 4.6):
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas for savefig

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, format="png", metadata={"Software": None})
    return path


def _styles(lines: list[Line]) -> dict[str, str]:
    """Line style per combination of non-variant axes (colour is the variant's)."""
    combos = sorted({tuple(sorted((k, str(v)) for k, v in ln.axes.items())) for ln in lines})
    dashes = ["-", "--", ":", "-."]
    return {ln.label: dashes[combos.index(tuple(sorted((k, str(v)) for k, v in ln.axes.items()))) % 4]
            for ln in lines}


def _guides(ax, n_lo: float, n_hi: float, y_anchor: float) -> None:
    """O(n) and O(n²) reference lines through (n_lo, y_anchor)."""
    xs = np.array([n_lo, n_hi])
    for order, name in ((1, "O(n)"), (2, "O(n²)")):
        ys = y_anchor * (xs / n_lo) ** order
        ax.plot(xs, ys, color="0.55", lw=1, ls=(0, (4, 3)) if order == 1 else (0, (1, 2)), zorder=0)
        ax.annotate(name, (xs[1], ys[1]), textcoords="offset points", xytext=(-2, 3), fontsize=8,
                    color="0.35", ha="right", va="bottom")


def plot_scaling(lines: list[Line], metric: str, ylabel: str, title: str, colours: dict,
                 path: Path) -> Path | None:
    """Log-log metric vs n, one line per kernel line, fitted exponent in the legend, guides."""
    fig, (ax,) = _new_figure()
    styles = _styles(lines)
    xs_all, ys_at_min = [], []
    for ln in lines:
        n, y = ln.series(metric)
        if len(n) == 0:
            continue
        fit = fit_power_law(n, y)
        slope = f", slope {fit.exponent:.2f}" if fit else ""
        ax.plot(n, y, marker="o", ms=4, color=colours[ln.model], ls=styles[ln.label],
                label=f"{ln.label}{slope}")
        xs_all.extend(n)
        ys_at_min.append((n[0], y[0]))
    if not xs_all:
        return None
    n_lo, n_hi = min(xs_all), max(xs_all)
    anchor = float(np.exp(np.median([np.log(y) for x, y in ys_at_min if x == n_lo])))
    _guides(ax, n_lo, n_hi, anchor)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length n (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_flops(lines: list[Line], colours: dict, path: Path) -> Path | None:
    """Analytic vs counted FLOPs, mixing share of the analytic count, achieved fraction of peak."""
    fig, (a0, a1, a2) = _new_figure(3, width=5.0)
    styles = _styles(lines)
    drawn = False
    for ln in lines:
        c, ls = colours[ln.model], styles[ln.label]
        n, total = ln.series("kernel/flops_fwd_analytic")
        if len(n) == 0:
            continue
        drawn = True
        a0.plot(n, total, color=c, ls=ls, marker=".", label=f"{ln.label} analytic")
        nc, counted = ln.series("kernel/flops_fwd")  # absent or 0 = not counted: no marker
        if len(nc):
            a0.plot(nc, counted, color=c, ls="none", marker="x", ms=7, label=f"{ln.label} counted")
        nm, mix = ln.series("kernel/flops_fwd_mixing")
        if len(nm):
            share = 100 * mix / np.interp(nm, n, total)
            a1.plot(nm, share, color=c, ls=ls, marker="o", ms=4, label=ln.label)
        npf, frac = ln.series("kernel/peak_fraction")
        if len(npf):
            a2.plot(npf, 100 * frac, color=c, ls=ls, marker="o", ms=4, label=ln.label)
    if not drawn:
        return None
    for ax in (a0, a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length n (tokens)")
        ax.grid(True, alpha=0.3)
    a0.set_yscale("log")
    a0.set_ylabel("forward FLOPs per call")
    a0.set_title("Analytic (line) vs counted (×) FLOPs")
    a0.legend(fontsize=7)
    a1.set_ylabel("mixing share of analytic FLOPs (%)")
    a1.set_ylim(0, 100)
    a1.set_title("Sequence mixing vs projections")
    a2.set_ylabel("achieved / measured GEMM peak (%)")
    a2.set_title("Achieved FLOP/s, fraction of machine peak")
    ys = [v for ln in a2.get_lines() for v in ln.get_ydata() if v > 0]
    if ys and max(ys) / min(ys) > 20:
        a2.set_yscale("log")
    a1.legend(fontsize=7)
    return _save(fig, path)


def plot_pareto(panels: list[dict], colours: dict, xlabel_kind: str, path: Path) -> Path | None:
    """Quality vs a cost, one panel per (task, n), Pareto front joined by a line."""
    panels = [p for p in panels if len(p["points"])]
    if not panels:
        return None
    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.4 * ncols, 5.2 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, panel in zip(axes, panels):
        pts = panel["points"]
        for _, p in pts.iterrows():
            ax.errorbar(p["cost"], p["quality"], yerr=p["quality_std"] if p["seeds"] > 1 else None,
                        marker="o", ms=7, color=colours[p["model"]], ls="none", capsize=3,
                        mec="black" if p["front"] else "none", mew=1.5, label=p["label"])
        front = pts[pts["front"]].sort_values("cost")
        ax.plot(front["cost"], front["quality"], color="black", lw=1, ls="--", zorder=0, label="Pareto front")
        spread = pts["cost"].max() / max(pts["cost"].min(), 1e-300)
        if spread > 10:
            ax.set_xscale("log")
        ax.set_xlabel(panel["cost_label"])
        arrow = "↑ better" if panel["higher_is_better"] else "↓ better"
        ax.set_ylabel(f"{panel['metric']} ({arrow})")
        ax.set_title(f"{panel['task']}, n = {panel['n']:,} ({panel['scenario']} cells)")
        ax.grid(True, alpha=0.3)
        # below the panel: inside it would cover points
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"Quality vs {xlabel_kind} (outlined points: Pareto front)")
    return _save(fig, path)


def plot_checkpointing(effect: pd.DataFrame, colours: dict, path: Path) -> Path | None:
    if effect.empty:
        return None
    fig, (a0, a1) = _new_figure(2, width=5.5, height=max(3.0, 0.45 * len(effect) + 1.5))
    labels = [f"{r.variant}, n={r.n:,} ({r.task})" for r in effect.itertuples()]
    ys = np.arange(len(effect))
    cols = [colours[v.split(" [")[0]] for v in effect["variant"]]
    for ax, col in ((a0, "mem_saved_pct"), (a1, "time_added_pct")):
        bars = ax.barh(ys, effect[col], color=cols)
        ax.bar_label(bars, labels=[f"{v:+.1f}%" for v in effect[col]], padding=3, fontsize=8)
        ax.margins(x=0.15)
    a0.set_yticks(ys, labels, fontsize=8)
    a1.set_yticks(ys, [""] * len(ys))
    a0.set_xlabel("training peak memory saved (% of off)")
    a1.set_xlabel("training step time added (% of off)")
    a0.set_title("Checkpointing on: memory saved")
    a1.set_title("Checkpointing on: time added")
    for ax in (a0, a1):
        ax.axvline(0, color="black", lw=0.8)
        ax.grid(True, axis="x", alpha=0.3)
        ax.invert_yaxis()
    return _save(fig, path)


# ============================================================================ sections


def _quality_metric(rows: pd.DataFrame) -> str | None:
    for m in QUALITY_METRICS:
        col = f"metrics.{m}"
        if col in rows and rows[col].notna().any():
            return m
    return None


def quality_groups(cells: pd.DataFrame) -> pd.DataFrame:
    """Quality cells (ok, with a quality metric) averaged over seeds: one row per variant,
    scenario, task, length and other varying axis, with mean, std and count of each metric."""
    cols = [f"metrics.{m}" for m in list(QUALITY_METRICS) + list(QUALITY_REFERENCES)]
    present = [c for c in cols if c in cells]
    if not present:
        return pd.DataFrame()
    q = cells[(cells["tags.status"] == "ok") & cells[present].notna().any(axis=1)]
    if q.empty:
        return pd.DataFrame()
    base = ["tags.model", "tags.scenario", "tags.task", "params.seq_len"]
    rows = []
    for _, qs in q.groupby("tags.scenario", sort=True):
        axes = varying_axes(qs, base)  # per scenario: a training-only axis does not split the rest
        for key, g in qs.groupby(base + axes, dropna=False, sort=True):
            row = {"model": key[0], "scenario": key[1], "task": key[2], "n": int(key[3]),
                   "label": _label(key[0], dict(zip(axes, key[4:]))), "seeds": len(g), "rows": g,
                   "metric": _quality_metric(g)}
            for c in present:
                row[c] = g[c]
            rows.append(row)
    return pd.DataFrame(rows)


def pareto_panels(groups: pd.DataFrame, costs: tuple[tuple[str, str], ...]) -> tuple[list[dict], list[str]]:
    """Per (task, n): each quality group's mean quality and the first cost every point has."""
    panels, notes = [], []
    if groups.empty:
        return panels, notes
    for (task, n), g in groups.groupby(["task", "n"], sort=True):
        # one scenario per panel (the one covering most variants): a training-only cell and a
        # full cell measure throughput differently, so they do not share a cost axis
        cover = g.groupby("scenario")["model"].nunique()
        scenario = min(cover[cover == cover.max()].index)
        g = g[g["scenario"] == scenario]
        metric = _quality_metric(pd.concat(list(g["rows"])))
        if metric is None:
            continue
        cost_label, cost_metric = _pick_cost(g, costs)
        if cost_metric is None:
            notes.append(f"{task}, n={n}: no cost metric logged by its quality cells")
            continue
        pts = []
        for _, r in g.iterrows():
            rows = r["rows"]
            qv = rows.get(f"metrics.{metric}")
            cv = rows.get(f"metrics.{cost_metric}")
            if qv is None or cv is None or qv.dropna().empty or cv.dropna().empty:
                notes.append(f"{task}, n={n}: {r['label']} lacks {metric} or {cost_metric}; not plotted")
                continue
            cost = cv.mean()
            if cost_metric.endswith("tokens_per_s"):
                cost = 1e6 / cost  # µs per token
            pts.append({"model": r["model"], "label": r["label"],
                        "quality": qv.mean(), "quality_std": qv.std(ddof=1) if qv.count() > 1 else 0.0,
                        "seeds": int(qv.count()), "cost": cost})
        pts_df = pd.DataFrame(pts)
        if not pts_df.empty:
            pts_df["front"] = pareto_front(pts_df["cost"], pts_df["quality"], QUALITY_METRICS[metric])
        panels.append({"task": task, "n": int(n), "scenario": scenario, "metric": metric,
                       "higher_is_better": QUALITY_METRICS[metric], "cost_label": cost_label,
                       "points": pts_df})
    return panels, notes


def _pick_cost(g: pd.DataFrame, costs) -> tuple[str | None, str | None]:
    best, best_cov = (None, None), 0
    for label, metric in costs:
        cov = sum(bool(f"metrics.{metric}" in r and r[f"metrics.{metric}"].notna().any()) for r in g["rows"])
        if cov == len(g):
            return label, metric
        if cov > best_cov:
            best, best_cov = (label, metric), cov
    return best


def memory_budget_mb(line: Line, budget_gb: float | None) -> tuple[float | None, str]:
    """The memory wall's budget in MiB (peak memory is logged in MiB, `mb` in its name): --budget-gb,
    else a logged device_memory_gb, else total RAM of this machine for cpu runs (GiB in, x1024).
    None, with the reason, when none applies."""
    if budget_gb is not None:
        return budget_gb * 1024, f"{budget_gb:g} GiB (--budget-gb)"
    col = "params.device_memory_gb"
    if col in line.rows and line.rows[col].notna().any():
        gb = float(pd.to_numeric(line.rows[col], errors="coerce").max())
        return gb * 1024, f"{gb:g} GiB (logged device_memory_gb)"
    devices = set(line.rows.get("tags.device", pd.Series(dtype=str)).dropna())
    if devices == {"cpu"}:
        import psutil

        gb = psutil.virtual_memory().total / 2**30
        hosts = set(line.rows.get("tags.host", pd.Series(dtype=str)).dropna())
        where = "this machine" if hosts <= {socket.gethostname()} else \
            f"this machine ({socket.gethostname()}), not the run's host {', '.join(sorted(hosts))}"
        return gb * 1024, f"{gb:.1f} GiB (total RAM of {where})"
    return None, (f"unknown for device {', '.join(sorted(devices)) or '?'}: "
                  "no device_memory_gb logged; pass --budget-gb")


# ============================================================================ the report


def _device_slug(cells: pd.DataFrame) -> str:
    devs = sorted(set(cells.get("tags.device", pd.Series(dtype=str)).dropna()))
    return "+".join(devs) if devs else "unknown-device"


def build_report(experiment: str, sweep_id: str | None = None, out_dir: Path | None = None,
                 budget_gb: float | None = None, tracking_uri: str | None = None) -> Path:
    """Read the runs, write report.md, report.html, results.csv and the figures; returns the
    output folder (default reports/<experiment>/<date>-<device>/ under the repo, with the
    sweep's grid appended for a sweep, so two sweeps of a day do not overwrite each other)."""
    table = load_runs(experiment, sweep_id, tracking_uri)
    cells = table.frame
    if out_dir is None:
        name = f"{datetime.now():%Y-%m-%d}-{_device_slug(cells)}"
        if sweep_id is not None:
            name += f"-{table.grid or 'sweep'}-{sweep_id.rsplit('-', 1)[-1]}"
        out_dir = REPO_ROOT / "reports" / experiment / name
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells.to_csv(out_dir / "results.csv", index=False)

    doc = Doc()
    title = f"attnbench report — {experiment}" + (f", sweep {sweep_id}" if sweep_id else "")
    _section_header(doc, title, table)
    lines = kernel_lines(cells)
    colours = variant_colours(cells["tags.model"].dropna().astype(str))
    qgroups = quality_groups(cells)
    _section_headline(doc, lines, qgroups)
    _section_figures(doc, lines, qgroups, cells, colours, out_dir)
    _section_crossover(doc, lines)
    _section_theory(doc, lines, colours, out_dir)
    _section_memory_wall(doc, lines, budget_gb)
    _section_failures(doc, cells)
    _section_provenance(doc, cells)

    (out_dir / "report.md").write_text(doc.markdown(), encoding="utf-8")
    (out_dir / "report.html").write_text(doc.html(title), encoding="utf-8")
    return out_dir


def _section_header(doc: Doc, title: str, table: RunTable) -> None:
    cells = table.frame
    doc.h(1, title)
    counts = cells["tags.status"].value_counts()
    facts = [f"store: `{redact_uri(table.uri)}`", f"experiment: `{table.experiment}`",
             f"cells: {len(cells)} ({', '.join(f'{v} {k}' for k, v in counts.items())})",
             f"generated: {datetime.now():%Y-%m-%d %H:%M}"]
    if table.sweep_id:
        facts.append(f"sweep: `{table.sweep_id}`; parent run(s): "
                     + (", ".join(f"`{p['run_id']}` ({p['reused']} reused)" for p in table.parents) or "none"))
        facts.append(f"reused from earlier runs: {int(cells['reused'].sum())} cell(s)")
    if cells["start_time"].notna().any():
        first, last = cells["start_time"].min(), cells["start_time"].max()
        facts.append(f"runs started {first:%Y-%m-%d %H:%M} … {last:%Y-%m-%d %H:%M}")
    doc.bullets(facts + table.notes)


def _at(line: Line, metric: str, n: int) -> float | None:
    ns, ys = line.series(metric)
    hit = ys[ns == n]
    return float(hit[0]) if len(hit) else None


def _common_n(lines: list[Line], metric: str) -> int | None:
    sets = [set(line.series(metric)[0].astype(int)) for line in lines]
    common = set.intersection(*sets) if sets else set()
    return max(common) if common else None


def _section_headline(doc: Doc, lines: list[Line], qgroups: pd.DataFrame) -> None:
    doc.h(2, "1. Headline (kernel scenario)")
    if not lines:
        doc.p("No kernel-scenario cells in this selection.")
    else:
        n_common = _common_n(lines, "kernel/fwd_ms")
        m_common = _common_n(lines, "kernel/peak_mem_mb")
        doc.p(f"Exponents are least-squares slopes of log(value) on log(n) over the {FIT_POINTS} largest "
              "lengths that ran ok for each line (the lengths used are listed). "
              + (f"Time is compared at the largest length every line ran: n = {n_common:,}. " if n_common
                 else "No length ran ok on every line, so no common-length column. ")
              + (f"Memory at n = {m_common:,}." if m_common else ""))
        tasks = sorted(qgroups["task"].unique()) if not qgroups.empty else []
        at_n = f" @ {n_common:,}" if n_common else ""
        at_m = f" @ {m_common:,}" if m_common else ""
        headers = ["variant", "exact", "fwd time exp.", "fwd+bwd time exp.", "memory exp.", "fit lengths",
                   f"fwd ms{at_n}", f"fwd+bwd ms{at_n}", f"peak MB{at_m}", "backend(s)"]
        headers += [f"quality: {t}" for t in tasks]
        rows = []
        for ln in lines:
            ft, fb, fm = ln.fit("kernel/fwd_ms"), ln.fit("kernel/fwdbwd_ms"), ln.fit("kernel/peak_mem_mb")
            used = sorted({v for f in (ft, fb, fm) if f for v in f.lengths})
            backends = sorted(set(ln.ok().get("tags.backend", pd.Series(dtype=str)).dropna()))
            row = [ln.label, {True: "yes", False: "no", None: "unknown"}[ln.exact],
                   f"{ft.exponent:.2f}" if ft else "—", f"{fb.exponent:.2f}" if fb else "—",
                   f"{fm.exponent:.2f}" if fm else "—", _lengths(used) or "—",
                   _fmt(_at(ln, "kernel/fwd_ms", n_common)) if n_common else "—",
                   _fmt(_at(ln, "kernel/fwdbwd_ms", n_common)) if n_common else "—",
                   _fmt(_at(ln, "kernel/peak_mem_mb", m_common)) if m_common else "—",
                   ", ".join(backends) or "—"]
            row += [_headline_quality(qgroups, ln.model, t) for t in tasks]
            rows.append(row)
        doc.table(headers, rows)
    _quality_table(doc, qgroups)


def _headline_quality(qgroups: pd.DataFrame, model: str, task: str) -> str:
    g = qgroups[(qgroups["model"] == model) & (qgroups["task"] == task)]
    if g.empty:
        return "—"
    top = g[g["n"] == g["n"].max()].sort_values("seeds", ascending=False).iloc[0]
    m = top["metric"]
    return f"{m} {_mean_std(top[f'metrics.{m}'])} at n = {top['n']:,}" + \
        ("" if top["label"] == model else f" ({top['label']})")


def _quality_table(doc: Doc, qgroups: pd.DataFrame) -> None:
    doc.h(3, "Quality per task (mean ± std over seeds)")
    if qgroups.empty:
        doc.p("No cell logged a quality metric.")
        return
    metrics = [m for m in list(QUALITY_METRICS) + list(QUALITY_REFERENCES) if f"metrics.{m}" in qgroups]
    metrics = [m for m in metrics if qgroups[f"metrics.{m}"].map(lambda s: s.notna().any()).any()]
    headers = ["task", "n", "variant", "scenario", "seeds"] + metrics
    rows = []
    for _, r in qgroups.sort_values(["task", "n", "label"]).iterrows():
        rows.append([r["task"], f"{r['n']:,}", r["label"], r["scenario"], r["seeds"]]
                    + [_mean_std(r[f"metrics.{m}"]) for m in metrics])
    doc.table(headers, rows)
    refs = [m for m in QUALITY_REFERENCES if m in metrics]
    if refs:
        doc.p(f"{', '.join(refs)}: the same data scored by a unigram model, a floor any model must beat.")


def _section_figures(doc: Doc, lines, qgroups, cells, colours, out: Path) -> None:
    doc.h(2, "2. Figures")
    specs = [("kernel/fwd_ms", "forward time per call (ms)", "Forward time vs length", "time_fwd.png"),
             ("kernel/fwdbwd_ms", "forward + backward time per call (ms)", "Forward + backward time vs length",
              "time_fwdbwd.png"),
             ("kernel/peak_mem_mb", "peak memory of one forward (MB)", "Forward peak memory vs length",
              "memory_fwd.png"),
             ("kernel/peak_mem_fwdbwd_mb", "peak memory of forward + backward (MB)",
              "Forward + backward peak memory vs length", "memory_fwdbwd.png")]
    for metric, ylabel, title, name in specs:
        path = plot_scaling(lines, metric, ylabel, title, colours, out / name) if lines else None
        if path:
            doc.figure(path, f"{title} (log-log; dashed grey: O(n) and O(n²) through the smallest length; "
                             "legend: fitted slope over the largest lengths)")
        else:
            doc.p(f"{title}: no ok kernel cells logged `{metric}`.")

    for kind, costs, name in (("time per token", TIME_COSTS, "quality_vs_time.png"),
                              ("peak memory", MEMORY_COSTS, "quality_vs_memory.png")):
        panels, notes = pareto_panels(qgroups, costs)
        path = plot_pareto(panels, colours, kind, out / name)
        if path:
            doc.figure(path, f"Quality vs {kind}, one panel per task and length, Pareto front outlined")
            rows = [[p["task"], f"{p['n']:,}", p["scenario"], p["metric"], p["cost_label"],
                     ", ".join(p["points"].loc[p["points"]["front"], "label"]) or "—"]
                    for p in panels if len(p["points"])]
            doc.table(["task", "n", "cells", "quality", "cost", f"on the Pareto front ({kind})"], rows)
        else:
            doc.p(f"Quality vs {kind}: no quality cells with a cost metric.")
        if notes:
            doc.bullets(notes)

    doc.h(3, "Gradient checkpointing")
    effect = checkpointing_effect(cells)
    path = plot_checkpointing(effect, colours, out / "checkpointing.png")
    if path is None:
        doc.p("No training cells that differ only in `trainer.grad_checkpointing` (both ok).")
        return
    doc.figure(path, "Gradient checkpointing on vs off: training peak memory saved and step time added")
    doc.table(["variant", "task", "n", "seeds", "peak MB off", "peak MB on", "memory saved",
               "step ms off", "step ms on", "time added"],
              [[r.variant, r.task, f"{r.n:,}", r.seeds, _fmt(r.mem_off_mb), _fmt(r.mem_on_mb),
                f"{r.mem_saved_pct:.1f}%", _fmt(r.step_off_ms), _fmt(r.step_on_ms), f"{r.time_added_pct:+.1f}%"]
               for r in effect.itertuples()])


def _section_crossover(doc: Doc, lines: list[Line]) -> None:
    doc.h(2, "3. Crossover lengths and ratios")
    exact = [ln for ln in lines if ln.exact is True]
    others = [ln for ln in lines if ln.exact is False]
    unknown = [ln.label for ln in lines if ln.exact is None]
    if unknown:
        doc.p(f"No consistent `exact` tag on: {', '.join(unknown)}; left out of this section.")
    if not exact or not others:
        doc.p("Crossovers need at least one line tagged exact=True and one tagged exact=False "
              f"(have {len(exact)} exact, {len(others)} efficient).")
        _ratio_table(doc, exact, others)
        return
    doc.p("Where each efficient line becomes faster (forward time) and smaller (forward peak "
          "memory) than each exact line with the same other axes, interpolated in log-log space "
          "between the two measured lengths around the last sign change.")
    rows = []
    for eff in others:
        for ex in exact:
            if not eff.same_axes(ex):
                continue
            cells = [eff.label, ex.label]
            for metric, word in (("kernel/fwd_ms", "faster"), ("kernel/fwdbwd_ms", "faster"),
                                 ("kernel/peak_mem_mb", "smaller")):
                ce, ye = eff.series(metric)
                cx, yx = ex.series(metric)
                common = np.intersect1d(ce, cx)
                co = crossover(common, ye[np.isin(ce, common)], yx[np.isin(cx, common)])
                cells.append(co.describe(word))
            rows.append(cells)
    doc.table(["efficient", "vs exact", "faster (forward)", "faster (fwd+bwd)", "smaller (forward peak)"], rows)
    _ratio_table(doc, exact, others)


_RATIO_METRICS = (("kernel/fwd_ms", "faster", "slower"), ("kernel/fwdbwd_ms", "faster", "slower"),
                  ("kernel/peak_mem_mb", "smaller", "larger"))


def _ratio_table(doc: Doc, exact: list[Line], others: list[Line]) -> None:
    """Each line against each exact line with the same other axes, at the largest length both
    ran: the number a "how much faster is it at my length" question wants. Two exact lines are
    compared once, the one faster there first."""
    pairs = [(eff, ex) for eff in others for ex in exact]
    for i, a in enumerate(exact):
        for b in exact[i + 1:]:
            faster_b = ratio_at_largest(*b.series("kernel/fwd_ms"), *a.series("kernel/fwd_ms"))
            pairs.append((b, a) if (faster_b.value or 0) > 1 else (a, b))
    rows = []
    for cand, ref in pairs:
        if not cand.same_axes(ref):
            continue
        cells = [cand.label, ref.label]
        for metric, more, less in _RATIO_METRICS:
            cells.append(ratio_at_largest(*cand.series(metric), *ref.series(metric)).describe(more, less))
        rows.append(cells)
    if not rows:
        return
    doc.p("Ratios at the largest length both lines ran ok, each column on its own (a "
          "forward+backward cell skipped or out of memory at the largest n moves that column to a "
          "smaller n): the reference's median over the line's.")
    doc.table(["line", "vs", "forward time", "fwd+bwd time", "forward peak memory"], rows)


def _median_metric(rows: pd.DataFrame, metric: str) -> float | None:
    col = f"metrics.{metric}"
    return float(rows[col].median()) if col in rows and rows[col].notna().any() else None


def _section_theory(doc: Doc, lines: list[Line], colours: dict, out: Path) -> None:
    doc.h(2, "4. Theory next to measurement")
    seeds = seed_figures()
    doc.p("Seed figures, recomputed with the formulas the measurement uses "
          "(`pipeline.analytic.score_macs` = n²·d, `score_entries` = n²):")
    doc.table(["n", "d", "score multiply-adds n²·d", "score entries n²"],
              [[f"{r['n']:,}", f"{r['d']:,}", f"≈ {_sci(r['score_macs'])} ({r['score_macs']:,})",
                f"≈ {_sci(r['score_entries'])} ({r['score_entries']:,})"] for r in seeds["rows"]])
    doc.p(f"{seeds['length_factor']}× the length → {seeds['work_factor']:g}× the score work at fixed d.")
    if not lines:
        return
    path = plot_flops(lines, colours, out / "flops.png")
    if path:
        doc.figure(path, "Analytic vs counted forward FLOPs, mixing share, "
                         "achieved fraction of the measured GEMM peak")
    rows = []
    for ln in lines:
        ok = ln.ok()
        for n, g in ok.groupby("params.seq_len", sort=True):
            def med(m, g=g):
                return _median_metric(g, m)

            total, proj = med("kernel/flops_fwd_analytic"), med("kernel/flops_fwd_projection")
            mix, frac = med("kernel/flops_fwd_mixing"), med("kernel/peak_fraction")
            counted = med("kernel/flops_fwd")
            peak = float(g["params.gemm_peak_tflops"].median()) if "params.gemm_peak_tflops" in g else None
            counted_txt = _fmt(counted) if counted else "not counted"
            ratio = _fmt(counted / total) if counted and total else "—"
            mix_frac = med("kernel/mixing_peak_fraction")
            rows.append([ln.label, f"{int(n):,}", _fmt(total),
                         f"{100 * proj / total:.1f}%" if total and proj is not None else "—",
                         f"{100 * mix / total:.1f}%" if total and mix is not None else "—",
                         counted_txt, ratio, _fmt(med("kernel/tflops")), _fmt(peak),
                         f"{100 * frac:.2f}%" if frac is not None else "—",
                         f"{100 * mix_frac:.2f}%" if mix_frac is not None else "—"])
    doc.table(["line", "n", "analytic FLOPs", "projection", "mixing", "counted FLOPs", "counted / analytic",
               "achieved TFLOP/s", "GEMM peak TFLOP/s", "of peak", "mixing alone, of peak"], rows)
    doc.p("Counted FLOPs come from `torch.utils.flop_counter`; a kernel it has no formula for "
          "counts nothing, shown as \"not counted\" (never as 0). A counted/analytic ratio below 1 means "
          "part of the work ran in such a kernel (e.g. a fused attention); above 1, that the counter "
          "charged work the analytic count skips (e.g. the masked half of a causal score matrix). "
          "Achieved TFLOP/s is analytic (useful) forward FLOPs over the median forward time. "
          "\"Mixing alone\" is the mixing FLOPs (for exact attention the 4·B·H·n²·d_k of QKᵀ and PV, "
          "halved when causal; for the sliding window only the (query, key) pairs of its band; "
          "for Performer its feature maps and sums; for the SSM its FFT convolution) over the "
          "forward time minus the time of the mixer's projections run alone.")


def _section_memory_wall(doc: Doc, lines: list[Line], budget_gb: float | None) -> None:
    doc.h(2, "5. Memory wall (predicted)")
    if not lines:
        doc.p("No kernel cells.")
        return
    doc.p("Largest n whose peak memory fits the budget, extrapolated from each line's fitted "
          "memory curve (peak ≈ c·n^k over its largest ok lengths). These are predictions, not measurements.")
    rows = []
    for ln in lines:
        budget, why = memory_budget_mb(ln, budget_gb)
        row = [ln.label, why]
        for metric in ("kernel/peak_mem_mb", "kernel/peak_mem_fwdbwd_mb"):
            fit = ln.fit(metric)
            if fit is None or budget is None or fit.exponent <= 0:
                row.append("—" if budget is None else "no usable fit")
                continue
            n_max = fit.solve(budget)
            row.append(f"predicted n ≈ {_fmt(n_max)} "
                       f"(k = {fit.exponent:.2f}, fit over n = {_lengths(fit.lengths)})")
        rows.append(row)
    doc.table(["line", "budget", "forward", "forward + backward"], rows)


def _section_failures(doc: Doc, cells: pd.DataFrame) -> None:
    doc.h(2, "6. Cells that did not finish ok")
    bad = cells[cells["tags.status"] != "ok"]
    if bad.empty:
        doc.p("Every cell finished ok.")
    else:
        doc.table(["variant", "scenario", "task", "n", "status", "reason", "run"],
                  [[r.get("tags.model"), r.get("tags.scenario"), r.get("tags.task"),
                    _fmt_n(r.get("params.seq_len")), r["tags.status"],
                    r.get("tags.failure_reason") if isinstance(r.get("tags.failure_reason"), str) else "—",
                    f"{r['run_name']} `{r['run_id'][:8]}`"] for _, r in bad.iterrows()])
    col = "tags.fwdbwd_skipped"
    part = cells[(cells["tags.status"] == "ok") & cells[col].notna()] if col in cells else cells.iloc[0:0]
    if not part.empty:
        doc.p("Kernel cells that finished ok without a forward + backward figure (their forward stands):")
        doc.table(["variant", "n", "dtype", "why", "run"],
                  [[r.get("tags.model"), _fmt_n(r.get("params.seq_len")), r.get("params.backbone.dtype", "—"),
                    r[col], f"{r['run_name']} `{r['run_id'][:8]}`"] for _, r in part.iterrows()])


def _section_provenance(doc: Doc, cells: pd.DataFrame) -> None:
    doc.h(2, "7. Backends, hardware and versions")
    doc.h(3, "Backend that ran, per variant")
    rows = []
    for model, g in cells.groupby("tags.model", sort=True):
        ran = g.dropna(subset=["tags.backend"]) if "tags.backend" in g else None  # none: no cell got that far
        per = [] if ran is None else [f"{b} ({len(gb)}: {', '.join(sorted(set(gb['tags.scenario'].astype(str))))})"
                                      for b, gb in ran.groupby("tags.backend", sort=True)]
        notes = sorted(set(g.get("tags.backend_note", pd.Series(dtype=str)).dropna()))
        details = sorted(set(g.get("tags.backend_detail", pd.Series(dtype=str)).dropna()))
        flag = ["more than one backend ran"] if len(per) > 1 else []
        rows.append([model, "; ".join(per) or "not logged", "; ".join(details) or "—",
                     "; ".join(flag + notes) or "—"])
    doc.table(["variant", "backend (cells: scenarios)", "operator, build", "why not the preferred kernel"], rows)
    doc.h(3, "Hardware and software")
    rows = []
    for tag in PROVENANCE_TAGS:
        col = f"tags.{tag}"
        vals = cells[col].dropna().value_counts() if col in cells else pd.Series(dtype=int)
        shown = ", ".join(f"{v} ({c})" if len(vals) > 1 else str(v) for v, c in vals.items())
        rows.append([tag, shown or "not logged"])
    if "params.gemm_peak_tflops" in cells:
        peaks = cells["params.gemm_peak_tflops"].dropna()
        if len(peaks):
            rows.append(["GEMM peak (TFLOP/s, measured)", ", ".join(_fmt(v) for v in sorted(set(peaks)))])
    doc.table(["field", "value (cells, when several)"], rows)


# ============================================================================ CLI


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", required=True, help="MLflow experiment name")
    ap.add_argument("--sweep", default=None, help="report only this sweep_id (plus the cells it reused)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default reports/<experiment>/<date>-<device>/)")
    ap.add_argument("--budget-gb", type=float, default=None, help="memory budget for the memory wall")
    ap.add_argument("--tracking-uri", default=None, help="override MLFLOW_TRACKING_URI / the default store")
    args = ap.parse_args(argv)
    try:
        out = build_report(args.experiment, args.sweep, args.out, args.budget_gb, args.tracking_uri)
    except ValueError as e:
        ap.exit(2, f"report: {e}\n")
    print(f"report written to {out}/report.html (and report.md, results.csv)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
