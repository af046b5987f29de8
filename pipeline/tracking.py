"""The one MLflow writer: store location, experiments, sweep (parent) and cell (child) runs,
resume look-ups and orphan clean-up. Everything goes through `MlflowClient` with explicit run
ids, so no global "active run" state leaks between cells.

    uri = tracking_uri(None)                       # MLFLOW_TRACKING_URI or sqlite:///<repo>/mlflow.db
    tr = Tracker(uri, "attnbench")
    run_id = tr.create_run("vanilla-n1024-kernel", tags, parent_run_id=None)
    tr.log(run_id, params=..., tags=..., metrics=..., series=...)
    tr.end_run(run_id, "ok")
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from pipeline import record as R
from pipeline.registry import REPO_ROOT
from pipeline.store_open import (
    OPEN_TRIES,
    create_store_whole,
    drop_interrupted_migration,
    first_open_lock,
    half_created,
    sqlite_path,
    wait_while_migrated_elsewhere,
)

T = TypeVar("T")

# the client would print "View run ... at http://..." for every run it ends on a server
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")



class TrackingError(RuntimeError):
    """The tracking store cannot be reached or written; one line saying which and why."""


def default_store_uri() -> str:
    return f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def tracking_uri(configured: str | None = None) -> str:
    """Config value, else MLFLOW_TRACKING_URI, else the project's SQLite store (absolute path,
    so every job of a sweep shares it whatever its working directory)."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_store_uri()


def artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside the database file; a server decides its own."""
    db = sqlite_path(uri)
    return (db.parent / "mlartifacts").resolve().as_uri() if db is not None else None


LOCK_TRIES = 8  # each waits out SQLite's busy timeout (MLflow sets 20 s) before the next


def _retry(fn: Callable[[], T], tries: int | None = None) -> T:
    """SQLite allows one writer at a time: concurrent jobs see 'database is locked' now and then.
    Retrying with back-off is what makes several jobs on one store lose nothing. A lock held
    beyond every try is an outage: the caller spools (pipeline/spool.py)."""
    delay = 0.1
    tries = LOCK_TRIES if tries is None else tries
    for attempt in range(tries):
        try:
            return fn()
        except Exception as e:
            msg = str(e).lower()
            transient = "locked" in msg or "busy" in msg or "unique constraint" in msg
            if not transient or attempt == tries - 1:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")


def check_server(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, in one line, when an http(s) tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
            if r.status != 200:
                raise TrackingError(f"tracking server {uri} answered HTTP {r.status} on /health")
    except TrackingError:
        raise
    except Exception as e:  # noqa: BLE001
        raise TrackingError(f"tracking server {uri} is not reachable: {e}") from None


@lru_cache(maxsize=1)
def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=5)
        sha = out.stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def host_tags() -> dict[str, str]:
    """Provenance the parent process knows without importing torch."""
    return {R.GIT_SHA: git_sha(), R.HOST: socket.gethostname(),
            R.XFORMERS_VERSION: package_version("xformers"), R.PID: str(os.getpid())}


def run_name(cfg: Mapping[str, Any]) -> str:
    """`{model}-n{seq_len}-{scenario}` plus `-ckpt` when checkpointing (DESIGN §6)."""
    return R.run_name(cfg["model"]["name"], cfg["seq_len"], cfg["scenario"]["name"],
                      bool((cfg.get("trainer") or {}).get("grad_checkpointing")), cfg.get("round"))


def counts_text(counts: Mapping[str, int]) -> str:
    """`30 ok, 2 oom`, or `none`."""
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none"


class Tracker:
    def __init__(self, uri: str, experiment: str):
        from mlflow.tracking import MlflowClient

        check_server(uri)
        self.uri, self.experiment = uri, experiment
        self.down = ""  # the outage a write met (one line); reachable() asks before the next run waits on it
        try:
            # MlflowClient opens the store (and on a new one creates the tables) when constructed
            with first_open_lock(uri):
                create_store_whole(uri)
                wait_while_migrated_elsewhere(uri)
                for attempt in range(OPEN_TRIES):
                    try:
                        self.client = MlflowClient(tracking_uri=uri)
                        self.experiment_id = _retry(self._ensure_experiment)
                        break
                    except Exception as e:  # noqa: BLE001
                        if not half_created(e) or attempt == OPEN_TRIES - 1:
                            raise
                        time.sleep(min(0.5 * 2 ** attempt, 8.0))
                        if attempt >= 2:  # the other client has had seconds to finish
                            drop_interrupted_migration(uri)
        except Exception as e:  # noqa: BLE001
            raise TrackingError(f"cannot open tracking store {uri}: {str(e).splitlines()[0]}") from None

    def _ensure_experiment(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            if R.EXPERIMENT_KIND not in exp.tags:  # made before the kind was set: the UI would ask
                self.client.set_experiment_tag(exp.experiment_id, R.EXPERIMENT_KIND, R.EXPERIMENT_KIND_TRAINING)
            return exp.experiment_id
        try:
            # a model-training experiment: MLflow's UI opens it on its runs, not the GenAI overview
            return self.client.create_experiment(self.experiment, artifact_location=artifact_root(self.uri),
                                                 tags={R.EXPERIMENT_KIND: R.EXPERIMENT_KIND_TRAINING})
        except Exception:  # another process created it first
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    # --- runs -----------------------------------------------------------------
    def create_run(self, name: str, tags: Mapping[str, str], parent_run_id: str | None = None,
                   start_time: int | None = None) -> str:
        tags = {k: str(v) for k, v in tags.items()}
        if parent_run_id:
            tags[R.PARENT_RUN] = parent_run_id
        run = _retry(lambda: self.client.create_run(self.experiment_id, start_time=start_time, tags=tags, run_name=name))
        return run.info.run_id

    def log(self, run_id: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None,
            metrics: Mapping[str, float] | None = None, series: Mapping[str, list[float]] | None = None,
            timestamp_ms: int | None = None) -> None:
        """`timestamp_ms`: every metric's timestamp (now if None); with a fixed one, the same
        metrics written twice are stored once."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        p = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in (params or {}).items()]
        t = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        m = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items() if v is not None]
        for k, values in (series or {}).items():
            m += [Metric(k, float(v), now, i) for i, v in enumerate(values)]
        # log_batch limits: 100 params, 100 tags, 1000 metrics, 1000 entities per call
        while p or t or m:
            bp, p = p[:100], p[100:]
            bt, t = t[:100], t[100:]
            bm, m = m[: 1000 - len(bp) - len(bt)], m[1000 - len(bp) - len(bt):]
            _retry(lambda bm=bm, bp=bp, bt=bt: self.client.log_batch(run_id, metrics=bm, params=bp, tags=bt))

    def log_json(self, run_id: str, payload: Any, name: str) -> None:
        _retry(lambda: self.client.log_dict(run_id, payload, name))

    def log_file(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        _retry(lambda: self.client.log_artifact(run_id, str(path), artifact_path))

    def end_run(self, run_id: str, status: str, end_time: int | None = None) -> None:
        _retry(lambda: self.client.set_terminated(run_id, R.RUN_STATUS.get(status, status), end_time=end_time))

    def reachable(self) -> bool:
        """After an outage (`down`, set by the writer that met it): is the store back? A server is
        asked for /health, quickly, instead of every cell waiting out the client's retries again.
        A SQLite store is simply tried again."""
        if self.down and self.uri.startswith(("http://", "https://")):
            try:
                check_server(self.uri, timeout_s=5.0)
            except TrackingError:
                return False
        self.down = ""
        return True

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        _retry(lambda: self.client.set_tag(run_id, key, value))

    def sweep_counts(self, sweep_id: str, parent_run_id: str, exclude=()) -> tuple[dict[str, int], int]:
        """A sweep's cells in the store by status (but the runs in `exclude`), and how many cells
        it reused from earlier runs."""
        counts: dict[str, int] = {}
        for r in self.search(f"tags.{R.SWEEP_ID} = '{sweep_id}'"):
            if r.info.run_id != parent_run_id and r.info.run_id not in exclude:
                s = r.data.tags.get(R.STATUS, "unknown")
                counts[s] = counts.get(s, 0) + 1
        tags = self.get_run(parent_run_id).data.tags
        return counts, sum(1 for k in tags if k.startswith(R.REUSED_PREFIX))

    def close_sweep(self, sweep_id: str, parent_run_id: str) -> tuple[dict[str, int], int]:
        """Record a finished sweep's counts on its run (tags cells and reused); returns them."""
        counts, reused = self.sweep_counts(sweep_id, parent_run_id)
        self.log(parent_run_id, tags={R.STATUS: "ok", R.CELLS: counts_text(counts), R.REUSED: str(reused)})
        return counts, reused

    # --- look-ups ---------------------------------------------------------------
    def get_run(self, run_id: str):
        return _retry(lambda: self.client.get_run(run_id))

    def search(self, filter_string: str, max_results: int = 1000) -> list:
        from mlflow.entities import ViewType

        return _retry(lambda: self.client.search_runs(
            [self.experiment_id], filter_string, run_view_type=ViewType.ACTIVE_ONLY,
            max_results=max_results, order_by=["attributes.start_time DESC"]))

    def find_reusable(self, cfg_hash: str):
        """The latest FINISHED run with this config_hash and status ok, or None."""
        runs = self.search(f"tags.{R.CONFIG_HASH} = '{cfg_hash}' and tags.{R.STATUS} = 'ok' "
                           f"and attributes.status = 'FINISHED'", max_results=1)
        return runs[0] if runs else None

    def find_family_oom(self, sweep_id: str, fam_hash: str, seq_len: int):
        """A run of the same cell line in this sweep that ran out of memory at a shorter length."""
        runs = self.search(f"tags.{R.SWEEP_ID} = '{sweep_id}' and tags.{R.FAMILY_HASH} = '{fam_hash}' "
                           f"and tags.{R.STATUS} = 'oom'")
        shorter = [r for r in runs if int(r.data.params.get(R.SEQ_LEN, 0)) < seq_len]
        return min(shorter, key=lambda r: int(r.data.params[R.SEQ_LEN])) if shorter else None

    def mark_orphans(self) -> list[str]:
        """Runs left RUNNING by a writer that no longer exists (a killed sweep, a dead SLURM task),
        recorded as status error (or timeout) and FAILED, so nothing stays RUNNING without a
        status: a run of this host by its process id, a run of any host by its SLURM job's end
        state or a heartbeat gone stale (pipeline/cluster.py, orphan_reasons)."""
        import psutil

        from pipeline.cluster import orphan_reasons

        host = socket.gethostname()
        marked, elsewhere = [], []
        for r in self.search("attributes.status = 'RUNNING'"):
            tags = r.data.tags
            if tags.get(R.HOST) != host or R.PID not in tags:
                elsewhere.append(r)
                continue
            if psutil.pid_exists(int(tags[R.PID])):
                continue
            self.log(r.info.run_id, tags={R.STATUS: "error",
                                          R.FAILURE_REASON: f"orphaned: process {tags[R.PID]} exited before recording a result"})
            self.end_run(r.info.run_id, "error")
            marked.append(r.info.run_id)
        for run_id, (status, reason) in orphan_reasons(elsewhere).items():
            self.log(run_id, tags={R.STATUS: status, R.FAILURE_REASON: reason})
            self.end_run(run_id, status)
            marked.append(run_id)
        return marked
