"""Persisted as-of indexes: a view's sorted feature rows kept as an Arrow IPC file beside the registry.

Sorting a view's source is most of the cost of a point-in-time join, so the sorted rows
(`historical.ViewIndex`) are written once — at `features apply`, or by the first join that
finds none — to `<home>/features/pit_index/<view>.arrow`, uncompressed, and later
processes memory-map it instead of reading and sorting the parquet again.

An index is used only while it still describes its source: its metadata records a
fingerprint of the view's definition and the source's `source_stamp` (size, mtime, hash of
the parquet footer). Any difference, or an unreadable index file, and it is rebuilt from
the source, which is validated again.
A home that cannot be written to only loses the persistence, never the join.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path

import pandas as pd
import pyarrow as pa

from .definitions import Entity, FeatureView
from .historical import ViewIndex, build_index
from .sources import ARROW_TYPES, read_source, source_stamp

INDEX_FORMAT = "vivace-pit-index/1"
_META_KEY = b"vivace.pit_index"
# Column names no feature can have (feature names match [A-Za-z_][A-Za-z0-9_]*).
_COMPOSITE = "#composite"
_UNIQUES = "#uniques"   # distinct keys of non-dense keys, padded with nulls to the row count

_cache: dict[str, tuple[str, ViewIndex]] = {}
_cache_lock = threading.Lock()


def clear_index_cache() -> None:
    """Forget the indexes kept in this process (the next join opens or rebuilds the files)."""
    with _cache_lock:
        _cache.clear()


def index_path(directory: Path, view: FeatureView) -> Path:
    return directory / f"{view.name}.arrow"


def definition_fingerprint(view: FeatureView, entity: Entity) -> str:
    """What the index content depends on, besides the source file's bytes (not the TTL)."""
    parts = [INDEX_FORMAT, os.path.abspath(view.source), entity.join_key, entity.dtype, view.timestamp_field,
             view.created_timestamp_field, [(f.name, f.dtype) for f in view.schema]]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def load_view_index(view: FeatureView, entity: Entity, directory: Path | None) -> ViewIndex:
    """The as-of index of a view: from this process's cache, the index file, or built from the source.

    A built index is written to `directory` (when given and writable) for later processes.
    Raises SourceValidationError when the source has to be read and no longer matches the view.
    """
    fingerprint = definition_fingerprint(view, entity)
    try:
        stamp = source_stamp(view.source)
    except OSError:
        stamp = ""  # missing or unreadable: read_source below names the problem
    with _cache_lock:
        hit = _cache.get(fingerprint)
    if stamp and hit is not None and hit[0] == stamp:
        return hit[1]
    index = None
    if stamp and directory is not None:
        index = read_index(index_path(directory, view), view, entity, fingerprint, stamp)
    if index is None:
        # Stamped before reading: a source rewritten meanwhile leaves an index that is stale.
        index = build_index(read_source(view, entity))
        if directory is not None and stamp and write_index(index, index_path(directory, view), fingerprint, stamp):
            # The memory-mapped copy lives in the page cache, shared with other processes.
            index = read_index(index_path(directory, view), view, entity, fingerprint, stamp) or index
    with _cache_lock:
        _cache[fingerprint] = (stamp, index)
    return index


def write_index(index: ViewIndex, path: Path, fingerprint: str, stamp: str) -> bool:
    """Write an index file atomically (temporary file, rename); False if the directory is not writable."""
    meta = {"format": INDEX_FORMAT, "definition": fingerprint, "source": stamp, "key_base": index.key_base,
            "n_codes": index.n_codes, "t_min": index.t_min, "span": index.span,
            "uniques": index.uniques is not None}
    n = len(index.sorted_composite)
    columns = {_COMPOSITE: pa.array(index.sorted_composite, pa.int64())}
    if index.uniques is not None:
        uniques = pa.array(index.uniques.to_numpy(), pa.int64() if index.uniques.dtype.kind == "i" else pa.string())
        columns[_UNIQUES] = pa.concat_arrays([uniques, pa.nulls(n - len(uniques), uniques.type)])
    table = pa.table({**columns, **{name: index.features[name] for name in index.features.column_names}})
    table = table.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()}).combine_chunks()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
        os.close(fd)
    except OSError:
        return False
    try:
        with pa.OSFile(tmp, "wb") as f, pa.ipc.new_file(f, table.schema) as writer:
            writer.write_table(table)
        os.replace(tmp, path)
    except OSError:  # disk full, directory gone: the join goes on without persisting
        Path(tmp).unlink(missing_ok=True)
        return False
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def read_index(path: Path, view: FeatureView, entity: Entity, fingerprint: str, stamp: str) -> ViewIndex | None:
    """The memory-mapped index at `path` if it is intact and still matches; None otherwise."""
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        meta = json.loads((reader.schema.metadata or {}).get(_META_KEY, b"{}"))
        if not isinstance(meta, dict) or (meta.get("format"), meta.get("definition"), meta.get("source")) != (INDEX_FORMAT, fingerprint, stamp):
            return None
        table = reader.read_all()
    except (OSError, pa.ArrowException, ValueError):
        return None  # absent, truncated or not an index file: rebuilt by the caller
    internal = [(_COMPOSITE, pa.int64())]
    if meta.get("uniques"):
        internal.append((_UNIQUES, pa.int64() if entity.dtype == "int64" else pa.string()))
    declared = [(f.name, ARROW_TYPES[f.dtype]) for f in view.schema]
    composite = table[_COMPOSITE]
    if [(f.name, f.type) for f in table.schema] != internal + declared or composite.null_count:
        return None
    try:
        n_codes = int(meta["n_codes"])
        uniques = None
        if meta["uniques"]:
            uniques = pd.Index(table[_UNIQUES].slice(0, n_codes).to_numpy())
        return ViewIndex(sorted_composite=composite.to_numpy(),  # one chunk: zero-copy
                         features=table.drop_columns([name for name, _ in internal]), uniques=uniques,
                         key_base=int(meta["key_base"]), n_codes=n_codes, t_min=int(meta["t_min"]),
                         span=int(meta["span"]))
    except (KeyError, TypeError, ValueError):
        return None
