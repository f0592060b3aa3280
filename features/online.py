"""The LMDB online store: layout and materialization (the writer). The reader is C++ (csrc/featcache).

Layout, schema version 1, in the LMDB environment <home>/online/:

  named DB "meta" (plain byte keys)
    schema_version   b"1"
    generation       uint64 little-endian, +1 per committed materialization
    view:<name>      text record: "vivace-online-view/1\\nttl_us <int>\\nfeatures <F>\\n<f1>\\n...<fF>\\n"
    interval:<name>  b"<start_us> <end_us>": the last materialized window (incremental runs)
  named DB "v:<name>" (MDB_INTEGERKEY), one per feature view
    key    int64 join key, native byte order
    value  int64 event time (µs UTC) | null bitmap, ceil(F/8) bytes padded to 4 | F float32

Only numeric features (float, int, bool) go online, as float32; a null or NaN source value
sets its null bit and is stored as NaN. Only views with int64 join keys go online.

Atomicity: one materialization is one LMDB write transaction, so readers see either the
previous state or the new one, never a mix; a writer killed mid-way (even SIGKILL) leaves
the previous state. LMDB readers never block on the writer. When the map fills up the
transaction is retried with a map twice as large.
"""
from __future__ import annotations

import os
import struct
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

import lmdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .definitions import ONLINE_DTYPES, Entity, FeatureView
from .errors import OnlineStoreError
from .sources import SourceData, load_source

SCHEMA_VERSION = b"1"
VIEW_RECORD_FORMAT = "vivace-online-view/1"
META_DB = b"meta"
INITIAL_MAP_SIZE = 64 << 20
MAX_DBS = 4096
_UNBOUNDED = np.iinfo(np.int64).min

ProgressFn = Callable[[str, int], None]


def online_dir(home: str | Path) -> Path:
    return Path(home) / "online"


def online_features(view: FeatureView) -> list[str]:
    """The features of a view that the online store holds, in stored column order."""
    return [f.name for f in view.schema if f.dtype in ONLINE_DTYPES]


def row_layout(n_features: int) -> np.dtype:
    """The packed row: event time, null bitmap (padded to 4 bytes), float32 values."""
    bitmap = (n_features + 7) // 8
    bitmap_padded = (bitmap + 3) // 4 * 4
    return np.dtype({
        "names": ["event_us", "nulls", "values"],
        "formats": ["<i8", ("u1", (bitmap,)) if bitmap else ("u1", (0,)), ("<f4", (n_features,))],
        "offsets": [0, 8, 8 + bitmap_padded],
        "itemsize": 8 + bitmap_padded + 4 * n_features,
    })


def view_record(view: FeatureView) -> bytes:
    names = online_features(view)
    ttl_us = int(view.ttl.total_seconds() * 1_000_000)
    header = f"{VIEW_RECORD_FORMAT}\nttl_us {ttl_us}\nfeatures {len(names)}\n"
    return (header + "".join(f"{n}\n" for n in names)).encode()


def to_us(value: datetime | None) -> int | None:
    """µs since the epoch; naive datetimes are UTC."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return int(round(value.timestamp() * 1_000_000))


@dataclass
class ViewResult:
    view: str
    rows_written: int
    entities_in_window: int
    skipped: str = ""


def latest_rows(data: SourceData, lo_us: int, hi_us: int) -> np.ndarray:
    """Row numbers of each key's latest row (by event, then created time) with lo ≤ event ≤ hi."""
    in_window = np.flatnonzero((data.event_us >= lo_us) & (data.event_us <= hi_us))
    if in_window.size == 0:
        return in_window
    keys = data.keys[in_window]
    sort_keys = [data.event_us[in_window], keys]
    if data.created_us is not None:
        sort_keys.insert(0, data.created_us[in_window])
    order = np.lexsort(sort_keys)
    sorted_keys = keys[order]
    last_of_key = np.ones(order.size, dtype=bool)
    last_of_key[:-1] = sorted_keys[1:] != sorted_keys[:-1]
    return in_window[order[last_of_key]]


def pack_rows(data: SourceData, rows: np.ndarray, features: list[str]) -> np.ndarray:
    """The packed online rows (see row_layout) of the given source rows."""
    layout = row_layout(len(features))
    packed = np.zeros(rows.size, dtype=layout)
    packed["event_us"] = data.event_us[rows]
    taken = data.features.select(features).take(pa.array(rows))
    for j, name in enumerate(features):
        col = taken[name]
        values = pc.fill_null(col.cast(pa.float32()), np.nan).to_numpy().astype(np.float32, copy=False)
        null = np.isnan(values)
        packed["values"][:, j] = values
        packed["nulls"][:, j // 8] |= (null.astype(np.uint8) << (j % 8))
    return packed


_envs: dict[str, lmdb.Environment] = {}
_envs_lock = threading.Lock()


def environment(path: Path, map_size: int = INITIAL_MAP_SIZE) -> lmdb.Environment:
    """The process's one writable handle on the store at `path`, opened on first use.

    It is never closed: LMDB's locks are per process, and closing one of two handles on
    the same store (this one, the C++ reader's) would drop the other's lock as well.
    """
    with _envs_lock:
        env = _envs.get(str(path))
        if env is None:
            env = lmdb.open(str(path), map_size=map_size, max_dbs=MAX_DBS, subdir=True, lock=True)
            _envs[str(path)] = env
        return env


class OnlineWriter:
    """Materializes feature views into the LMDB online store of a Vivace home."""

    def __init__(self, home: str | Path, initial_map_size: int = INITIAL_MAP_SIZE):
        self.path = online_dir(home)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if not os.access(self.path, os.W_OK):
                raise PermissionError(f"no write permission on {self.path}")
            self.env = environment(self.path, initial_map_size)
        except (OSError, lmdb.Error) as exc:
            raise OnlineStoreError(f"online store path {self.path} is not writable: {exc}") from None
        self._dbs: dict[bytes, lmdb._Database] = {}

    def materialize(self, views: Iterable[tuple[FeatureView, Entity]], start: datetime | None = None,
                    end: datetime | None = None, incremental: bool = False, rebuild: bool = False,
                    progress: ProgressFn | None = None) -> list[ViewResult]:
        """Write each view's latest in-TTL row per entity within [start, end] in one transaction.

        end defaults to now; start defaults to end − ttl (or everything when ttl is 0), and
        with `incremental` to the end of the view's last materialized window. Stored rows
        are replaced only by rows at least as recent. `rebuild` wipes the store first (the
        way out of an older schema version).
        """
        plan = [(v, e) for v, e in views]
        end_us = to_us(end) if end is not None else int(time.time() * 1_000_000)
        start_us = to_us(start)
        # Sources are read before the write transaction so the lock is held only to write.
        loaded = [(v, e, load_source(v, e) if e.dtype == "int64" and online_features(v) else None) for v, e in plan]
        # Free the reader slots of dead processes (a killed server), whose old snapshots
        # would otherwise keep LMDB from reusing pages and make the file grow.
        self.env.reader_check()
        self._open_dbs([f"v:{v.name}".encode() for v, _, data in loaded if data is not None], rebuild)
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    return self._write(txn, loaded, start_us, end_us, incremental, rebuild, progress)
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)

    def _open_dbs(self, view_dbs: list[bytes], rebuild: bool) -> None:
        """Open every DB handle first, in a transaction of its own, so that handles stay
        valid when the materialization transaction is retried after a map resize.

        A store of another schema version is refused here, before anything is created in it.
        """
        with self.env.begin(write=True) as txn:
            self._dbs[META_DB] = self.env.open_db(META_DB, txn=txn)
            version = txn.get(b"schema_version", db=self._dbs[META_DB])
            if not rebuild and version is not None and version != SCHEMA_VERSION:
                raise OnlineStoreError(
                    f"online store {self.path} has schema version {version.decode(errors='replace')}, this "
                    f"Vivace writes version {SCHEMA_VERSION.decode()}: run `vivace features materialize --rebuild`")
            if version is None:
                # Stamp a new store now: a writer killed before its first materialization
                # commits then leaves an empty version-1 store, not one of unknown version.
                txn.put(b"schema_version", SCHEMA_VERSION, db=self._dbs[META_DB])
            for name in view_dbs:
                self._dbs[name] = self.env.open_db(name, txn=txn, integerkey=True)
            for name, _ in txn.cursor():
                if name not in self._dbs:
                    for integerkey in (False, True):
                        try:
                            self._dbs[name] = self.env.open_db(name, txn=txn, create=False, integerkey=integerkey)
                            break
                        except lmdb.Error:  # another flag set, or a plain key of the main DB
                            continue

    def _write(self, txn: lmdb.Transaction, loaded: list[tuple[FeatureView, Entity, SourceData | None]],
               start_us: int | None, end_us: int, incremental: bool, rebuild: bool,
               progress: ProgressFn | None) -> list[ViewResult]:
        if rebuild:
            self._wipe(txn)
        meta = self._dbs[META_DB]
        txn.put(b"schema_version", SCHEMA_VERSION, db=meta)  # checked by _open_dbs (or wiped)
        results = []
        for view, entity, data in loaded:
            if data is None:
                why = "string join keys" if entity.dtype != "int64" else "no numeric features"
                results.append(ViewResult(view.name, 0, 0, skipped=f"not materialized online: {why}"))
                continue
            results.append(self._write_view(txn, meta, view, data, start_us, end_us, incremental, progress))
        gen = txn.get(b"generation", db=meta)
        next_gen = (struct.unpack("<Q", gen)[0] if gen else 0) + 1
        txn.put(b"generation", struct.pack("<Q", next_gen), db=meta)
        return results

    def _wipe(self, txn: lmdb.Transaction) -> None:
        for name in [k for k, _ in txn.cursor()]:
            if name in self._dbs:
                txn.drop(self._dbs[name], delete=False)
            else:
                txn.delete(name)

    def _write_view(self, txn: lmdb.Transaction, meta: lmdb._Database, view: FeatureView, data: SourceData,
                    start_us: int | None, end_us: int, incremental: bool,
                    progress: ProgressFn | None) -> ViewResult:
        features = online_features(view)
        db = self._dbs[f"v:{view.name}".encode()]
        record = view_record(view)
        old_record = txn.get(f"view:{view.name}".encode(), db=meta)
        if old_record is not None and old_record.split(b"\n")[2:] != record.split(b"\n")[2:]:
            txn.drop(db, delete=False)  # the feature list changed: old rows have another layout
            old_record = None
        lo = _UNBOUNDED if start_us is None else start_us
        if incremental and start_us is None and old_record is not None:
            interval = txn.get(f"interval:{view.name}".encode(), db=meta)
            if interval:
                lo = int(interval.split()[1])
        ttl_us = int(view.ttl.total_seconds() * 1_000_000)
        if ttl_us > 0:
            lo = max(lo, end_us - ttl_us)
        rows = latest_rows(data, lo, end_us)
        packed = pack_rows(data, rows, features)
        keys = data.keys[rows].astype("=i8").tobytes()
        raw, size = packed.tobytes(), packed.dtype.itemsize
        written = 0
        for i in range(rows.size):
            key, row = keys[8 * i:8 * i + 8], raw[i * size:(i + 1) * size]
            if old_record is not None:
                existing = txn.get(key, db=db)
                if existing is not None and _event_us(existing) > _event_us(row):
                    continue
            txn.put(key, row, db=db)
            written += 1
            if progress is not None and written % 10_000 == 0:
                progress(view.name, written)
        txn.put(f"view:{view.name}".encode(), record, db=meta)
        txn.put(f"interval:{view.name}".encode(), f"{lo} {end_us}".encode(), db=meta)
        if progress is not None:
            progress(view.name, written)
        return ViewResult(view.name, written, int(rows.size))


def _event_us(row: bytes) -> int:
    return struct.unpack_from("<q", row)[0]


def read_generation(home: str | Path) -> int:
    """The generation of the online store (0 when nothing was materialized yet)."""
    path = online_dir(home)
    if not (path / "data.mdb").exists():
        return 0
    env = environment(path, INITIAL_MAP_SIZE)
    with env.begin() as txn:
        try:
            meta = env.open_db(META_DB, txn=txn, create=False)
        except lmdb.NotFoundError:  # a first materialization killed before it created the meta DB
            return 0
        gen = txn.get(b"generation", db=meta)
        return struct.unpack("<Q", gen)[0] if gen else 0
