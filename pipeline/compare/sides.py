"""One side of a comparison (pipeline/compare): a sweep or an experiment loaded as a `Side`, its
cells grouped by identity (axes, length, seed; not the round, timing settings or switches), and
the raw calls behind a run's figure, read from its artifacts.

    side = load_side("20261207-050837-fc748b", uri); cells_of(side.frame, identity_keys(side.frame))
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pandas as pd

from pipeline import record as R
from pipeline.schema import SWITCH, TIMING, role
from pipeline.stability import Timing, usable_samples

ROUND_COL = R.col(R.ROUND, "param")


# ----------------------------------------------------------------------------- one side
@dataclass
class Side:
    """One sweep (or experiment) as the comparison reads it."""

    spec: str
    uri: str
    experiment: str
    sweep_id: str | None
    frame: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    def machines(self) -> list[str]:
        cols = [c for c in (R.col(R.DEVICE_NAME), R.col(R.HOST)) if c in self.frame]
        if not cols:
            return ["unknown machine"]
        f = self.frame[cols].fillna("?").astype(str)
        return sorted({" on ".join(r) for r in f.itertuples(index=False)})

    def devices(self) -> set[str]:
        col = R.col(R.DEVICE_NAME)
        return set(self.frame[col].dropna().astype(str)) if col in self.frame else set()

    def commits(self) -> list[str]:
        col = R.col(R.GIT_SHA)
        return sorted(set(self.frame[col].dropna().astype(str))) if col in self.frame else []


def load_side(spec: str, uri: str | None) -> Side:
    """An experiment named `spec`, else the sweep whose id is `spec` (in whichever experiment)."""
    from mlflow.tracking import MlflowClient

    from pipeline.report.load import load_runs, redact_uri, tracking_uri

    uri = tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(spec) is not None:
        t = load_runs(spec, None, uri)
    else:
        if "'" in spec:
            raise ValueError(f"{spec!r} contains a quote")
        exps = client.search_experiments()
        hits = client.search_runs([e.experiment_id for e in exps], f"{R.col(R.SWEEP_ID)} = '{spec}'",
                                  max_results=1) if exps else []
        if not hits:
            raise ValueError(f"{spec!r} is neither an experiment nor a sweep id in {redact_uri(uri)}")
        t = load_runs(client.get_experiment(hits[0].info.experiment_id).name, spec, uri)
    return Side(spec, redact_uri(uri), t.experiment, t.sweep_id, t.frame, list(t.notes))


def identity_keys(frame: pd.DataFrame, ignore: Sequence[str] = ()) -> list[str]:
    """The param columns that say what a cell measures: axes, the length and replicates other
    than the round (not timing settings, switches, or params the cell adds such as the machine's
    GEMM peak), less the ignored axes (a prefix ignores a group: `trainer`)."""
    keys = []
    for c in frame.columns:
        if not c.startswith(R.col("", "param")) or c == ROUND_COL:
            continue
        key = c[len(R.col("", "param")):]
        r = role(key)
        if r in (None, TIMING, SWITCH) or any(key == g or key.startswith(g + ".") for g in ignore):
            continue
        keys.append(c)
    return sorted(keys)


def norm(v) -> str:
    """A param value as matching compares it: 64, 64.0 and "64" alike; absent is ""."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return str(int(f)) if f.is_integer() else repr(f)


def cells_of(frame: pd.DataFrame, keys: Sequence[str]) -> dict[tuple, pd.DataFrame]:
    """Identity -> the cell's runs (its rounds, or one run)."""
    if frame.empty:
        return {}
    if not keys:
        return {(): frame}
    ident = pd.Series([tuple(norm(v) for v in row) for row in frame[list(keys)].itertuples(index=False)],
                      index=frame.index)
    return {k: g for k, g in frame.groupby(ident, sort=False)}


# ----------------------------------------------------------------------------- calls
def read_calls(run: dict, calls: tuple[str, str | None] | None, cache: dict) -> list[float] | None:
    """The raw calls behind a run's figure, found at `calls` (artifact file, key): the ones its
    median used (disturbed calls left out as the measurement left them out). None when the run
    has no such artifact."""
    if calls is None or not isinstance(run.get("artifact_uri"), str):
        return None
    name, key = calls
    where = (run["artifact_uri"], name)
    if where not in cache:
        cache[where] = _read_artifact(*where)
    payload = cache[where]
    if payload is None:
        return None
    part = payload.get(key) if key else payload
    if not isinstance(part, dict) or not part.get("ms"):
        return None
    used, _, _ = usable_samples(Timing(ms=list(part["ms"]), wait=list(part.get("wait") or [])))
    return used


def _read_artifact(artifact_uri: str, name: str):
    parts = urlsplit(artifact_uri)
    try:
        if parts.scheme in ("", "file"):
            return json.loads((Path(unquote(parts.path)) / name).read_text())
        import mlflow

        return json.loads(Path(mlflow.artifacts.download_artifacts(f"{artifact_uri}/{name}")).read_text())
    except Exception:  # noqa: BLE001 - an artifact missing or unreadable: no raw calls
        return None
