"""The Vivace home: SQLite metadata plus content-addressed artifact files.

Layout of a home directory (``--home DIR`` / ``$VIVACE_HOME``, default ``./.vivace``):

    vivace.db                      SQLite (WAL): datasets, runs, models, aliases, audit
    objects/ab/abcdef...           content-addressed files, named by their SHA-256
    packages/<sha of package.json> content-addressed model package directories
    tmp/                           staging area; anything here is garbage after a crash

Crash safety rests on two rules. Files become visible only by ``rename`` after their
bytes were fsynced, so a SIGKILL leaves at most garbage in tmp/ or an unreferenced
object. Metadata rows that point at those files are written in one SQLite transaction
after the files are in place, so a version is either wholly there or absent.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO
from collections.abc import Iterator

DB_NAME = "vivace.db"
BUSY_TIMEOUT_MS = 30_000
_CHUNK = 1 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    content_hash TEXT NOT NULL,
    files TEXT NOT NULL,            -- JSON {relative path: sha256}
    source TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    row_count INTEGER NOT NULL,
    schema TEXT,                    -- JSON schema declared at ingestion, or null
    stats TEXT NOT NULL,            -- JSON summary statistics per column
    parent INTEGER,
    created_at REAL NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE INDEX IF NOT EXISTS datasets_by_hash ON datasets (name, content_hash);

CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    status TEXT NOT NULL,           -- running | finished | failed
    config TEXT NOT NULL,           -- JSON of the training config
    params TEXT NOT NULL,
    metrics TEXT NOT NULL,          -- JSON final metrics
    epochs TEXT NOT NULL,           -- JSON list of per-epoch metrics
    behavioural TEXT NOT NULL,      -- JSON list of behavioural test results
    environment TEXT NOT NULL,
    datasets TEXT NOT NULL,         -- JSON list of "name@vN" inputs
    feature_views TEXT NOT NULL DEFAULT '[]',
    package_sha TEXT,
    weights_hash TEXT,
    error TEXT,
    started_at REAL NOT NULL,
    ended_at REAL,
    duration_s REAL
);

CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    description TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS model_versions (
    name TEXT NOT NULL REFERENCES models(name),
    version INTEGER NOT NULL,
    package_sha TEXT NOT NULL,
    run_id TEXT,
    description TEXT NOT NULL DEFAULT '',
    tags TEXT NOT NULL DEFAULT '{}',
    metrics TEXT NOT NULL DEFAULT '{}',
    behavioural TEXT NOT NULL DEFAULT '[]',
    lineage TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    PRIMARY KEY (name, version)
);

CREATE TABLE IF NOT EXISTS aliases (
    name TEXT NOT NULL,
    alias TEXT NOT NULL,
    version INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (name, alias),
    FOREIGN KEY (name, version) REFERENCES model_versions(name, version)
);

CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    user TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    details TEXT NOT NULL DEFAULT '{}'
);
-- Versions are immutable: their content and results cannot be edited in place.
CREATE TRIGGER IF NOT EXISTS datasets_immutable BEFORE UPDATE ON datasets
BEGIN SELECT RAISE(ABORT, 'dataset versions are immutable'); END;
CREATE TRIGGER IF NOT EXISTS model_versions_immutable
BEFORE UPDATE OF name, version, package_sha, run_id, metrics, behavioural, lineage ON model_versions
BEGIN SELECT RAISE(ABORT, 'model versions are immutable'); END;
-- The audit log is append-only: the database itself refuses edits and deletions.
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


class RegistryError(ValueError):
    """A user-facing registry error: unknown name, invalid input, corrupted artifact."""


class NotFoundError(RegistryError, LookupError):
    """An unknown dataset, model, version, alias or run."""


class IntegrityError(RegistryError):
    """Stored bytes no longer match their recorded SHA-256."""


def sha256_stream(stream: BinaryIO, sink: BinaryIO | None = None) -> tuple[str, int]:
    """Hash a stream (copying it to `sink` on the way); returns (hex digest, size)."""
    h = hashlib.sha256()
    size = 0
    while block := stream.read(_CHUNK):
        h.update(block)
        size += len(block)
        if sink is not None:
            sink.write(block)
    return h.hexdigest(), size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def default_home() -> str:
    return os.environ.get("VIVACE_HOME", "./.vivace")


class Home:
    """A Vivace home directory: open it, then use `transaction()` and the object store."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path if path is not None else default_home()).absolute()
        self.objects = self.path / "objects"
        self.packages = self.path / "packages"
        self.tmp = self.path / "tmp"
        for folder in (self.objects, self.packages, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are opened explicitly with BEGIN IMMEDIATE so
        # that two writers serialize on the write lock instead of failing on upgrade.
        # check_same_thread=False: a server may resolve (read) from worker threads; the
        # sqlite library serializes calls on a connection. Writers use one Home per thread.
        self.db = sqlite3.connect(
            self.path / DB_NAME, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
            check_same_thread=False,
        )
        self.db.row_factory = sqlite3.Row
        self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._enable_wal()
        # WAL + NORMAL: a killed process loses nothing committed; a power cut may lose the
        # last commits but never corrupts the database.
        self.db.execute("PRAGMA synchronous = NORMAL")
        self.db.execute("PRAGMA foreign_keys = ON")
        if not self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'audit'").fetchone():
            self.db.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")

    def _enable_wal(self) -> None:
        # Switching to WAL needs a moment alone with the file, and sqlite reports a busy
        # database at once instead of waiting; only the first opens of a new home race here.
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                if self.db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    self.db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Home:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE): all of it commits, or none of it."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ---- audit -------------------------------------------------------------------------

    def audit(self, action: str, target: str, reason: str = "", details: dict[str, Any] | None = None) -> None:
        """Append one audit record; call inside the transaction of the mutation it records."""
        self.db.execute(
            "INSERT INTO audit (time, user, action, target, reason, details) VALUES (?, ?, ?, ?, ?, ?)",
            (time.time(), _current_user(), action, target, reason, json.dumps(details or {}, sort_keys=True)),
        )

    def audit_log(self, target: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Audit records, oldest first; `target` keeps one model's or dataset's records."""
        sql, params = "SELECT * FROM audit", []
        if target:
            sql += " WHERE target = ? OR target LIKE ? OR target LIKE ?"
            params += [target, f"{target}/%", f"{target}@%"]
        sql += " ORDER BY id"
        rows = [dict(r) for r in self.db.execute(sql, params)]
        for row in rows:
            row["details"] = json.loads(row["details"])
        return rows[-limit:] if limit else rows

    # ---- content-addressed objects -----------------------------------------------------

    def object_path(self, digest: str) -> Path:
        return self.objects / digest[:2] / digest

    def put_file(self, source: str | os.PathLike) -> tuple[str, int]:
        """Copy a file into the object store; returns (sha256, size). Same bytes, one copy."""
        staged, digest, size = self.stage_file(source)
        self.commit_object(staged, digest)
        return digest, size

    def stage_file(self, source: str | os.PathLike) -> tuple[Path, str, int]:
        """Copy a file under tmp/ (fsynced), hashing it on the way: (staged path, sha256, size).

        Staging lets a caller validate exactly the bytes it will store before any of them
        become visible; `commit_object` then publishes them.
        """
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp, prefix="obj.")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as sink, open(source, "rb") as src:
                digest, size = sha256_stream(src, sink)
                sink.flush()
                os.fsync(sink.fileno())
            return tmp, digest, size
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def commit_object(self, staged: Path, digest: str) -> Path:
        """Publish a staged file as object `digest` by rename (atomic); dedups equal content."""
        final = self.object_path(digest)
        if final.exists():
            staged.unlink(missing_ok=True)
            return final
        final.parent.mkdir(exist_ok=True)
        os.chmod(staged, 0o444)  # artifacts are immutable
        os.rename(staged, final)
        _fsync_dir(final.parent)
        return final

    def verify_object(self, digest: str) -> Path:
        """The path of an object after checking its bytes; IntegrityError when they changed."""
        path = self.object_path(digest)
        if not path.is_file():
            raise IntegrityError(f"artifact {digest[:12]}… is missing from {self.objects}")
        with open(path, "rb") as f:
            actual, _ = sha256_stream(f)
        if actual != digest:
            raise IntegrityError(
                f"artifact {path} is corrupted (sha256 {actual[:12]}…, expected {digest[:12]}…)"
            )
        return path

    def staging_dir(self, prefix: str) -> Path:
        """A fresh directory under tmp/ for building something before it is renamed in."""
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.tmp))

    def collect_garbage(self, older_than_s: float = 3600.0) -> int:
        """Remove staging leftovers of crashed processes; returns how many were removed.

        Writers call it with the default age, old enough that no live writer still
        stages there.
        """
        removed = 0
        cutoff = time.time() - older_than_s
        for entry in self.tmp.iterdir():
            try:
                mtime = entry.stat().st_mtime
            except FileNotFoundError:  # another writer renamed its staging entry into place
                continue
            if mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
                removed += 1
        return removed


def _current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no LOGNAME/USER in a container
        return f"uid:{os.getuid()}"


def open_home(home: str | os.PathLike | Home | None = None) -> Home:
    """A Home from a path, an existing Home, or the default location."""
    return home if isinstance(home, Home) else Home(home)
