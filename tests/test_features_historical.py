"""Point-in-time correct historical retrieval: one test per rule, plus cross-checks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vivace.cli import main as vivace_main
from vivace.features import (
    Entity, FeatureService, FeatureStore, FeatureStoreError, FeatureView, Field, SourceValidationError,
    UnknownFeatureError,
)

T0 = pd.Timestamp("2025-03-01 12:00:00", tz="UTC")
US = pd.Timedelta(microseconds=1)


def ts(minutes: float) -> pd.Timestamp:
    return T0 + pd.Timedelta(minutes=minutes)


def make_store(tmp_path: Path, rows: list[tuple], ttl: str = "1h", created: bool = True,
               extra_views: bool = False, key_dtype: str = "int64") -> FeatureStore:
    """rows: (driver_id, event minute, created minute, value)."""
    df = pd.DataFrame(rows, columns=["driver_id", "event_timestamp", "created", "value"])
    df["driver_id"] = df["driver_id"].astype("int64" if key_dtype == "int64" else str)
    df["event_timestamp"] = [ts(m) for m in df["event_timestamp"]]
    df["created"] = [ts(m) for m in df["created"]]
    df["value"] = df["value"].astype("float64")
    df.to_parquet(tmp_path / "stats.parquet")
    store = FeatureStore(tmp_path / "home")
    defs = [
        Entity("driver", "driver_id", dtype=key_dtype),
        FeatureView("stats", "driver", str(tmp_path / "stats.parquet"), [Field("value", "float64")], ttl=ttl,
                    created_timestamp_field="created" if created else None),
    ]
    if extra_views:
        pd.DataFrame({"driver_id": pd.Series([1, 2], dtype="int64"),
                      "event_timestamp": [ts(-30), ts(-30)], "value": [100.0, 200.0],
                      "rating": pd.Series([4.5, 3.5], dtype="float32")}).to_parquet(tmp_path / "profile.parquet")
        defs.append(FeatureView("profile", "driver", str(tmp_path / "profile.parquet"),
                                [Field("value", "float64"), Field("rating", "float32")]))
    store.apply(defs)
    return store


def entity_df(keys: list[int], times: list[pd.Timestamp]) -> pd.DataFrame:
    return pd.DataFrame({"driver_id": pd.Series(keys, dtype="int64"), "event_timestamp": times})


def test_latest_row_at_or_before_the_timestamp(tmp_path: Path) -> None:
    store = make_store(tmp_path, [(1, 0, 0, 1.0), (1, 10, 10, 2.0), (1, 20, 20, 3.0)])
    out = store.get_historical_features(entity_df([1, 1, 1, 1], [ts(9), ts(10), ts(19) , ts(25)]), ["stats:value"])
    assert out["value"].tolist() == [1.0, 2.0, 2.0, 3.0]  # event == row ts matches (inclusive)


def test_ttl_lower_bound_is_inclusive(tmp_path: Path) -> None:
    store = make_store(tmp_path, [(1, 0, 0, 1.0)], ttl="1h")
    times = [ts(60), ts(60) + US, ts(0) - US]
    out = store.get_historical_features(entity_df([1, 1, 1], times), ["stats:value"])
    assert out["value"].iloc[0] == 1.0          # exactly ts - ttl: kept
    assert np.isnan(out["value"].iloc[1])       # 1 µs older than the TTL: gone
    assert np.isnan(out["value"].iloc[2])       # before the first feature row


def test_zero_ttl_never_expires(tmp_path: Path) -> None:
    store = make_store(tmp_path, [(1, 0, 0, 1.0)], ttl="0")
    out = store.get_historical_features(entity_df([1], [ts(60 * 24 * 365)]), ["stats:value"])
    assert out["value"].tolist() == [1.0]


def test_ties_on_event_time_go_to_the_latest_created(tmp_path: Path) -> None:
    # Rows are written in an order where file order and created order disagree.
    store = make_store(tmp_path, [(1, 5, 9, 9.0), (1, 5, 7, 7.0), (1, 5, 8, 8.0)])
    out = store.get_historical_features(entity_df([1], [ts(6)]), ["stats:value"])
    assert out["value"].tolist() == [9.0]


def test_one_output_row_per_input_row_in_order(tmp_path: Path) -> None:
    store = make_store(tmp_path, [(1, 0, 0, 1.0), (2, 0, 0, 2.0)])
    edf = entity_df([2, 7, 1, 2, 1], [ts(1), ts(1), ts(-5), ts(1), ts(1)])
    edf.index = [50, 40, 30, 20, 10]
    out = store.get_historical_features(edf, ["stats:value"])
    assert list(out.index) == [50, 40, 30, 20, 10]
    assert out["driver_id"].tolist() == [2, 7, 1, 2, 1]
    np.testing.assert_array_equal(out["value"].to_numpy(), [2.0, np.nan, np.nan, 2.0, 1.0])


def test_naive_timestamps_are_utc(tmp_path: Path) -> None:
    store = make_store(tmp_path, [(1, 0, 0, 1.0), (1, 30, 30, 2.0)])
    aware = entity_df([1, 1], [ts(29), ts(31)])
    naive = aware.assign(event_timestamp=aware["event_timestamp"].dt.tz_localize(None))
    other_zone = aware.assign(event_timestamp=aware["event_timestamp"].dt.tz_convert("America/New_York"))
    expected = [1.0, 2.0]
    for frame in (aware, naive, other_zone):
        assert store.get_historical_features(frame, ["stats:value"])["value"].tolist() == expected


def test_mismatched_key_types_are_refused(tmp_path: Path) -> None:
    store = make_store(tmp_path, [(1, 0, 0, 1.0)])
    floats = pd.DataFrame({"driver_id": [1.0], "event_timestamp": [ts(1)]})
    with pytest.raises(FeatureStoreError, match="entity_df column 'driver_id' is double, entity 'driver' has int64"):
        store.get_historical_features(floats, ["stats:value"])
    strings = pd.DataFrame({"driver_id": ["1"], "event_timestamp": [ts(1)]})
    with pytest.raises(FeatureStoreError, match="is string, entity 'driver' has int64 keys"):
        store.get_historical_features(strings, ["stats:value"])
    not_time = pd.DataFrame({"driver_id": [1], "event_timestamp": ["2025-03-01"]})
    with pytest.raises(FeatureStoreError, match="'event_timestamp' is string, expected a timestamp"):
        store.get_historical_features(not_time, ["stats:value"])
    with pytest.raises(FeatureStoreError, match="entity_df has no column 'driver_id'"):
        store.get_historical_features(pd.DataFrame({"event_timestamp": [ts(1)]}), ["stats:value"])


def test_null_entity_keys_and_times_give_null_rows(tmp_path: Path) -> None:
    store = make_store(tmp_path, [(1, 0, 0, 1.0)])
    table = pa.table({"driver_id": pa.array([1, None, 1], pa.int64()),
                      "event_timestamp": pa.array([ts(1), ts(1), None], pa.timestamp("us", tz="UTC"))})
    out = store.get_historical_features(table, ["stats:value"])
    assert out["value"].to_pylist() == [1.0, None, None]


def test_null_and_nan_source_values(tmp_path: Path) -> None:
    store = make_store(tmp_path, [(1, 0, 0, np.nan), (2, 0, 0, 2.0)])
    t = pq.read_table(tmp_path / "stats.parquet")
    t = t.set_column(t.column_names.index("value"), "value", pa.array([None, 2.0], pa.float64()))
    pq.write_table(t, tmp_path / "stats.parquet")
    entities = pa.table({"driver_id": pa.array([1, 2, 3], pa.int64()),
                         "event_timestamp": pa.array([ts(1)] * 3, pa.timestamp("us", tz="UTC"))})
    out = store.get_historical_features(entities, ["stats:value"])
    assert out["value"].to_pylist() == [None, 2.0, None]


def test_arrow_in_arrow_out_and_full_names(tmp_path: Path) -> None:
    store = make_store(tmp_path, [(1, 0, 0, 1.0), (2, 0, 0, 2.0)], extra_views=True)
    table = pa.Table.from_pandas(entity_df([1, 2, 3], [ts(1)] * 3), preserve_index=False)
    out = store.get_historical_features(table, ["stats:value", "profile:*"], full_feature_names=True)
    assert isinstance(out, pa.Table)
    assert out.column_names == ["driver_id", "event_timestamp", "stats__value", "profile__value", "profile__rating"]
    assert out["stats__value"].to_pylist() == [1.0, 2.0, None]
    assert out["profile__value"].to_pylist() == [100.0, 200.0, None]
    assert out["profile__rating"].type == pa.float32()
    with pytest.raises(FeatureStoreError, match="output column 'value' already exists"):
        store.get_historical_features(table, ["stats:value", "profile:value"])


def test_unknown_features_are_refused(tmp_path: Path) -> None:
    store = make_store(tmp_path, [(1, 0, 0, 1.0)])
    with pytest.raises(UnknownFeatureError, match="unknown feature 'speed' in view 'stats'"):
        store.get_historical_features(entity_df([1], [ts(1)]), ["stats:speed"])
    with pytest.raises(UnknownFeatureError, match="unknown feature view 'trips'"):
        store.get_historical_features(entity_df([1], [ts(1)]), ["trips:value"])


def test_source_drift_after_apply_is_caught_at_read(tmp_path: Path) -> None:
    store = make_store(tmp_path, [(1, 0, 0, 1.0)])
    df = pd.read_parquet(tmp_path / "stats.parquet").assign(value=["high"])
    df.to_parquet(tmp_path / "stats.parquet")
    with pytest.raises(SourceValidationError, match="feature column 'value' is string in the source"):
        store.get_historical_features(entity_df([1], [ts(1)]), ["stats:value"])


def random_case(tmp_path: Path, seed: int, n_rows: int, n_entities: int,
                key_kind: str = "dense") -> tuple[FeatureStore, pd.DataFrame, pd.DataFrame]:
    """key_kind: dense int ids, sparse int ids (hash-coded path), or strings."""
    rng = np.random.default_rng(seed)
    scale = 10**12 if key_kind == "sparse" else 1
    # Coarse event times (whole minutes) so that ties and TTL edges happen often; distinct
    # created times so that every tie has one right answer.
    rows = [(int(k) * scale, int(m), int(c), float(v)) for k, m, c, v in zip(
        rng.integers(0, n_entities, n_rows), rng.integers(0, 200, n_rows), rng.permutation(n_rows),
        rng.standard_normal(n_rows), strict=True)]
    key_dtype = "string" if key_kind == "string" else "int64"
    store = make_store(tmp_path, rows, ttl="30m", key_dtype=key_dtype)
    edf = entity_df((rng.integers(-2, n_entities + 3, n_rows // 2) * scale).tolist(),
                    [ts(int(m)) for m in rng.integers(-10, 230, n_rows // 2)])
    if key_kind == "string":
        edf["driver_id"] = edf["driver_id"].astype(str)
    return store, pd.read_parquet(tmp_path / "stats.parquet"), edf


def brute_force(src: pd.DataFrame, edf: pd.DataFrame, ttl: pd.Timedelta) -> np.ndarray:
    """The point-in-time rules applied row by row: the reference for the joins."""
    expected = []
    for key, t in zip(edf["driver_id"], edf["event_timestamp"], strict=True):
        cand = src[(src.driver_id == key) & (src.event_timestamp <= t) & (src.event_timestamp >= t - ttl)]
        cand = cand.sort_values(["event_timestamp", "created"], kind="stable")
        expected.append(cand["value"].iloc[-1] if len(cand) else np.nan)
    return np.array(expected)


@pytest.mark.parametrize("key_kind", ["dense", "sparse", "string"])
def test_matches_brute_force(tmp_path: Path, key_kind: str) -> None:
    store, src, edf = random_case(tmp_path, seed=1, n_rows=2000, n_entities=20, key_kind=key_kind)
    out = store.get_historical_features(edf, ["stats:value"])
    np.testing.assert_array_equal(out["value"].to_numpy(), brute_force(src, edf, pd.Timedelta(minutes=30)))


def test_matches_duckdb_asof_join(tmp_path: Path) -> None:
    duckdb = pytest.importorskip("duckdb")
    store, src, edf = random_case(tmp_path, seed=2, n_rows=20000, n_entities=300)
    out = store.get_historical_features(edf, ["stats:value"])
    con = duckdb.connect()
    con.register("src", src)
    con.register("edf_numbered", edf.reset_index().rename(columns={"index": "rid"}))
    con.execute("""
        CREATE VIEW latest AS SELECT driver_id, event_timestamp AS fts, value FROM src
        QUALIFY row_number() OVER (PARTITION BY driver_id, event_timestamp ORDER BY created DESC) = 1""")
    joined = con.execute("""
        SELECT e.rid, e.event_timestamp - f.fts AS age, f.value FROM edf_numbered e
        ASOF LEFT JOIN latest f ON e.driver_id = f.driver_id AND e.event_timestamp >= f.fts
        ORDER BY e.rid""").df()
    expected = joined["value"].where(joined["age"] <= pd.Timedelta(minutes=30))
    np.testing.assert_array_equal(out["value"].to_numpy(), expected.to_numpy())


def test_cli_historical(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = make_store(tmp_path, [(1, 0, 0, 1.0), (2, 0, 0, 2.0)])
    store.apply([FeatureService("svc", ["stats:value"])])
    edf = entity_df([2, 1, 9], [ts(1)] * 3)
    edf.to_parquet(tmp_path / "entities.parquet")
    naive = edf.assign(event_timestamp=edf["event_timestamp"].dt.tz_localize(None))
    naive.to_csv(tmp_path / "entities.csv", index=False)
    home = str(tmp_path / "home")
    assert vivace_main(["--home", home, "features", "historical", str(tmp_path / "entities.parquet"),
                        "--features", "svc", "--out", str(tmp_path / "out.parquet")]) == 0
    assert "wrote 3 rows" in capsys.readouterr().out
    assert pq.read_table(tmp_path / "out.parquet")["value"].to_pylist() == [2.0, 1.0, None]
    assert vivace_main(["--home", home, "features", "historical", str(tmp_path / "entities.csv"),
                        "--features", "stats:value", "--out", str(tmp_path / "out.csv")]) == 0
    assert pd.read_csv(tmp_path / "out.csv")["value"].tolist()[:2] == [2.0, 1.0]
    assert vivace_main(["--home", home, "features", "historical", str(tmp_path / "entities.parquet"),
                        "--features", "stats:nope", "--out", str(tmp_path / "x.parquet")]) == 1
    assert "unknown feature 'nope'" in capsys.readouterr().err
