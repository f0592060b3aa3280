"""The persisted point-in-time index (features/pit_index.py): used when fresh, rebuilt when stale or damaged."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_features_historical import brute_force, entity_df, make_store, random_case, ts
from vivace.features import Entity, FeatureStore, FeatureStoreError, FeatureView, Field, SourceValidationError
from vivace.features.historical import Matches, asof_match, build_index, entity_columns, take_rows
from vivace.features.pit_index import clear_index_cache, index_path
from vivace.features.sources import SourceData, load_source


def index_file(store: FeatureStore, view: str = "stats") -> Path:
    return index_path(store.pit_index_dir, store.get_feature_view(view))


def in_memory_join(store: FeatureStore, edf: pd.DataFrame, view: str = "stats") -> np.ndarray:
    """The join computed from the source alone: index built in memory, never persisted."""
    v = store.get_feature_view(view)
    entity = store.get_entity(v.entity)
    keys, ts_us = entity_columns(edf, entity, "event_timestamp")
    ix = build_index(load_source(v, entity))
    matches = asof_match(ix, keys, ts_us, int(v.ttl.total_seconds() * 1_000_000))
    return take_rows(ix.features, "value", matches).to_numpy(zero_copy_only=False)


def test_apply_writes_the_index_and_a_new_process_reads_it(tmp_path: Path) -> None:
    store = make_store(tmp_path, [(1, 0, 0, 1.0), (1, 10, 10, 2.0)])
    path = index_file(store)
    assert path.is_file()
    before = path.stat()
    clear_index_cache()  # as in a new process: only the file is left
    out = FeatureStore(tmp_path / "home").get_historical_features(entity_df([1, 1], [ts(5), ts(15)]), ["stats:value"])
    assert out["value"].tolist() == [1.0, 2.0]
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # read, not rebuilt


@pytest.mark.parametrize("key_kind", ["dense", "sparse", "string"])
def test_index_file_matches_brute_force_with_nulls_and_duplicates(tmp_path: Path, key_kind: str) -> None:
    # Coarse times: many ties on event time and TTL edges hit exactly; duplicate entity rows;
    # a tenth of the feature values null.
    store, src, edf = random_case(tmp_path, seed=3, n_rows=3000, n_entities=25, key_kind=key_kind)
    src["value"] = src["value"].mask(np.random.default_rng(4).random(len(src)) < 0.1)
    src.to_parquet(tmp_path / "stats.parquet")
    store.apply([store.get_feature_view("stats")])
    edf = pd.concat([edf, edf.iloc[:50]], ignore_index=True)
    clear_index_cache()  # read the file apply wrote, as a new process would
    from_file = store.get_historical_features(edf, ["stats:value"])["value"].to_numpy()
    np.testing.assert_array_equal(from_file, brute_force(src, edf, pd.Timedelta(minutes=30)))
    np.testing.assert_array_equal(from_file, in_memory_join(store, edf))
    assert np.isnan(from_file).any() and not np.isnan(from_file).all()


def test_rewritten_source_with_same_size_and_mtime_is_detected(tmp_path: Path) -> None:
    store = make_store(tmp_path, [(1, 0, 0, 1.0), (2, 0, 0, 2.0)])
    src = tmp_path / "stats.parquet"
    table = pq.read_table(src)
    pq.write_table(table, src, compression=None, use_dictionary=False)
    store.get_historical_features(entity_df([1], [ts(1)]), ["stats:value"])  # index of this file
    st = src.stat()
    changed = table.set_column(table.column_names.index("value"), "value", pa.array([10.0, 20.0]))
    pq.write_table(changed, src, compression=None, use_dictionary=False)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert src.stat().st_size == st.st_size and src.stat().st_mtime_ns == st.st_mtime_ns
    for fresh_process in (False, True):
        if fresh_process:
            clear_index_cache()
        out = store.get_historical_features(entity_df([1, 2], [ts(1)] * 2), ["stats:value"])
        assert out["value"].tolist() == [10.0, 20.0]


def test_changed_definition_rebuilds_the_index(tmp_path: Path) -> None:
    store = make_store(tmp_path, [(1, 5, 9, 9.0), (1, 5, 7, 7.0)])
    view = store.get_feature_view("stats")
    clear_index_cache()
    # Without the created timestamp the tie goes to the last row of the file; float32 now.
    store.apply([FeatureView("stats", "driver", view.source, [Field("value", "float32")], ttl="1h")])
    clear_index_cache()
    out = store.get_historical_features(entity_df([1], [ts(6)]), ["stats:value"])
    assert out["value"].tolist() == [7.0] and out["value"].dtype == np.float32


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign arrow file", "empty"])
def test_damaged_index_file_is_rebuilt(tmp_path: Path, damage: str) -> None:
    store = make_store(tmp_path, [(1, 0, 0, 1.0), (2, 0, 0, 2.0)])
    path = index_file(store)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"ARROW1\x00\x00" + os.urandom(4096))
    elif damage == "foreign arrow file":
        with pa.ipc.new_file(str(path), pa.schema([("value", pa.float64())])) as writer:
            writer.write_table(pa.table({"value": [1.0]}))
    else:
        path.write_bytes(b"")
    clear_index_cache()
    out = store.get_historical_features(entity_df([2, 1, 3], [ts(1)] * 3), ["stats:value"])
    np.testing.assert_array_equal(out["value"].to_numpy(), [2.0, 1.0, np.nan])
    clear_index_cache()  # the rebuilt file is whole again
    assert pa.ipc.open_file(str(path)).read_all().num_rows == 2
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left


def test_unwritable_index_directory_still_joins(tmp_path: Path) -> None:
    store = make_store(tmp_path, [(1, 0, 0, 1.0)])
    (tmp_path / "not-a-dir").write_text("x")
    store.pit_index_dir = tmp_path / "not-a-dir" / "pit_index"  # mkdir fails, even for root
    clear_index_cache()
    out = store.get_historical_features(entity_df([1], [ts(1)]), ["stats:value"])
    assert out["value"].tolist() == [1.0]


def test_deleted_source_is_not_served_from_the_index(tmp_path: Path) -> None:
    store = make_store(tmp_path, [(1, 0, 0, 1.0)])
    (tmp_path / "stats.parquet").unlink()
    with pytest.raises(SourceValidationError, match="stats.parquet: file not found"):
        store.get_historical_features(entity_df([1], [ts(1)]), ["stats:value"])


@pytest.mark.parametrize("values", [
    pa.array([1.5, 2.5, 3.5], pa.float32()),      # numpy gather
    pa.array([1, 2, 3], pa.int64()),
    pa.array([1.5, None, 3.5], pa.float64()),     # Arrow take: nulls in the source
    pa.array([True, False, True]),
    pa.array(["a", "b", None]),
])
def test_take_rows_matches_arrow_take(values: pa.Array) -> None:
    table = pa.table({"f": values})
    for rows in (np.array([2, -1, 0, 0, 1, -1]), np.array([1, 2])):
        visit = np.argsort(rows, kind="stable")
        got = take_rows(table, "f", Matches(rows=rows, visit=visit, visited_rows=np.maximum(rows[visit], 0)))
        assert got.type == values.type
        assert got.to_pylist() == values.take(pa.array(rows, mask=rows < 0)).to_pylist()


@pytest.mark.parametrize("key_kind", ["dense", "sparse", "string"])
@pytest.mark.parametrize("with_created", [True, False])
def test_build_index_orders_by_key_event_created_then_file_order(key_kind: str, with_created: bool) -> None:
    rng = np.random.default_rng(7)
    n = 20_000
    raw_keys = rng.integers(0, 300, n)
    keys = {"dense": raw_keys, "sparse": raw_keys * 10**12,
            "string": np.array([f"k{k}" for k in raw_keys], dtype=object)}[key_kind]
    event = rng.integers(0, 50, n) * 10**9 + 1_700_000_000 * 10**6  # many (key, event) ties
    created = rng.integers(0, 3, n) if with_created else None          # ties on created too
    data = SourceData(keys=keys, event_us=event, created_us=created,
                      features=pa.table({"row": pa.array(np.arange(n))}))
    ix = build_index(data)
    codes = pd.Index(ix.uniques).get_indexer(keys) if ix.uniques is not None else keys - ix.key_base
    tie_break = created if with_created else np.zeros(n, dtype=np.int64)
    expected = np.lexsort((np.arange(n), tie_break, event, codes))
    np.testing.assert_array_equal(ix.features["row"].to_numpy(), expected)
    assert np.all(np.diff(ix.sorted_composite) >= 0)


def test_source_whose_rows_all_lack_a_key_joins_to_nulls(tmp_path: Path) -> None:
    store = make_store(tmp_path, [(1, 0, 0, 1.0)])
    src = tmp_path / "stats.parquet"
    table = pq.read_table(src)
    pq.write_table(table.set_column(0, "driver_id", pa.array([None], pa.int64())), src)
    store.apply([store.get_feature_view("stats")])
    for fresh_process in (False, True):
        if fresh_process:
            clear_index_cache()
        out = store.get_historical_features(entity_df([1, 2], [ts(1)] * 2), ["stats:value"])
        assert np.isnan(out["value"].to_numpy()).all()


def test_every_feature_type_through_the_index_pandas_and_arrow(tmp_path: Path) -> None:
    pd.DataFrame({
        "driver_id": pd.Series([1, 2], dtype="int64"), "event_timestamp": [ts(0), ts(0)],
        "f32": pd.Series([1.5, 2.5], dtype="float32"), "i64": pd.Series([7, 8], dtype="int64"),
        "i32": pd.Series([3, 4], dtype="int32"), "flag": [True, False], "name": ["a", "b"],
    }).to_parquet(tmp_path / "mixed.parquet")
    store = FeatureStore(tmp_path / "home")
    store.apply([Entity("driver", "driver_id"), FeatureView("mixed", "driver", str(tmp_path / "mixed.parquet"), [
        Field("f32", "float32"), Field("i64", "int64"), Field("i32", "int32"), Field("flag", "bool"),
        Field("name", "string")])])
    clear_index_cache()
    edf = entity_df([2, 9, 1], [ts(1)] * 3)
    as_pandas = store.get_historical_features(edf, ["mixed:*"])
    as_arrow = store.get_historical_features(pa.Table.from_pandas(edf, preserve_index=False), ["mixed:*"])
    assert as_arrow["i64"].to_pylist() == [8, None, 7] and as_arrow["name"].to_pylist() == ["b", None, "a"]
    assert as_arrow["flag"].to_pylist() == [False, None, True] and as_arrow["i32"].type == pa.int32()
    for col in ("f32", "i64", "i32", "flag", "name"):  # pandas gets what Arrow's to_pandas gives
        expected = as_arrow[col].to_pandas().to_numpy()
        assert as_pandas[col].dtype == expected.dtype, col
        assert as_pandas[col].isna().tolist() == pd.isna(expected).tolist(), col


def test_unindexable_source_warns_at_apply_and_fails_the_join(tmp_path: Path) -> None:
    # Event times ~73,000 years apart over 4 keys overflow the int64 (key, time) composite.
    pq.write_table(pa.table({
        "driver_id": pa.array([0, 1, 2, 3], pa.int64()),
        "event_timestamp": pa.array([0, 2**61, 5, 6], pa.timestamp("us", tz="UTC")),
        "value": pa.array([1.0, 2.0, 3.0, 4.0]),
    }), tmp_path / "wide.parquet")
    store = FeatureStore(tmp_path / "home")
    with pytest.warns(UserWarning, match="'wide': point-in-time index not built: .* too wide"):
        store.apply([Entity("driver", "driver_id"),
                     FeatureView("wide", "driver", str(tmp_path / "wide.parquet"), [Field("value", "float64")])])
    assert store.get_feature_view("wide").name == "wide"  # registered all the same
    with pytest.raises(FeatureStoreError, match="too wide for the int64 composite sort"):
        store.get_historical_features(entity_df([1], [ts(1)]), ["wide:value"])
