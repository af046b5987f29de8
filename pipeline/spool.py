"""Results the tracking store could not take, kept on disk until it can (`make replay`).

A cell's record (params, tags, metrics, series, artifacts, status) goes to the store as the cell
runs. When the store cannot be reached after the client's own retries (a server down, a network
partition, a SQLite file locked beyond its timeout or a full disk), the rest of the cell's writes
are kept in memory and the whole record is written to the sweep's spool, `<sweep dir>/spool/`,
one JSON file per cell, atomically. With `tracking=offline` every record goes there from the start.
`pipeline/replay.py` writes spooled records into the store, each exactly once.

    rec = Recorder(tr, RunRecord(kind=CELL, ...), spool_dir)   # tr None: offline
    rec.create(); rec.log(params=...); rec.end("ok")
    path = rec.finish()                                       # the spool file, or None if all landed

A record written twice lands once: its metrics carry one fixed timestamp (the store keeps a
metric's identical (key, value, step, timestamp) once), params are written with the same values,
tags and artifacts are overwritten, and a run is created at most once (replay writes the new run's
id back into the file before it logs anything).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pipeline.registry import cache_dir

SPOOL = "spool"  # the folder under a sweep's (or a single cell's) output folder
CELL, SWEEP, REUSE = "cell", "sweep", "reuse"  # a cell's run, a sweep's parent run, a reuse of a spooled cell
EXIT_WAITING = 3  # a sweep's exit status while cells of it wait in a spool

# what a tracking failure says when the store itself is away, not when the request is wrong
_OUTAGE_WORDS = ("max retries exceeded", "connection", "timed out", "timeout", "temporarily unavailable",
                 "failed with exception", "database is locked", "database or disk is full", "disk i/o error",
                 "unable to open database", "readonly database", "no space left", "bad gateway",
                 "service unavailable", "gateway time", "error code 5", "not reachable", "cannot open tracking store",
                 "operationalerror")
_OUTAGE_CODES = ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")


def is_outage(e: BaseException) -> bool:
    """True when a tracking call failed because the store could not be reached or written (after
    the client's retries), as opposed to a request the store refused (a changed param, a bad
    name): those are errors of the record and stay errors."""
    if isinstance(e, (OSError, TimeoutError)):  # ConnectionError, requests' errors, sqlite3's I/O
        return True
    code = str(getattr(e, "error_code", "") or "")
    text = str(e).lower()
    if type(e).__name__ in ("OperationalError", "TrackingError"):
        return True
    return code in _OUTAGE_CODES or any(w in text for w in _OUTAGE_WORDS)


def outage_line(e: BaseException) -> str:
    """The error in one line: the line of its message that says what is away, else its first."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [""]
    text = next((line for line in lines if any(w in line.lower() for w in _OUTAGE_WORDS)), lines[0])
    return f"{type(e).__name__}: {text}"[:300]


def attempt(tr, call: Callable[[], Any]) -> tuple[bool, Any]:
    """(True, call()) while the store answers; (False, None) on an outage, which is noted on the
    tracker (`tr.down`, so the next runs probe before they wait on it again). Any other failure
    of the call is raised: the store refused the request."""
    try:
        return True, call()
    except Exception as e:
        if not is_outage(e):
            raise
        tr.down = outage_line(e)
        return False, None


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class RunRecord:
    """Everything one run writes, in the order a store takes it."""

    kind: str  # CELL, SWEEP or REUSE
    uri: str | None  # the store it was meant for (replay's default target)
    experiment: str
    sweep_id: str | None
    name: str
    run_id: str | None = None  # the run in the store, once there is one
    parent_run_id: str | None = None  # a cell's sweep run, when the sweep's run is in the store
    config_hash: str | None = None
    family_hash: str | None = None
    seq_len: int | None = None
    create_tags: dict[str, str] = field(default_factory=dict)  # set when the run is created
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    series: dict[str, list[float]] = field(default_factory=dict)
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"text": ...} or {"json": ...}
    status: str | None = None  # the run's end status; None while a sweep's run is open
    start_ms: int = field(default_factory=now_ms)
    end_ms: int | None = None
    timestamp_ms: int = field(default_factory=now_ms)  # every metric's timestamp: writing twice lands once
    why: str = ""  # the failure that sent it here
    report: bool = False  # a sweep's run: build the sweep's report once its cells are in the store

    def file_name(self) -> str:
        return f"{self.kind}-{self.sweep_id or 'none'}-{self.config_hash or 'sweep'}.json"

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> RunRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in payload.items() if k in known})


def write(spool_dir: str | Path, rec: RunRecord) -> Path:
    """The record as `<spool_dir>/<kind>-<sweep>-<config_hash>.json`, whole or not at all (a
    private file renamed into place), and the folder listed for a later replay."""
    d = Path(spool_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / rec.file_name()
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(rec), f, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    remember(d)
    return path


def read(path: str | Path) -> RunRecord:
    return RunRecord.from_json(json.loads(Path(path).read_text()))


def pending(spool_dir: str | Path, kind: str | None = None, sweep_id: str | None = None) -> list[Path]:
    """The spool's record files (oldest first), of one kind and sweep if given."""
    d = Path(spool_dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.glob("*.json"):
        k, _, rest = p.name.partition("-")
        if (kind is None or k == kind) and (sweep_id is None or rest.startswith(f"{sweep_id}-")):
            out.append(p)
    return sorted(out, key=lambda p: (p.stat().st_mtime, p.name))


def records(spool_dir: str | Path, kind: str | None = None, sweep_id: str | None = None) -> Iterator[RunRecord]:
    for p in pending(spool_dir, kind, sweep_id):
        with contextlib.suppress(OSError, ValueError):  # gone meanwhile (replayed), or being written
            yield read(p)


# ---------------------------------------------------------------- the list of spools to replay
def _index() -> Path:
    return cache_dir() / "spools.txt"


def remember(spool_dir: Path) -> None:
    """List a spool folder in the user's cache, so that `make replay` and the next sweep find it."""
    idx = _index()
    idx.parent.mkdir(parents=True, exist_ok=True)
    line = str(Path(spool_dir).resolve())
    with open(idx, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        if line not in f.read().splitlines():
            f.write(line + "\n")


def known_spools(prune: bool = False) -> list[Path]:
    """Spool folders listed by earlier sweeps that still hold records; with `prune` (a replay),
    emptied ones also leave the list."""
    idx = _index()
    if not idx.exists():
        return []
    with open(idx, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX if prune else fcntl.LOCK_SH)
        dirs = [Path(line) for line in dict.fromkeys(f.read().splitlines()) if line.strip()]
        keep = [d for d in dirs if pending(d)]
        if prune:
            f.seek(0)
            f.truncate()
            f.writelines(f"{d}\n" for d in keep)
    return keep


@contextlib.contextmanager
def locked(spool_dir: str | Path):
    """One replay of a spool folder at a time (two sweeps starting together, make replay)."""
    d = Path(spool_dir)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------- look-ups while the store is away
def find_ok(spool_dirs: list[Path], config_hash: str) -> RunRecord | None:
    """A spooled cell with this config_hash that finished ok (a reuse while the store is away)."""
    for d in spool_dirs:  # the file name carries the hash: only this cell's records are read
        for p in sorted(Path(d).glob(f"{CELL}-*-{config_hash}.json")):
            with contextlib.suppress(OSError, ValueError):
                rec = read(p)
                if rec.status == "ok":
                    return rec
    return None


def find_family_oom(spool_dir: Path, sweep_id: str, family_hash: str, seq_len: int) -> RunRecord | None:
    """A spooled cell of the same line in this sweep that ran out of memory at a shorter length."""
    shorter = [r for r in records(spool_dir, CELL, sweep_id)
               if r.family_hash == family_hash and r.status == "oom" and (r.seq_len or 0) < seq_len]
    return min(shorter, key=lambda r: r.seq_len or 0) if shorter else None


# ---------------------------------------------------------------- one run's writes: store or spool
class Recorder:
    """One run's writes. Each goes to the store while it answers; from the first outage on, the
    store is left alone for the rest of the run (its retries already took their time) and
    `finish` spools the whole record. `tr` None: offline from the start."""

    def __init__(self, tr, rec: RunRecord, spool_dir: str | Path, why_offline: str = ""):
        self.tr, self.rec, self.spool_dir = tr, rec, Path(spool_dir)
        self.offline = tr is None
        if self.offline:
            rec.why = why_offline or "tracking=offline"

    def ask(self, call: Callable[[], Any], default: Any = None) -> Any:
        """call() in the store (a write, or a look-up such as a sibling's status); `default`
        once the store is away for this run."""
        if self.offline:
            return default
        ok, value = attempt(self.tr, call)
        if not ok:
            self.offline, self.rec.why = True, self.tr.down
        return value if ok else default

    def create(self, parent_run_id: str | None = None) -> str | None:
        self.rec.parent_run_id = parent_run_id
        self.rec.run_id = self.ask(lambda: self.tr.create_run(self.rec.name, self.rec.create_tags, parent_run_id,
                                                              start_time=self.rec.start_ms))
        return self.rec.run_id

    def log(self, params=None, tags=None, metrics=None, series=None) -> None:
        r = self.rec
        r.params.update(params or {})
        r.tags.update({k: str(v) for k, v in (tags or {}).items()})
        r.metrics.update({k: float(v) for k, v in (metrics or {}).items() if v is not None})
        r.series.update({k: [float(x) for x in v] for k, v in (series or {}).items()})
        self.ask(lambda: self.tr.log(r.run_id, params=params, tags=tags, metrics=metrics, series=series,
                                      timestamp_ms=r.timestamp_ms))

    def artifact(self, name: str, payload: Any) -> None:
        """A text file (str) or a JSON document (anything else) named `name` among the run's artifacts."""
        self.rec.artifacts[name] = {"text": payload} if isinstance(payload, str) else {"json": payload}
        self.ask(lambda: log_artifact(self.tr, self.rec.run_id, name, payload))

    def end(self, status: str) -> None:
        self.rec.status, self.rec.end_ms = status, now_ms()
        self.ask(lambda: self.tr.end_run(self.rec.run_id, status, end_time=self.rec.end_ms))

    def finish(self) -> Path | None:
        """Spool the whole record if any write missed the store; the file, or None."""
        return write(self.spool_dir, self.rec) if self.offline else None


def log_artifact(tr, run_id: str, name: str, payload: Any) -> None:
    if isinstance(payload, str):
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / name
            p.write_text(payload)
            tr.log_file(run_id, p)
    else:
        tr.log_json(run_id, payload, name)
