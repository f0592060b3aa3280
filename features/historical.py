"""Point-in-time correct historical retrieval (the training-set join), vectorised with numpy.

For each entity row (key k, timestamp t) and each feature view, the joined feature row is
the one of entity k with the latest event time e such that t − ttl ≤ e ≤ t (both bounds
inclusive; ttl 0 means no lower bound); ties on e go to the latest created timestamp.
Every entity row yields exactly one output row, in input order; no match gives nulls.

How: per view, the feature rows are sorted once by the int64 composite
(key code, event time) with the created time breaking ties — the sort is cached until the
source file changes. Each entity row's composite is then found with one `searchsorted`,
and the TTL is checked on the matched row. Timezone-naive timestamps are taken as UTC.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Union

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .definitions import Entity
from .errors import FeatureStoreError
from .sources import SourceData, timestamps_us

INT64_MIN = np.iinfo(np.int64).min
EntityFrame = Union[pd.DataFrame, pa.Table]


@dataclass(frozen=True)
class _ViewIndex:
    """Feature rows of one view sorted for as-of lookups."""

    uniques: pd.Index | None     # distinct keys (a key's code is its position), or None for
    key_base: int                # dense int keys, whose code is key - key_base
    n_codes: int
    order: np.ndarray            # row numbers of the source in (code, event, created) order
    sorted_composite: np.ndarray
    sorted_codes: np.ndarray
    sorted_event_us: np.ndarray
    t_min: int
    span: int                    # composite = code * span + (event - t_min + 1)


_index_cache: dict[int, tuple[SourceData, _ViewIndex]] = {}
_index_lock = threading.Lock()


def _view_index(data: SourceData) -> _ViewIndex:
    with _index_lock:
        hit = _index_cache.get(id(data))
        if hit is not None and hit[0] is data:
            return hit[1]
    keys = data.keys
    uniques, key_base = None, 0
    if keys.dtype.kind == "i" and keys.size and int(keys.max()) - int(keys.min()) < 4 * keys.size + 1024:
        key_base = int(keys.min())  # dense ids (the common case): the key is its own code
        codes = keys - key_base
        n_codes = int(codes.max()) + 1
    else:
        codes, found = pd.factorize(keys, sort=False)
        codes = codes.astype(np.int64)
        uniques, n_codes = pd.Index(found), len(found)
    event = data.event_us
    t_min, t_max = int(event.min()), int(event.max())
    span = t_max - t_min + 2  # +1 for the slot below t_min that entity times before it map to
    if n_codes * span >= 2**62:
        raise FeatureStoreError(
            f"feature rows span {span} µs over {n_codes} keys: too wide for the int64 composite sort")
    composite = codes * span + (event - t_min + 1)
    order = np.argsort(composite, kind="stable")
    if data.created_us is not None:
        _order_ties_by_created(order, composite[order], data.created_us)
    index = _ViewIndex(
        uniques=uniques, key_base=key_base, n_codes=n_codes, order=order, sorted_composite=composite[order],
        sorted_codes=codes[order], sorted_event_us=event[order], t_min=t_min, span=span,
    )
    with _index_lock:
        _index_cache.clear()  # keep only the latest few: an index is as large as its source
        _index_cache[id(data)] = (data, index)
    return index


def _order_ties_by_created(order: np.ndarray, sorted_composite: np.ndarray, created_us: np.ndarray) -> None:
    """Within runs of equal (key, event time), put rows in created-time order, in place.

    Ties are usually rare, so only the tied rows are sorted again (a full two-key lexsort
    costs about four times the main sort).
    """
    tie = sorted_composite[1:] == sorted_composite[:-1]
    if not tie.any():
        return
    in_run = np.zeros(order.size, dtype=bool)
    in_run[1:] |= tie
    in_run[:-1] |= tie
    at = np.flatnonzero(in_run)
    rows = order[at]
    # Runs stay where they are (their composites are already sorted); rows move within them.
    order[at] = rows[np.lexsort((created_us[rows], sorted_composite[at]))]


def asof_rows(data: SourceData, keys: np.ndarray, ts_us: np.ndarray, ttl_us: int) -> np.ndarray:
    """Row number in `data` joined to each (key, ts) entity row, or -1 where nothing matches."""
    ix = _view_index(data)
    if ix.uniques is not None:
        codes = ix.uniques.get_indexer(keys).astype(np.int64)  # -1: key has no feature rows
    else:
        in_range = (keys >= ix.key_base) & (keys < ix.key_base + ix.n_codes)  # compared before
        codes = np.where(in_range, keys - ix.key_base, -1)                     # subtracting: no overflow
    t_max = ix.t_min + ix.span - 2
    # Entity times outside the feature time range are clamped: above it, the answer is the
    # key's latest row; below it, the slot under t_min that no feature row occupies.
    clamped = np.clip(ts_us, ix.t_min - 1, t_max)
    probe = codes * ix.span + (clamped - ix.t_min + 1)
    # searchsorted is about twice as fast on sorted probes (each search starts from the last).
    probe_order = np.argsort(probe)
    pos = np.empty(probe.size, dtype=np.int64)
    pos[probe_order] = np.searchsorted(ix.sorted_composite, probe[probe_order], side="right") - 1
    safe = np.maximum(pos, 0)
    ok = (pos >= 0) & (codes >= 0) & (ts_us != INT64_MIN) & (ix.sorted_codes[safe] == codes)
    if ttl_us > 0:
        ok &= (ts_us - ix.sorted_event_us[safe]) <= ttl_us
    return np.where(ok, ix.order[safe], -1)


def entity_columns(entity_df: EntityFrame, entity: Entity, timestamp_column: str) -> tuple[np.ndarray, np.ndarray]:
    """The join keys and timestamps (µs UTC) of an entity frame, with its types checked."""
    names = list(entity_df.columns) if isinstance(entity_df, pd.DataFrame) else entity_df.column_names
    for col in (entity.join_key, timestamp_column):
        if col not in names:
            raise FeatureStoreError(f"entity_df has no column {col!r} (columns: {names})")
    if isinstance(entity_df, pd.DataFrame):
        key_series = entity_df[entity.join_key]
        try:
            ts_arr = pa.array(entity_df[timestamp_column])
        except (pa.ArrowException, TypeError) as exc:
            raise FeatureStoreError(f"entity_df column {timestamp_column!r} is not a timestamp: {exc}") from None
        key_arr = pa.array(key_series)
    else:
        key_arr = entity_df[entity.join_key]
        ts_arr = entity_df[timestamp_column]
    if not pa.types.is_timestamp(ts_arr.type):
        raise FeatureStoreError(
            f"entity_df column {timestamp_column!r} is {ts_arr.type}, expected a timestamp (naive = UTC)")
    if isinstance(key_arr, pa.ChunkedArray):
        key_arr = key_arr.combine_chunks()
    if entity.dtype == "int64":
        if not pa.types.is_integer(key_arr.type):
            raise FeatureStoreError(
                f"entity_df column {entity.join_key!r} is {key_arr.type}, entity {entity.name!r} has int64 keys")
        keys = pc.fill_null(key_arr.cast(pa.int64()), 0).to_numpy()
    else:
        if not (pa.types.is_string(key_arr.type) or pa.types.is_large_string(key_arr.type)):
            raise FeatureStoreError(
                f"entity_df column {entity.join_key!r} is {key_arr.type}, entity {entity.name!r} has string keys")
        keys = pc.fill_null(key_arr, "").to_numpy(zero_copy_only=False).astype(object)
    ts_us = timestamps_us(ts_arr)
    if key_arr.null_count:  # a null key matches nothing: give it the no-timestamp marker
        ts_us = np.where(key_arr.is_null().to_numpy(zero_copy_only=False), INT64_MIN, ts_us)
    return keys, ts_us


def join(entity_df: EntityFrame, columns: list[tuple[str, pa.Array | pa.ChunkedArray]]) -> EntityFrame:
    """entity_df with the joined feature columns appended, in the caller's format."""
    if isinstance(entity_df, pd.DataFrame):
        out = entity_df.copy()
        for name, arr in columns:
            out[name] = arr.to_pandas().to_numpy()
        return out
    table = entity_df
    for name, arr in columns:
        table = table.append_column(name, arr)
    return table


def take_rows(table: pa.Table, feature: str, rows: np.ndarray) -> pa.Array | pa.ChunkedArray:
    """The feature's values at `rows`, null where the row number is -1."""
    indices = pa.array(rows, mask=rows < 0)
    return table[feature].take(indices)
