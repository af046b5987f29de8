"""MLflow -> one table: the cells of an experiment or of one sweep as a `RunTable`, one row per
cell (latest per config_hash), and the sweep parent runs behind them.

    table = load_runs("attnbench", sweep_id=None, uri=None)   # table.frame[R.col(R.STATUS)]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pandas as pd

from pipeline import record as R

# the table's column prefixes, as MLflow's own search_runs names them
PARAMS, METRICS, TAGS = (R.col("", kind) for kind in ("param", "metric", "tag"))


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
        "artifact_uri": info.artifact_uri,
        "reused": reused,
    }
    row.update({R.col(k, "param"): v for k, v in data.params.items()})
    row.update({R.col(k, "metric"): v for k, v in data.metrics.items()})  # latest value of a history
    row.update({R.col(k, "tag"): v for k, v in data.tags.items()})
    return row


def latest_per_config(frame: pd.DataFrame) -> pd.DataFrame:
    """One run per config_hash: the latest `ok` one whose timings are `stable`, else the latest
    `ok` one, else the latest of any status (a failure later fixed by a rerun is not a failure
    of the experiment; a disturbed measurement is left out where a stable one of the same cell
    exists). Runs without a hash all stay."""
    hash_col, status, stab = R.col(R.CONFIG_HASH), R.col(R.STATUS), R.col(R.STABILITY)
    if hash_col not in frame or frame.empty:
        return frame
    has = frame[hash_col].notna()
    # rank each run on a narrow frame (a store's frame has hundreds of columns): stable ok runs
    # first, then ok ones, then the rest; the latest wins within a rank
    ok = frame[status].eq("ok") if status in frame else pd.Series(False, index=frame.index)
    stable = ok & frame[stab].eq(R.STABLE) if stab in frame else pd.Series(False, index=frame.index)
    rank = pd.DataFrame({"h": frame[hash_col], "s": stable, "o": ok, "t": frame["start_time"]})[has]
    best = rank.sort_values(["s", "o", "t"], kind="stable").groupby("h", sort=False).tail(1).index
    return frame.loc[frame.index[~has].union(best)].sort_index()


def _numeric_params(frame: pd.DataFrame) -> pd.DataFrame:
    """MLflow stores params as strings; turn a column numeric when every value parses."""
    out = frame.copy()
    for c in [c for c in out.columns if c.startswith(PARAMS)]:
        conv = pd.to_numeric(out[c], errors="coerce")
        if conv.notna().sum() == out[c].notna().sum():
            out[c] = conv
    for c in [c for c in out.columns if c.startswith(METRICS)]:
        out[c] = pd.to_numeric(out[c], errors="coerce")
    return out


def _is_parent(run) -> bool:
    return run.data.tags.get(R.ROLE) == R.ROLE_SWEEP


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
        runs = _search_all(client, exp.experiment_id, f"{R.col(R.SWEEP_ID)} = '{sweep_id}'")
        if not runs:
            raise ValueError(f"no runs with sweep_id {sweep_id!r} in experiment {experiment!r}")
    else:
        runs = _search_all(client, exp.experiment_id, "")
    parents = [r for r in runs if _is_parent(r)]
    cells = [r for r in runs if not _is_parent(r)]
    rows = [_row(r, reused=False) for r in cells]
    if sweep_id:
        if not parents:
            notes.append(f"no parent run tagged {R.ROLE}={R.ROLE_SWEEP} found for sweep {sweep_id}; "
                         "reused cells cannot be listed")
        have = {r.info.run_id for r in cells}
        reused_ids = sorted({v for p in parents for k, v in p.data.tags.items()
                             if k.startswith(R.REUSED_PREFIX)} - have)
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
    model, scenario, task, status = (R.col(t) for t in (R.MODEL, R.SCENARIO, R.TASK, R.STATUS))
    seq_len = R.col(R.SEQ_LEN, "param")
    for col in (model, scenario, task, status, seq_len):
        if col not in frame:
            frame[col] = None
    untagged = "no status tag (mlflow: " + frame["mlflow_status"] + ")"
    frame[status] = frame[status].fillna(untagged)
    frame = frame.sort_values([scenario, model, seq_len, "start_time"],
                              na_position="last").reset_index(drop=True)
    parent_info = [{"run_id": p.info.run_id, "run_name": p.info.run_name or "",
                    "sweep_id": p.data.tags.get(R.SWEEP_ID, ""),
                    "reused": str(sum(k.startswith(R.REUSED_PREFIX) for k in p.data.tags)),
                    "grid": p.data.tags.get(R.GRID, "")} for p in parents]
    return RunTable(frame, experiment, uri, sweep_id, parent_info, notes)


def sweep_parent(experiment: str, uri: str, sweep_id: str | None = None):
    """The parent run of sweep `sweep_id` (None: of the newest sweep) in the experiment, or None."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    query = f"{TAGS}`{R.ROLE}` = '{R.ROLE_SWEEP}'" + (f" and {R.col(R.SWEEP_ID)} = '{sweep_id}'" if sweep_id else "")
    runs = client.search_runs([exp.experiment_id], query, max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None
