"""Materialization to the LMDB online store and the C++ read path (vivace._core.FeatureLookup)."""
from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import lmdb
import numpy as np
import pandas as pd
import pytest

from vivace.cli import main as vivace_main
from vivace.features import (
    Entity, FeatureStore, FeatureStoreError, FeatureView, Field, OnlineStoreError, UnknownFeatureError,
)
from vivace.features.online import OnlineWriter, environment, read_generation, row_layout

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
END = T0 + timedelta(hours=1)


def write_source(path: Path, n_entities: int, offset: float = 0.0, n_features: int = 3,
                 minutes_back: int = 50, seed: int = 0) -> pd.DataFrame:
    """Two rows per entity (the later one is the one materialized), values key + j/10 + offset."""
    rng = np.random.default_rng(seed)
    keys = np.arange(n_entities, dtype=np.int64)
    late = pd.Timestamp(T0) + pd.to_timedelta(rng.integers(0, minutes_back, n_entities), unit="m")
    df = pd.DataFrame({
        "driver_id": np.concatenate([keys, keys]),
        "event_timestamp": np.concatenate([late - pd.Timedelta(minutes=5), late]),
    })
    for j in range(n_features):
        stale = np.full(n_entities, -1.0)
        fresh = keys + j / 10 + offset
        df[f"f{j}"] = np.concatenate([stale, fresh]).astype("float32")
    df.to_parquet(path)
    return df


def make_store(tmp_path: Path, n_entities: int = 50, ttl: str = "2h", n_features: int = 3,
               cache: int = 0) -> FeatureStore:
    write_source(tmp_path / "stats.parquet", n_entities, n_features=n_features)
    store = FeatureStore(tmp_path / "home", online_cache_capacity=cache)
    store.apply([
        Entity("driver", "driver_id"),
        FeatureView("stats", "driver", str(tmp_path / "stats.parquet"),
                    [Field(f"f{j}", "float32") for j in range(n_features)], ttl=ttl),
    ])
    return store


FEATURES = ["stats:f0", "stats:f1", "stats:f2"]


def test_materialize_then_read_latest_values(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    [result] = store.materialize(end=END)
    assert (result.view, result.rows_written) == ("stats", 50)
    ids = np.array([3, 0, 49, 77, 3], dtype=np.int64)
    values, found = store.get_online_features(FEATURES, ids, now=END)
    assert values.dtype == np.float32 and values.shape == (5, 3)
    assert found.tolist() == [True, True, True, False, True]
    np.testing.assert_allclose(values[0], [3.0, 3.1, 3.2], rtol=1e-6)
    np.testing.assert_allclose(values[2], [49.0, 49.1, 49.2], rtol=1e-6)
    assert np.isnan(values[3]).all()
    # Column order follows the request, not the stored layout.
    values, _ = store.get_online_features(["stats:f2", "stats:f0"], [3], now=END)
    np.testing.assert_allclose(values[0], [3.2, 3.0], rtol=1e-6)
    # A list, a tuple and a generator of the same references read the same, through one lookup.
    for refs in (tuple(FEATURES), list(FEATURES), (f for f in FEATURES)):
        again, found_again = store.get_online_features(refs, ids, now=END)
        np.testing.assert_array_equal(again, store.get_online_features(FEATURES, ids, now=END)[0])
        assert found_again.tolist() == found.tolist()
    assert store.online_reader(list(FEATURES)) is store.online_reader(tuple(FEATURES))
    first_use = (f for f in ["stats:f1", "stats:f0"])  # a generator is read once, even on first use
    np.testing.assert_allclose(store.get_online_features(first_use, [3], now=END)[0][0], [3.1, 3.0], rtol=1e-6)


def test_layout_is_fixed_and_versioned(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.materialize(end=END)
    env = environment(tmp_path / "home" / "online")  # py-lmdb allows one handle per process
    with env.begin() as txn:
        meta = env.open_db(b"meta", txn=txn, create=False)
        assert txn.get(b"schema_version", db=meta) == b"1"
        assert struct.unpack("<Q", txn.get(b"generation", db=meta))[0] == 1
        record = txn.get(b"view:stats", db=meta).decode().split("\n")
        assert record[:5] == ["vivace-online-view/1", "ttl_us 7200000000", "features 3", "f0", "f1"]
        rows = env.open_db(b"v:stats", txn=txn, create=False, integerkey=True)
        raw = txn.get(struct.pack("=q", 7), db=rows)
    row = np.frombuffer(raw, dtype=row_layout(3))[0]
    assert len(raw) == 8 + 4 + 12
    np.testing.assert_allclose(row["values"], [7.0, 7.1, 7.2], rtol=1e-6)
    assert row["nulls"][0] == 0


def test_ttl_is_checked_at_read_time(tmp_path: Path) -> None:
    store = make_store(tmp_path, ttl="2h")
    store.materialize(end=END)
    df = pd.read_parquet(tmp_path / "stats.parquet")
    event = df[df.driver_id == 5]["event_timestamp"].max().to_pydatetime()
    _, found = store.get_online_features(FEATURES, [5], now=event + timedelta(hours=2))
    assert found.tolist() == [True]  # exactly at the TTL: still fresh
    values, found = store.get_online_features(FEATURES, [5], now=event + timedelta(hours=2, microseconds=1))
    assert found.tolist() == [False] and np.isnan(values).all()


def test_null_and_nan_values_read_as_nan(tmp_path: Path) -> None:
    store = make_store(tmp_path, n_entities=3)
    df = pd.read_parquet(tmp_path / "stats.parquet")
    df["f1"] = pd.array(df["f1"].tolist()[:-1] + [None], dtype="Float32")  # null for entity 2
    df.loc[df.index[-2], "f0"] = np.nan                                       # NaN for entity 1
    df.to_parquet(tmp_path / "stats.parquet")
    store.materialize(end=END)
    values, found = store.get_online_features(FEATURES, [0, 1, 2], now=END)
    assert found.tolist() == [True, True, True]
    assert np.isnan(values[1, 0]) and values[1, 1] == pytest.approx(1.1)
    assert np.isnan(values[2, 1]) and values[2, 0] == pytest.approx(2.0)


def test_new_materialization_is_seen_and_cache_invalidated(tmp_path: Path) -> None:
    store = make_store(tmp_path, cache=1000)
    store.materialize(end=END)
    reader = store.online_reader(FEATURES)
    now_us = int(END.timestamp() * 1e6)
    first, _ = reader.get(np.arange(10), now_us)
    again, _ = reader.get(np.arange(10), now_us)  # served from the in-process cache
    np.testing.assert_array_equal(first, again)
    write_source(tmp_path / "stats.parquet", 50, offset=1000.0)
    store.materialize(end=END)
    assert read_generation(tmp_path / "home") == 2
    after, found = reader.get(np.arange(10), now_us)
    assert found.all()
    np.testing.assert_allclose(after, first + 1000.0, rtol=1e-6)


def test_incremental_materialization(tmp_path: Path) -> None:
    store = make_store(tmp_path, ttl="0")
    store.materialize(end=END)
    # New rows for entity 1 (newer) and entity 2 (older than what is stored).
    df = pd.read_parquet(tmp_path / "stats.parquet")
    add = df[df.driver_id.isin([1, 2])].groupby("driver_id").tail(1).copy()
    add.loc[add.driver_id == 1, "event_timestamp"] = pd.Timestamp(END + timedelta(minutes=30))
    add.loc[add.driver_id == 2, "event_timestamp"] = pd.Timestamp(T0 - timedelta(days=1))
    add[["f0", "f1", "f2"]] = 500.0
    pd.concat([df, add]).to_parquet(tmp_path / "stats.parquet")
    [result] = store.materialize_incremental(end=END + timedelta(hours=1))
    assert result.rows_written == 1  # only entity 1's row is after the last window
    values, _ = store.get_online_features(["stats:f0"], [1, 2, 3], now=END + timedelta(hours=1))
    assert values[:, 0].tolist() == pytest.approx([500.0, 2.0, 3.0])
    # A full run with an old start does not overwrite newer stored rows with older ones.
    store.materialize(start=T0 - timedelta(days=2), end=END + timedelta(hours=1))
    values, _ = store.get_online_features(["stats:f0"], [1, 2], now=END + timedelta(hours=1))
    assert values[:, 0].tolist() == pytest.approx([500.0, 2.0])


def test_map_size_grows_automatically(tmp_path: Path) -> None:
    store = make_store(tmp_path, n_entities=20000, n_features=16)
    view = store.get_feature_view("stats")
    plan = [(view, store.get_entity("driver"))]
    writer = OnlineWriter(tmp_path / "home", initial_map_size=64 << 10)
    [result] = writer.materialize(plan, end=END)
    assert result.rows_written == 20000
    assert writer.env.info()["map_size"] > 64 << 10
    values, found = store.get_online_features(["stats:f15"], [19999], now=END)
    assert found.all() and values[0, 0] == pytest.approx(19999 + 1.5)


def test_layout_change_is_picked_up_by_live_readers(tmp_path: Path) -> None:
    store = make_store(tmp_path, n_features=3)
    store.materialize(end=END)
    reader = store.online_reader(["stats:f2"])
    now_us = int(END.timestamp() * 1e6)
    write_source(tmp_path / "stats.parquet", 50, n_features=4)
    store.apply([FeatureView("stats", "driver", str(tmp_path / "stats.parquet"),
                             [Field("f3", "float32"), Field("f2", "float32")], ttl="2h")])
    store.materialize(end=END)
    values, found = reader.get([4], now_us)
    assert found.all() and values[0, 0] == pytest.approx(4.2)
    from vivace import _core

    cache = _core.FeatureCache(str(tmp_path / "home" / "online"))
    with pytest.raises(_core.FeatureCacheError, match="unknown feature 'f0' in online view 'stats'"):
        _core.FeatureLookup(cache, [("stats", "f0")])


def test_wrong_entity_id_types_are_refused(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.materialize(end=END)
    for bad in ([1.5, 2.0], np.array([1.0]), ["1"], np.array([True])):
        with pytest.raises(TypeError, match="entity ids must be"):
            store.get_online_features(FEATURES, bad)
    with pytest.raises(ValueError, match="one-dimensional"):
        store.get_online_features(FEATURES, np.zeros((2, 2), dtype=np.int64))
    values, found = store.get_online_features(FEATURES, 7, now=END)  # a single int is a batch of one
    assert values.shape == (1, 3) and found.tolist() == [True]
    values, found = store.get_online_features(FEATURES, np.array([], dtype=np.int64))
    assert values.shape == (0, 3)


def test_unknown_features_and_missing_store(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    with pytest.raises(OnlineStoreError, match="no online store at .*run `vivace features materialize`"):
        store.get_online_features(FEATURES, [1])
    store.materialize(end=END)
    with pytest.raises(UnknownFeatureError, match="unknown feature 'f9'"):
        store.get_online_features(["stats:f9"], [1])


def test_older_schema_version_is_refused_until_rebuilt(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    path = tmp_path / "home" / "online"
    path.mkdir(parents=True)
    env = lmdb.open(str(path), max_dbs=8)
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn)
        txn.put(b"schema_version", b"0", db=meta)
        txn.put(b"legacy", b"junk")
    env.close()
    with pytest.raises(OnlineStoreError, match="schema version '0', this Vivace reads version 1"):
        store.get_online_features(FEATURES, [1])
    with pytest.raises(OnlineStoreError, match="schema version 0, this Vivace writes version 1: run .*--rebuild"):
        store.materialize(end=END)
    with environment(path).begin() as txn:
        assert [k for k, _ in txn.cursor()] == [b"legacy", b"meta"]  # nothing was added
    store.materialize(end=END, rebuild=True)
    _, found = store.get_online_features(FEATURES, [1], now=END)
    assert found.all()


def test_unwritable_store_path(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    (tmp_path / "home" / "online").write_text("a file where the store folder should be")
    with pytest.raises(OnlineStoreError, match="online store path .* is not writable"):
        store.materialize(end=END)
    if os.geteuid() != 0:  # root writes through permission bits
        (tmp_path / "home" / "online").unlink()
        (tmp_path / "home" / "online").mkdir(mode=0o500)
        with pytest.raises(OnlineStoreError, match="is not writable"):
            store.materialize(end=END)


def test_string_keyed_views_stay_offline(tmp_path: Path) -> None:
    pd.DataFrame({"city": ["a"], "event_timestamp": [pd.Timestamp(T0)], "x": [1.0]}).to_parquet(tmp_path / "c.parquet")
    store = FeatureStore(tmp_path / "home")
    store.apply([Entity("city", "city", dtype="string"),
                 FeatureView("cities", "city", str(tmp_path / "c.parquet"), [Field("x", "float64")])])
    [result] = store.materialize(end=END)
    assert result.skipped == "not materialized online: string join keys"


def test_lookup_into_preallocated_buffers(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.materialize(end=END)
    reader = store.online_reader(FEATURES)
    out = np.empty((4, 3), dtype=np.float32)
    found = np.empty(4, dtype=bool)
    reader.lookup_into(np.array([1, 2, 3, 999]), out, found, int(END.timestamp() * 1e6))
    assert found.tolist() == [True, True, True, False]
    assert out[1, 1] == pytest.approx(2.1)
    with pytest.raises(ValueError, match="smaller than"):
        reader.lookup_into(np.arange(10), out, found)


def test_cli_materialize_and_get(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_store(tmp_path, ttl="0")
    home = str(tmp_path / "home")
    assert vivace_main(["--home", home, "features", "materialize", "--end", END.isoformat()]) == 0
    assert "stats: 50 rows written" in capsys.readouterr().out
    assert vivace_main(["--home", home, "features", "get", "4", "404", "--features", "stats:f0,stats:f1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split("\t") == ["4", "True", "4", "4.1"]
    assert lines[2].split("\t")[:2] == ["404", "False"]


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from datetime import datetime
    from vivace.features import FeatureStore

    def progress(view, rows):
        if rows >= 10000:
            print("WRITING", flush=True)
            time.sleep(120)  # killed here, in the middle of the write transaction

    FeatureStore(sys.argv[1]).materialize(end=datetime.fromisoformat(sys.argv[2]), progress=progress)
""")


def test_sigkill_during_materialization_keeps_the_previous_state(tmp_path: Path) -> None:
    store = make_store(tmp_path, n_entities=30000)
    store.materialize(end=END)
    ids = np.array([0, 12345, 29999], dtype=np.int64)
    before, _ = store.get_online_features(FEATURES, ids, now=END)
    write_source(tmp_path / "stats.parquet", 30000, offset=1000.0)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "home"), END.isoformat()],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        # Reads keep working while the writer holds its transaction, and see the old state.
        during, found = store.get_online_features(FEATURES, ids, now=END)
        assert found.all()
        np.testing.assert_array_equal(during, before)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    after, found = store.get_online_features(FEATURES, ids, now=END)
    assert found.all()
    np.testing.assert_array_equal(after, before)
    assert read_generation(tmp_path / "home") == 1
    # The dead writer's lock is recovered: the next materialization lands.
    store.materialize(end=END)
    latest, _ = store.get_online_features(FEATURES, ids, now=END)
    np.testing.assert_allclose(latest, before + 1000.0, rtol=1e-6)


def test_large_unsorted_batches_with_duplicates(tmp_path: Path) -> None:
    store = make_store(tmp_path, n_entities=500)
    store.materialize(end=END)
    rng = np.random.default_rng(3)
    ids = np.concatenate([rng.integers(-5, 520, 300), [7, 7, -1, 2**62]]).astype(np.int64)
    values, found = store.get_online_features(FEATURES, ids, now=END)
    known = (ids >= 0) & (ids < 500)
    np.testing.assert_array_equal(found, known)
    expected = ids[:, None] + np.array([0.0, 0.1, 0.2])
    np.testing.assert_allclose(values[known], expected[known], rtol=1e-6)
    assert np.isnan(values[~known]).all()
    for i in (0, 17, 301):  # one by one agrees with the batch
        one, _ = store.get_online_features(FEATURES, [int(ids[i])], now=END)
        np.testing.assert_array_equal(one[0], values[i])


def test_row_index_of_a_settled_snapshot_reads_what_the_cursors_read(tmp_path: Path) -> None:
    """Batches that keep reading one snapshot get an in-memory row index of it; it answers
    exactly as the LMDB cursors did: missing, negative and huge ids, duplicates, nulls, TTL."""
    from vivace import _core
    from vivace.features.online import online_dir

    store = make_store(tmp_path, n_entities=500, ttl="30m")
    df = pd.read_parquet(tmp_path / "stats.parquet")
    df["f1"] = pd.array(df["f1"].tolist()[:-1] + [None], dtype="Float32")  # null f1 for entity 499
    df.to_parquet(tmp_path / "stats.parquet")
    store.materialize(end=END)
    reader = store.online_reader(FEATURES)
    cache = _core.FeatureCache(str(online_dir(tmp_path / "home")))
    rng = np.random.default_rng(5)
    ids = np.concatenate([rng.integers(-5, 520, 200), [499, 7, 7, -1, 2**62, -2**63, 0]]).astype(np.int64)
    now_us = int((T0 + timedelta(minutes=60)).timestamp() * 1e6)  # rows older than 30 min are stale
    assert cache.indexed_rows("stats") == 0
    through_cursors = reader.get(ids, now_us)
    read_until_indexed(reader, ids, now_us, cache)
    values, found = reader.get(ids, now_us)
    np.testing.assert_array_equal(found, through_cursors[1])
    np.testing.assert_array_equal(values, through_cursors[0])  # NaNs compare equal here
    env = environment(online_dir(tmp_path / "home"))
    with env.begin() as txn:
        stored = txn.stat(env.open_db(b"v:stats", txn=txn, integerkey=True))["entries"]
    assert cache.indexed_rows("stats") == stored > 100  # the rows within the TTL when materialized
    assert 0 < through_cursors[1].sum() < len(ids)  # both fresh and stale or missing rows were read
    assert np.isnan(values[list(ids).index(499), 1]) and not np.isnan(values[list(ids).index(499), 0])
    for i in range(0, len(ids), 37):  # one by one (below the sorted-read size) agrees
        one, _ = reader.get(ids[i:i + 1], now_us)
        np.testing.assert_array_equal(one[0], values[i])


def read_until_indexed(reader, ids: np.ndarray, now_us: int, cache) -> None:
    """Batches on one snapshot until the background thread has indexed it."""
    deadline = time.monotonic() + 10
    while cache.indexed_rows("stats") == 0:
        assert time.monotonic() < deadline, "the snapshot was not indexed"
        reader.get(ids, now_us)
        time.sleep(0.001)


def test_a_write_outside_materialize_retires_the_row_index(tmp_path: Path) -> None:
    """The index is tied to the LMDB snapshot, not to the store's generation: a row put by
    any writer is read at once, and the new snapshot is indexed in turn."""
    from vivace import _core
    from vivace.features.online import online_dir

    store = make_store(tmp_path, n_entities=100)
    store.materialize(end=END)
    reader = store.online_reader(FEATURES)
    cache = _core.FeatureCache(str(online_dir(tmp_path / "home")))
    ids = np.arange(0, 100, 3, dtype=np.int64)
    now_us = int(END.timestamp() * 1e6)
    read_until_indexed(reader, ids, now_us, cache)
    before, _ = reader.get(ids, now_us)
    assert cache.indexed_rows("stats") == 100
    env = environment(online_dir(tmp_path / "home"))
    db = env.open_db(b"v:stats", integerkey=True)
    key = struct.pack("=q", 3)
    with env.begin(write=True) as txn:
        row = bytearray(txn.get(key, db=db))
        row[12:16] = struct.pack("<f", 1234.5)  # f0 of entity 3
        txn.put(key, bytes(row), db=db)
    assert read_generation(tmp_path / "home") == 1  # no new materialization
    through_cursors = reader.get(ids, now_us)  # the index of the old snapshot is dropped
    assert cache.indexed_rows("stats") == 0
    read_until_indexed(reader, ids, now_us, cache)
    for answer, found in through_cursors, reader.get(ids, now_us):  # then through the new index
        assert found.all() and answer[1, 0] == 1234.5
        np.testing.assert_array_equal(np.delete(answer, 1, axis=0), np.delete(before, 1, axis=0))
    assert cache.indexed_rows("stats") == 100


@pytest.mark.parametrize("cache", [0, 100])
def test_concurrent_readers_never_see_a_mixed_materialization(tmp_path: Path, cache: int) -> None:
    import threading

    store = make_store(tmp_path, n_entities=2000, cache=cache)
    store.materialize(end=END)
    reader = store.online_reader(FEATURES)
    now_us = int(END.timestamp() * 1e6)
    ids = np.arange(0, 2000, 7, dtype=np.int64)
    base = ids[:, None] + np.array([0.0, 0.1, 0.2], dtype=np.float32)
    stop = threading.Event()
    offsets_seen: list[set[float]] = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            while not stop.is_set():
                values, found = reader.get(ids, now_us)
                assert found.all()
                offsets_seen.append(set(np.round(values - base, 2).ravel().tolist()))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for offset in (1000.0, 2000.0):
        write_source(tmp_path / "stats.parquet", 2000, offset=offset)
        store.materialize(end=END)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    assert offsets_seen and all(len(s) == 1 for s in offsets_seen)  # one generation per batch
    final, _ = reader.get(ids, now_us)
    np.testing.assert_allclose(final, base + 2000.0, rtol=1e-6)


def test_serving_spec_of_a_feature_service(tmp_path: Path) -> None:
    from vivace.features import FeatureService

    store = make_store(tmp_path)
    store.apply([FeatureService("ranker", ["stats:f2", "stats:f0"])])
    store.materialize(end=END)
    spec = store.serving_spec("ranker")
    assert (spec.join_key, spec.features) == ("driver_id", ("stats:f2", "stats:f0"))
    values, found = spec.lookup.get(np.array([6]), int(END.timestamp() * 1e6))
    assert found.all() and values[0].tolist() == pytest.approx([6.2, 6.0])
    pd.DataFrame({"city": ["a"], "event_timestamp": [pd.Timestamp(T0)], "x": [1.0]}).to_parquet(tmp_path / "c.parquet")
    store.apply([Entity("city", "city", dtype="string"),
                 FeatureView("cities", "city", str(tmp_path / "c.parquet"), [Field("x", "float64")]),
                 FeatureService("mixed", ["stats:f0", "cities:x"]), FeatureService("by_city", ["cities:x"])])
    with pytest.raises(FeatureStoreError, match="spans entities"):
        store.serving_spec("mixed")
    with pytest.raises(FeatureStoreError, match="has string keys, serving needs int64"):
        store.serving_spec("by_city")
