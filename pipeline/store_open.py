"""Opening a SQLite tracking store safely when several processes open it at once: a new store
is created whole (tables made in a private file, then linked into place), an open waits while
another client migrates it, one process at a time opens it (a flock beside the file), and an
open that meets a half-created store is tried again (`Tracker.__init__` in pipeline/tracking.py).
MLflow 3.17 creates and migrates a SQLite store's tables on a process's first access; several
processes doing that at once leave it unusable without this.
"""
from __future__ import annotations

import contextlib
import os
import time
from functools import lru_cache
from pathlib import Path


def sqlite_path(uri: str) -> Path | None:
    """The database file of a SQLite store's URI; None for any other store."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


OPEN_TRIES = 7  # about 30 s of waits


def half_created(e: Exception) -> bool:
    """A process that does not take first_open_lock (a plain MLflow client, `mlflow ui`) is creating
    or migrating the same new store's tables at this moment: MLflow fails this open with `table
    ... already exists`, a missing table or column (a migration not yet applied) or a half-applied
    migration. Once the other process is done the store is usable, so the open is tried again."""
    msg = str(e).lower()
    return any(s in msg for s in ("already exists", "no such table", "no such column", "alembic",
                                  "migration", "locked"))


def drop_interrupted_migration(uri: str) -> None:
    """A migration another client left half done keeps its `_alembic_tmp_*` copy, and every later
    open fails on it. On a store with no runs yet nothing is lost by dropping that copy: the next
    open applies the migration again."""
    path = sqlite_path(uri)
    if path is None:
        return
    import sqlite3

    with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "runs" in names and db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]:
            return
        for name in sorted(n for n in names if n.startswith("_alembic_tmp_")):
            db.execute(f'DROP TABLE "{name}"')
        db.commit()


def create_store_whole(uri: str) -> None:
    """A new SQLite store appears at its path complete or not at all: its tables are created and
    migrated in a private file, which is then hard-linked into place (atomic; refused if the path
    exists). A plain MLflow client (no first-open lock) opening the path meanwhile either created
    it first, and migrates it alone, or finds the finished store and only checks its schema."""
    db = sqlite_path(uri)
    if db is None or db.exists():
        return
    from mlflow.tracking._tracking_service.utils import _get_sqlalchemy_store

    db.parent.mkdir(parents=True, exist_ok=True)
    private = db.with_name(f".{db.name}.new-{os.getpid()}")
    private.unlink(missing_ok=True)
    try:
        # the store class and artifact root a plain client would pick for this path
        store = _get_sqlalchemy_store(f"sqlite:///{private}", None)
        type(store)._engine_map.pop(store.db_uri, None)
        store.engine.dispose()
        try:
            os.link(private, db)
        except FileExistsError:  # another client created the path meanwhile: it migrates it
            pass
        except OSError:  # a file system without hard links: the open below creates it in place
            pass
    finally:
        private.unlink(missing_ok=True)


@lru_cache(maxsize=1)
def schema_head() -> str:
    """MLflow's newest schema revision: fixed for the installed MLflow, so read once a process."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def wait_while_migrated_elsewhere(uri: str, quiet_s: float = 10.0, limit_s: float = 90.0) -> None:
    """A store another client created moments ago may still be migrating: opening it now would
    run the same migration a second time, concurrently, and break the store. Wait until its
    schema is at MLflow's head, or until the file has not changed for quiet_s (nobody is working
    on it: an older store, which the open then upgrades), or limit_s."""
    import sqlite3
    from urllib.parse import quote

    db = sqlite_path(uri)
    if db is None or not db.exists() or time.time() - db.stat().st_mtime > quiet_s:
        return
    head, start = schema_head(), time.monotonic()
    while time.monotonic() - start < limit_s:
        try:
            with contextlib.closing(sqlite3.connect(f"file:{quote(str(db))}?mode=ro", uri=True, timeout=1)) as c:
                names = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                done = "alembic_version" in names and not any(n.startswith("_alembic_tmp_") for n in names) \
                    and c.execute("SELECT version_num FROM alembic_version").fetchone() == (head,)
        except sqlite3.Error:  # locked by the migration, or a table not there yet
            done = False
        if done or time.time() - db.stat().st_mtime > quiet_s:
            return
        time.sleep(0.25)


@contextlib.contextmanager
def first_open_lock(uri: str):
    """MLflow creates and migrates a SQLite store's tables on a process's first access; several
    processes doing that at once on a new store leave it unusable (half-applied migrations,
    `_alembic_tmp_*` tables: MLflow 3.17). An exclusive flock on a file beside the database lets
    one process at a time open it; later opens only check the schema and pass quickly."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    import fcntl

    lock = db.with_name(db.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
