"""The rows of a comparison (pipeline/compare): the figures compared, each measured on both
sides of a matched cell (`Measured`, rounds pooled; the sides themselves in sides.py) and judged
(`compare_figure`), and `compare` over two sides.

    cmp = compare(load_side("exp-a", uri), load_side("20261207-050837-fc748b", uri)); cmp.rows
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline import record as R
from pipeline.compare.sides import ROUND_COL, Side, cells_of, identity_keys, norm, read_calls
from pipeline.compare.stats import (
    ALPHA,
    DRIFT,
    MEM_FLOOR_MB,
    NU0,
    QUALITY_FLOOR,
    RUN_NOISE,
    THRESHOLD,
    judge,
    mann_whitney_p,
    z_p,
)
from pipeline.stability import Z95, log_sigma


@dataclass(frozen=True)
class Figure:
    """A compared figure: the metrics that hold it (the first a cell has), where its raw calls
    are (artifact file, key), and an absolute change under which it is the same."""

    name: str
    label: str
    metrics: tuple[str, ...]
    calls: tuple[str, str | None] | None = None
    floor: float = 0.0

    @property
    def timed(self) -> bool:
        return all(m in R.TIMED for m in self.metrics)


FIGURES = (
    Figure("fwd", "forward ms", (R.KERNEL_FWD_MS,), ("timings.json", "fwd_ms")),
    Figure("fwdbwd", "forward+backward ms", (R.KERNEL_FWDBWD_MS,), ("timings.json", "fwdbwd_ms")),
    Figure("peak_mem", "peak memory MiB", (R.KERNEL_PEAK_MEM_MB, R.DECODE_PEAK_MEM_MB, R.TRAIN_PEAK_MEM_MB),
           floor=MEM_FLOOR_MB),
    Figure("decode_token", "decode ms per token", (R.DECODE_MS_PER_TOKEN,), ("timings.json", "token_ms")),
    Figure("decode_prefill", "decode prefill ms", (R.DECODE_PREFILL_MS,), ("timings.json", "prefill_ms")),
    Figure("train_step", "train step ms", (R.TRAIN_STEP_MS,), ("train_step_ms.json", None)),
    Figure("infer", "infer latency ms", (R.INFER_LATENCY_MS,), ("infer_latency_ms.json", None)),
    Figure("quality", "quality: val loss, or error vs exact", (R.VAL_LOSS, R.QUALITY_REL_ERR_VS_EXACT),
           floor=QUALITY_FLOOR),
)
BY_NAME = {f.name: f for f in FIGURES}
# the config keys (pipeline/schema.py) that name a cell's variant, scenario and task, as param columns
MODEL_P, SCENARIO_P, TASK_P = (R.col(k, "param") for k in ("model.name", "scenario.name", "task.name"))


# ----------------------------------------------------------------------------- one figure of one cell
@dataclass
class Measured:
    """One side's figure of a cell: its value, σ of log value from its runs' CIs and rounds,
    how many rounds, its raw calls, and whether its timings are flagged."""

    value: float
    sigma_within: float
    rounds: int
    log_values: list[float]
    calls: list[float] | None
    flagged: bool
    spread: float = 0.0  # max - min over the rounds
    rss: bool = False    # a CPU's resident high-water mark: moves by whole buffers between processes


def _num(v) -> float | None:
    """A finite float, or None."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def measure_side(runs: list[dict], fig: Figure, cache: dict | None) -> Measured | None:
    """The figure from a cell's ok runs (records); where some rounds are stable, only those."""
    status_col, stab_col = R.col(R.STATUS), R.col(R.STABILITY)
    ok = [r for r in runs if r.get(status_col, "ok") == "ok"]
    metric = next((m for m in fig.metrics if any(_num(r.get(R.col(m))) is not None for r in ok)), None)
    if metric is None:
        return None
    ok = [r for r in ok if _num(r.get(R.col(metric))) is not None]
    tagged = [r for r in ok if isinstance(r.get(stab_col), str)]
    stable = [r for r in ok if r.get(stab_col) == R.STABLE] if fig.timed else ok
    flagged = fig.timed and not stable and bool(tagged)
    use = stable if stable else ok
    vals = np.array([_num(r[R.col(metric)]) for r in use])
    vals = vals[vals > 0] if (vals > 0).any() else vals
    sig = []
    if metric in R.TIMED:
        lo_c, hi_c = (R.col(n) for n in R.ci_names(metric))
        sig = [log_sigma(_num(r.get(lo_c)) or math.nan, _num(r.get(hi_c)) or math.nan) for r in use]
    sig = [x for x in sig if math.isfinite(x)]
    within = math.sqrt(float(np.mean(np.square(sig)))) / math.sqrt(len(use)) if sig else math.nan
    calls = None
    if cache is not None and fig.calls:
        got = [read_calls(r, fig.calls, cache) for r in use]
        calls = [x for g in got if g for x in g] or None
    methods = {str(r.get(c)) for r in use for c in (R.col(R.MEMORY_METHOD), R.col(R.INFER_MEMORY_METHOD))
               if isinstance(r.get(c), str)}
    return Measured(float(np.median(vals)), within, len(use), [math.log(v) for v in vals if v > 0], calls,
                    bool(flagged), spread=float(vals.max() - vals.min()) if len(vals) else 0.0,
                    rss=fig.name == "peak_mem" and any(m.startswith("VmHWM") for m in methods))


def run_noise_from_rounds(pairs: list[tuple[Measured | None, Measured | None]]) -> tuple[float, int]:
    """σ_run of one figure, pooled over every side with ≥ 2 unflagged rounds: sqrt of the mean
    within-cell variance of log(value); (NaN, 0) where nothing ran in rounds."""
    var = [float(np.var(m.log_values, ddof=1)) for pair in pairs for m in pair
           if m is not None and not m.flagged and len(m.log_values) >= 2]
    return (math.sqrt(float(np.mean(var))), len(var)) if var else (math.nan, 0)


RSS_NOTE = ("a CPU's peak resident memory moves by whole buffers between processes (the heap's layout); "
            "rounds that agree on both sides (rounds=2) are needed to call it")


def _rounds_agree(b: Measured, n: Measured, floor: float) -> bool:
    """Both sides ran in rounds (each its own server) and each side's rounds agree within the floor."""
    return min(b.rounds, n.rounds) >= 2 and max(b.spread, n.spread) <= floor


def cell_run_noise(b: Measured, n: Measured, pooled: float) -> float:
    """The cell's own σ_run: its rounds' variance (both sides, df = Σ(rounds - 1)) moderated
    toward the figure's pooled σ_run, weighted as NU0 degrees of freedom (two rounds a side are
    too few to trust alone, and cells do differ: sub-millisecond ones vary most)."""
    df, ss = 0, 0.0
    for m in (b, n):
        if len(m.log_values) >= 2 and not m.flagged:
            df += len(m.log_values) - 1
            ss += float(np.var(m.log_values, ddof=1)) * (len(m.log_values) - 1)
    return math.sqrt((NU0 * pooled * pooled + ss) / (NU0 + df))


def compare_figure(b: Measured, n: Measured, fig: Figure, run_noise: float, threshold: float,
                   alpha: float, drift: float = 0.0) -> dict:
    """One row's numbers and verdict (both sides present). `run_noise`: the figure's σ_run per
    round (moderated by the cell's rounds); `drift`: σ of a whole sweep's shift (timed figures)."""
    run_noise = cell_run_noise(b, n, run_noise)
    ratio = n.value / b.value if b.value > 0 else (1.0 if n.value == 0 else math.inf)
    row = {"base": b.value, "new": n.value, "ratio": ratio, "ci_lo": math.nan, "ci_hi": math.nan,
           "p": math.nan, "test": "", "sigma": math.nan}
    if not np.isfinite(ratio) and fig.timed:
        return {**row, "verdict": "missing", "note": "base value is 0"}
    sides = []
    for m in (b, n):
        w = m.sigma_within if np.isfinite(m.sigma_within) else 0.0
        sides.append(w * w + run_noise * run_noise / m.rounds + (drift * drift if fig.timed else 0.0))
    sigma = math.sqrt(sum(sides))
    lo, hi = ratio * math.exp(-Z95 * sigma), ratio * math.exp(Z95 * sigma)
    if not fig.timed:  # no calls: the interval from the rounds' spread (none without rounds)
        small = abs(n.value - b.value) <= fig.floor  # under the figure's floor: no change at all
        verdict = "same" if small else judge(ratio, lo, hi, math.nan, threshold, alpha)
        note = f"change under the floor {fig.floor:g}" if small and ratio != 1 else ""
        if verdict != "same" and (b.rss or n.rss) and not _rounds_agree(b, n, fig.floor):
            verdict, note = "unstable", RSS_NOTE
        return {**row, "ci_lo": lo, "ci_hi": hi, "sigma": sigma, "test": "none (no calls)",
                "verdict": verdict, "note": note}
    if b.calls and n.calls:
        p, test = mann_whitney_p(b.calls, n.calls), "mann-whitney"
    else:
        p, test = z_p(math.log(ratio), sigma), "z (CI)"
    verdict = "unstable" if (b.flagged or n.flagged) else judge(ratio, lo, hi, p, threshold, alpha)
    note = ", ".join(f"{s} timings flagged" for s, m in (("base", b), ("new", n)) if m.flagged)
    return {**row, "ci_lo": lo, "ci_hi": hi, "p": p, "test": test, "sigma": sigma, "verdict": verdict,
            "note": note}


# ----------------------------------------------------------------------------- two sides
@dataclass
class Comparison:
    base: Side
    new: Side
    rows: pd.DataFrame
    keys: list[str]
    run_noise: dict[str, float]  # each figure's σ_run
    run_noise_source: dict[str, str]
    threshold: float
    alpha: float
    notes: list[str]
    drift: float = DRIFT  # σ of a whole sweep's shift, per side (0: the sides were interleaved)
    ignored: tuple[str, ...] = ()  # axes left out of the matching (--ignore)

    @property
    def same_machine(self) -> bool:
        return self.base.devices() == self.new.devices() and self.base.machines() == self.new.machines()

    def regressions(self, fail_on: Sequence[str]) -> pd.DataFrame:
        r = self.rows
        return r[(r["verdict"] == "slower") & r["figure"].isin(list(fail_on))]


def _label(runs: pd.DataFrame) -> str:
    name = str(runs.iloc[0].get("run_name") or "")
    rnd = runs.iloc[0].get(ROUND_COL)
    if rnd is not None and not pd.isna(rnd) and name.endswith(f"-r{int(float(rnd))}"):
        name = name[: -len(f"-r{int(float(rnd))}")]
    return name


def _line(key: tuple, keys: Sequence[str], varying: set[str]) -> str:
    """The axes that tell this cell from the others of its variant and length: `d_model=64, n_heads=1`."""
    short = {TASK_P: "task"}
    return ", ".join(f"{short.get(k, k.rsplit('.', 1)[-1])}={v}" for k, v in zip(keys, key) if k in varying and v != "")


def _varying(frame: pd.DataFrame, keys: Sequence[str]) -> dict[tuple, set[str]]:
    """Per (variant, scenario): the keys that take several values among its cells (the length,
    the variant and the scenario are in the cell's name already; a task's layout follows its
    name and the length)."""
    named = {R.col(R.SEQ_LEN, "param"), MODEL_P, SCENARIO_P}
    shown = [k for k in keys if k not in named
             and not (k.startswith(R.col("task.", "param")) and k != TASK_P)]
    by = [c for c in (MODEL_P, SCENARIO_P) if c in frame]
    if not by:
        return {(): {k for k in shown if frame[k].map(norm).nunique() > 1}}
    return {tuple(norm(v) for v in (g if isinstance(g, tuple) else (g,))):
            {k for k in shown if part[k].map(norm).nunique() > 1}
            for g, part in frame.groupby(by, dropna=False)}


def _group_of(key: tuple, keys: Sequence[str]) -> tuple:
    where = dict(zip(keys, key))
    return tuple(where[c] for c in (MODEL_P, SCENARIO_P) if c in where)


def compare(base: Side, new: Side, ignore: Sequence[str] = (), threshold: float = THRESHOLD,
            alpha: float = ALPHA, run_noise: float | None = None, figures: Sequence[Figure] = FIGURES,
            raw_calls: bool = True, drift: float = DRIFT) -> Comparison:
    notes: list[str] = []
    kb, kn = identity_keys(base.frame, ignore), identity_keys(new.frame, ignore)
    keys = sorted(set(kb) & set(kn))
    for side, only in (("base", set(kb) - set(kn)), ("new", set(kn) - set(kb))):
        if only:
            notes.append(f"params only in the {side} sweep, not used to match cells: "
                         + ", ".join(sorted(c.split(".", 1)[1] for c in only)))
    # a narrow copy of each side: what matching and the figures read (a store's frame is wide)
    want = set(keys) | {"run_name", "artifact_uri", ROUND_COL, R.col(R.STATUS), R.col(R.STABILITY),
                        R.col(R.MEMORY_METHOD), R.col(R.INFER_MEMORY_METHOD)}
    for fig in figures:
        for m in fig.metrics:
            want |= {R.col(m)} | ({R.col(c) for c in R.ci_names(m)} if m in R.TIMED else set())
    slim = [side.frame[[c for c in side.frame.columns if c in want]] for side in (base, new)]
    cb, cn = cells_of(slim[0], keys), cells_of(slim[1], keys)
    both = pd.concat(slim)
    varying = _varying(both, keys)
    cache: dict | None = {} if raw_calls else None
    measured: list[tuple] = []
    for key in list(cb) + [k for k in cn if k not in cb]:
        rb, rn = cb.get(key), cn.get(key)
        label = _label(rb if rb is not None else rn)
        line = _line(key, keys, varying.get(_group_of(key, keys), set()))
        found = 0
        recs = [None if g is None else g.to_dict("records") for g in (rb, rn)]
        for fig in figures:
            mb = measure_side(recs[0], fig, cache) if rb is not None else None
            mn = measure_side(recs[1], fig, cache) if rn is not None else None
            if mb is not None or mn is not None:
                found += 1
                measured.append((key, label, line, fig, mb, mn, rb, rn))
        if not found and (rb is None or rn is None):  # on one side only, with no figure (a failed cell)
            measured.append((key, label, line, None, None, None, rb, rn))
    noise, source = {}, {}
    for fig in figures:
        pooled, count = run_noise_from_rounds([(m[4], m[5]) for m in measured if m[3] is fig])
        if run_noise is not None and fig.timed:
            noise[fig.name], source[fig.name] = run_noise, "set by --run-noise"
        elif count:
            noise[fig.name], source[fig.name] = pooled, f"pooled over the rounds of {count} cells"
        elif fig.timed:
            noise[fig.name], source[fig.name] = RUN_NOISE, "assumed: no rounds in either sweep (--run-noise)"
        else:
            noise[fig.name], source[fig.name] = 0.0, "none: no rounds in either sweep, so none is known"
    rows = []
    for _key, label, line, fig, mb, mn, rb, rn in measured:
        base_row = {"cell": label, "line": line, "figure": fig.name if fig else "-"}
        if mb is None or mn is None:
            missing_side = "base" if (rb is None or (mb is None and rn is not None)) else "new"
            runs = rb if missing_side == "base" else rn
            why = "no such cell" if runs is None else _status_text(runs)
            rows.append({**base_row, "base": mb.value if mb else math.nan, "new": mn.value if mn else math.nan,
                         "ratio": math.nan, "ci_lo": math.nan, "ci_hi": math.nan, "p": math.nan, "test": "",
                         "sigma": math.nan, "verdict": "missing", "note": f"{missing_side}: {why}"})
            continue
        rows.append({**base_row, **compare_figure(mb, mn, fig, noise[fig.name], threshold, alpha, drift)})
    cols = ["cell", "line", "figure", "base", "new", "ratio", "ci_lo", "ci_hi", "p", "verdict", "test", "sigma", "note"]
    frame = pd.DataFrame(rows, columns=cols)
    return Comparison(base, new, frame, keys, noise, source, threshold, alpha, notes, drift, tuple(ignore))


def _status_text(runs: pd.DataFrame) -> str:
    st = runs[R.col(R.STATUS)].astype(str) if R.col(R.STATUS) in runs else pd.Series(["?"])
    return "status " + ", ".join(sorted(set(st))) if not (st == "ok").any() else "figure not recorded"
