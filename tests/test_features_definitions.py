"""Feature definitions: Python and YAML forms, `vivace features apply|list|show`, validation."""
from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest

from vivace.cli import main as vivace_main
from vivace.features import (
    Entity, FeatureDefinitionError, FeatureService, FeatureStore, FeatureView, Field, SourceValidationError,
    UnknownFeatureError, load_yaml, parse_ttl,
)

YAML = """
entities:
  - {name: driver, join_key: driver_id, dtype: int64, description: a driver}
feature_views:
  - name: driver_stats
    entity: driver
    source: stats.parquet
    timestamp_field: event_timestamp
    created_timestamp_field: created
    ttl: 2h
    schema:
      - {name: conv_rate, dtype: float32, description: conversion rate}
      - {name: trips, dtype: int64}
      - {name: city, dtype: string}
    tags: {team: rides}
    description: hourly driver statistics
feature_services:
  - {name: ranker, features: ["driver_stats:conv_rate", "driver_stats:trips"]}
"""


def write_source(path: Path, **overrides) -> Path:
    df = pd.DataFrame({
        "driver_id": pd.Series([1, 2, 1], dtype="int64"),
        "event_timestamp": pd.to_datetime(["2025-01-01 00:00", "2025-01-01 01:00", "2025-01-01 02:00"], utc=True),
        "created": pd.to_datetime(["2025-01-01 00:00", "2025-01-01 01:00", "2025-01-01 02:00"], utc=True),
        "conv_rate": pd.Series([0.5, 0.25, 0.75], dtype="float32"),
        "trips": pd.Series([3, 4, 5], dtype="int64"),
        "city": ["a", "b", "c"],
    })
    for name, value in overrides.items():
        if value is None:
            df = df.drop(columns=[name])
        else:
            df[name] = value
    df.to_parquet(path)
    return path


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    write_source(tmp_path / "stats.parquet")
    (tmp_path / "features.yaml").write_text(YAML)
    return tmp_path


def test_yaml_apply_registers_definitions(repo: Path) -> None:
    store = FeatureStore(repo / "home")
    applied = store.apply(repo / "features.yaml")
    assert applied == ["Entity driver", "FeatureView driver_stats", "FeatureService ranker"]
    view = FeatureStore(repo / "home").get_feature_view("driver_stats")  # re-read from disk
    assert view.ttl == timedelta(hours=2)
    assert view.source == str(repo / "stats.parquet")  # resolved against the YAML's folder
    assert view.created_timestamp_field == "created"
    assert view.tags == {"team": "rides"}
    assert [f.dtype for f in view.schema] == ["float32", "int64", "string"]
    doc = json.loads((repo / "home" / "features" / "registry.json").read_text())
    assert doc["format"] == "vivace-feature-registry/1"


def test_python_api_matches_yaml(repo: Path) -> None:
    driver = Entity("driver", join_key="driver_id")
    view = FeatureView(
        name="driver_stats", entity=driver, source=str(repo / "stats.parquet"),
        schema=[Field("conv_rate", "float32", "conversion rate"), Field("trips", "int64"), Field("city", "string")],
        ttl="2h", created_timestamp_field="created", tags={"team": "rides"}, description="hourly driver statistics",
    )
    yaml_defs = load_yaml(repo / "features.yaml")
    assert view == yaml_defs[1]
    store = FeatureStore(repo / "home")
    store.apply([driver, view, FeatureService("ranker", ["driver_stats:*"])])
    assert [v for v, _ in store.catalog.resolve("ranker")][0].name == "driver_stats"
    assert [f for _, f in store.catalog.resolve("ranker")] == ["conv_rate", "trips", "city"]


def test_cli_apply_list_show(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = str(repo / "home")
    assert vivace_main(["--home", home, "features", "apply", str(repo / "features.yaml")]) == 0
    assert vivace_main(["--home", home, "features", "list"]) == 0
    out = capsys.readouterr().out
    assert "driver_stats" in out and "ranker" in out and "join key driver_id" in out
    assert vivace_main(["--home", home, "features", "show", "driver_stats"]) == 0
    out = capsys.readouterr().out
    assert "transformation: none (column 'conv_rate' of the source)" in out
    assert "city" in out and "offline only" in out
    assert vivace_main(["--home", home, "features", "show", "ranker"]) == 0
    assert "driver_stats:trips" in capsys.readouterr().out
    assert vivace_main(["--home", home, "features", "show", "nope"]) == 1
    assert "no entity, feature view or feature service named 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ({"conv_rate": None}, "feature column 'conv_rate' is missing"),
    ({"conv_rate": ["x", "y", "z"]}, "feature column 'conv_rate' is string in the source, the view declares float32"),
    ({"driver_id": [1.0, 2.0, 3.0]}, "join key column 'driver_id' is double, entity 'driver' declares int64"),
    ({"event_timestamp": ["2025", "2025", "2025"]}, "event timestamp column 'event_timestamp' is string"),
    ({"created": None}, "created timestamp column 'created' is missing"),
])
def test_schema_drift_is_refused_and_nothing_is_written(repo: Path, override: dict, message: str) -> None:
    store = FeatureStore(repo / "home")
    store.apply(repo / "features.yaml")
    before = (repo / "home" / "features" / "registry.json").read_text()
    write_source(repo / "stats.parquet", **override)
    with pytest.raises(SourceValidationError, match=message):
        store.apply(repo / "features.yaml")
    assert (repo / "home" / "features" / "registry.json").read_text() == before


def test_empty_source_is_refused(repo: Path) -> None:
    df = pd.read_parquet(repo / "stats.parquet").iloc[:0]
    df.to_parquet(repo / "stats.parquet")
    with pytest.raises(SourceValidationError, match=r"the source is empty \(0 rows\)"):
        FeatureStore(repo / "home").apply(repo / "features.yaml")
    assert not (repo / "home" / "features" / "registry.json").exists()


def test_missing_and_corrupt_sources(repo: Path) -> None:
    (repo / "stats.parquet").unlink()
    with pytest.raises(SourceValidationError, match="file not found"):
        FeatureStore(repo / "home").apply(repo / "features.yaml")
    (repo / "stats.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(SourceValidationError, match="not a readable parquet file"):
        FeatureStore(repo / "home").apply(repo / "features.yaml")


def test_bad_references(repo: Path) -> None:
    store = FeatureStore(repo / "home")
    text = YAML.replace("entity: driver\n", "entity: rider\n")
    (repo / "bad.yaml").write_text(text)
    with pytest.raises(FeatureDefinitionError, match="unknown entity 'rider'"):
        store.apply(repo / "bad.yaml")
    (repo / "bad.yaml").write_text(YAML.replace("driver_stats:trips", "driver_stats:speed"))
    with pytest.raises(FeatureDefinitionError, match="unknown feature 'speed' in view 'driver_stats'"):
        store.apply(repo / "bad.yaml")
    store.apply(repo / "features.yaml")
    with pytest.raises(UnknownFeatureError, match="unknown feature view 'nope'"):
        store.catalog.resolve(["nope:x"])
    with pytest.raises(UnknownFeatureError, match="unknown feature service 'nope'"):
        store.catalog.resolve("nope")


@pytest.mark.parametrize("text, message", [
    ("entities: [", "not valid YAML"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("views: []\n", "unknown field `views`"),
    ("entities:\n  - {name: d, join_key: id, dtype: float64}\n", r"join key type 'float64'.* - at `\$.entities\[0\]`"),
    ("entities:\n  - {name: d, join_key: id, colour: red}\n", r"unknown field `colour` - at `\$.entities\[0\]`"),
    ("entities:\n  - {name: 'bad name', join_key: id}\n", "must match"),
    ("entities:\n  - {join_key: id}\n", r"missing required field `name` - at `\$.entities\[0\]`"),
    ("entities: {name: d}\n", r"Expected `array | null`, got `object` - at `\$.entities`"),
    ("feature_services:\n  - {name: s, features: [nocolon]}\n",
     r"must be 'view:feature' - at `\$.feature_services\[0\]`"),
    ("feature_services:\n  - {name: s, features: [v:a, 3]}\n",
     r"Expected `str`, got `int` - at `\$.feature_services\[0\].features\[1\]`"),
    ("feature_views:\n  - {name: v, entity: d, source: s.parquet, ttl: true, schema: [{name: a}]}\n",
     r"got `bool` - at `\$.feature_views\[0\].ttl`"),
    ("feature_views:\n  - {name: v, entity: d, source: s.parquet, ttl: soon, schema: [{name: a}]}\n",
     r"ttl 'soon' is not a duration.* - at `\$.feature_views\[0\]`"),
    ("feature_views:\n  - {name: v, entity: d, source: s.parquet, schema: [{name: a}, {name: b, dtype: float16}]}\n",
     r"type 'float16' is not one of .* - at `\$.feature_views\[0\].schema\[1\]`"),
    ("feature_views:\n  - {name: v, entity: d, schema: [{name: a}]}\n",
     r"missing required field `source` - at `\$.feature_views\[0\]`"),
])
def test_malformed_yaml(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "f.yaml").write_text(text)
    with pytest.raises(FeatureDefinitionError, match=message):
        load_yaml(tmp_path / "f.yaml")


def test_ttl_forms() -> None:
    assert parse_ttl("90s") == timedelta(seconds=90)
    assert parse_ttl("15m") == timedelta(minutes=15)
    assert parse_ttl("1w") == timedelta(weeks=1)
    assert parse_ttl(3600) == timedelta(hours=1)
    assert parse_ttl(None) == timedelta(0)
    for bad in ("soon", -1, True, "1y"):
        with pytest.raises(FeatureDefinitionError):
            parse_ttl(bad)


def test_unwritable_home_is_a_clear_error(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = repo / "home_is_a_file"
    home.write_text("not a folder")
    assert vivace_main(["--home", str(home), "features", "apply", str(repo / "features.yaml")]) == 1
    assert "cannot write the feature registry" in capsys.readouterr().err
