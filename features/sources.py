"""Parquet sources of feature views: validation against the definition, and loading.

Timestamps are handled as int64 microseconds since the Unix epoch, UTC. Timezone-naive
timestamps (in sources and in entity frames) are taken as UTC, as Feast does.
"""
from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .definitions import Entity, FeatureView
from .errors import SourceValidationError


def _compatible(declared: str, actual: pa.DataType) -> bool:
    """Whether a source column of type `actual` can serve a feature declared as `declared`."""
    if declared in ("float32", "float64"):
        return pa.types.is_floating(actual) or pa.types.is_integer(actual)
    if declared in ("int32", "int64"):
        return pa.types.is_integer(actual)
    if declared == "bool":
        return pa.types.is_boolean(actual)
    if declared == "string":
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    return False


def key_compatible(key_dtype: str, actual: pa.DataType) -> bool:
    """Whether a column of type `actual` can hold join keys of type `key_dtype`."""
    if key_dtype == "int64":
        return pa.types.is_integer(actual)
    return pa.types.is_string(actual) or pa.types.is_large_string(actual)


def validate_source(view: FeatureView, entity: Entity) -> int:
    """Check the view's parquet source against its definition; return its row count.

    Raises SourceValidationError naming the view, the file and the column at fault.
    """
    path = Path(view.source)
    where = f"feature view {view.name!r}, source {path}"
    if not path.is_file():
        raise SourceValidationError(f"{where}: file not found")
    try:
        meta = pq.read_metadata(path)
        schema = meta.schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as exc:
        raise SourceValidationError(f"{where}: not a readable parquet file: {exc}") from None
    if meta.num_rows == 0:
        raise SourceValidationError(f"{where}: the source is empty (0 rows)")

    def column(name: str, what: str) -> pa.DataType:
        idx = schema.get_field_index(name)
        if idx < 0:
            raise SourceValidationError(
                f"{where}: {what} column {name!r} is missing (columns: {schema.names})")
        return schema.field(idx).type

    key_type = column(entity.join_key, "join key")
    if not key_compatible(entity.dtype, key_type):
        raise SourceValidationError(
            f"{where}: join key column {entity.join_key!r} is {key_type}, "
            f"entity {entity.name!r} declares {entity.dtype}")
    timestamps = ((view.timestamp_field, "event timestamp"), (view.created_timestamp_field, "created timestamp"))
    for ts_field, what in timestamps:
        if ts_field is None:
            continue
        ts_type = column(ts_field, what)
        if not pa.types.is_timestamp(ts_type):
            raise SourceValidationError(f"{where}: {what} column {ts_field!r} is {ts_type}, expected a timestamp")
    for f in view.schema:
        actual = column(f.name, "feature")
        if not _compatible(f.dtype, actual):
            raise SourceValidationError(
                f"{where}: feature column {f.name!r} is {actual} in the source, the view declares {f.dtype}")
    return meta.num_rows


def timestamps_us(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """int64 microseconds since the epoch (UTC) of a timestamp column; nulls become INT64_MIN."""
    if not pa.types.is_timestamp(array.type):
        raise SourceValidationError(f"expected a timestamp column, got {array.type}")
    as_us = pc.cast(array, pa.timestamp("us", tz=array.type.tz))
    ints = pc.fill_null(as_us.cast(pa.int64()), np.iinfo(np.int64).min)
    return ints.to_numpy()


def source_stamp(path: str | Path) -> str:
    """Identity of a source file's content: its size, mtime and the SHA-256 of its parquet footer.

    The footer holds every column chunk's offsets, sizes and min/max statistics, so a
    rewrite that keeps size and mtime still changes the stamp in practice, at the cost of
    one small read instead of hashing the whole file. Raises OSError if it cannot be read.
    """
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        footer = b""
        if st.st_size >= 12:
            f.seek(st.st_size - 8)
            tail = f.read(8)
            footer_len = int.from_bytes(tail[:4], "little")
            if tail[4:] == b"PAR1" and footer_len <= st.st_size - 12:
                f.seek(st.st_size - 8 - footer_len)
                footer = f.read(footer_len)
    return f"{st.st_size}:{st.st_mtime_ns}:{hashlib.sha256(footer).hexdigest()}"


@dataclass(frozen=True)
class SourceData:
    """One view's source as arrays: keys, event/created times (µs UTC) and the feature table."""

    keys: np.ndarray            # int64, or object (str) for string keys; null keys removed
    event_us: np.ndarray        # int64
    created_us: np.ndarray | None
    features: pa.Table          # the declared feature columns, cast to their declared types


ARROW_TYPES = {
    "float32": pa.float32(), "float64": pa.float64(), "int32": pa.int32(), "int64": pa.int64(),
    "bool": pa.bool_(), "string": pa.string(),
}

_cache: dict[tuple[str, str], tuple[str, SourceData]] = {}
_cache_lock = threading.Lock()


def clear_source_cache() -> None:
    """Forget the sources kept in memory (the next read goes to the files again)."""
    with _cache_lock:
        _cache.clear()


def load_source(view: FeatureView, entity: Entity) -> SourceData:
    """Read and validate a view's source. Kept in memory until the file changes (see source_stamp)."""
    validate_source(view, entity)
    stamp = source_stamp(view.source)
    cache_key = (str(view.source), repr((view, entity)))
    with _cache_lock:
        hit = _cache.get(cache_key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    data = read_source(view, entity, validated=True)
    with _cache_lock:
        _cache[cache_key] = (stamp, data)
    return data


def read_source(view: FeatureView, entity: Entity, *, validated: bool = False) -> SourceData:
    """Read a view's source into arrays, validating it first unless the caller just did; not cached."""
    if not validated:
        validate_source(view, entity)
    columns = [entity.join_key, view.timestamp_field, *view.feature_names]
    if view.created_timestamp_field:
        columns.append(view.created_timestamp_field)
    table = pq.read_table(view.source, columns=columns)
    valid = pc.and_(pc.is_valid(table[entity.join_key]), pc.is_valid(table[view.timestamp_field]))
    if not pc.all(valid).as_py():
        table = table.filter(valid)  # a row without a key or event time can never match
    keys_col = table[entity.join_key]
    if entity.dtype == "int64":
        keys = keys_col.cast(pa.int64()).to_numpy()
    else:
        keys = keys_col.to_numpy(zero_copy_only=False).astype(object)
    event_us = timestamps_us(table[view.timestamp_field])
    created_us = None
    if view.created_timestamp_field:
        created_us = timestamps_us(table[view.created_timestamp_field])
    # One chunk per column: later takes and numpy views then need no concatenation.
    feats = pa.table({
        f.name: table[f.name].cast(ARROW_TYPES[f.dtype]) for f in view.schema
    }).combine_chunks()
    return SourceData(keys=keys, event_us=event_us, created_us=created_us, features=feats)
