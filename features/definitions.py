"""Feature definitions: entities, feature views and feature services, as Feast users know them.

Definitions are plain dataclasses, written in Python or in a YAML file:

    entities:
      - {name: driver, join_key: driver_id, dtype: int64}
    feature_views:
      - name: driver_stats
        entity: driver
        source: driver_stats.parquet      # relative to the YAML file
        timestamp_field: event_timestamp
        created_timestamp_field: created  # optional: breaks ties on event time
        ttl: 1d                           # 0 = never expires; s, m, h, d, w suffixes
        schema:
          - {name: conv_rate, dtype: float32, description: conversion rate}
        tags: {team: rides}
        description: hourly driver statistics
    feature_services:
      - {name: driver_model, features: ["driver_stats:conv_rate"]}

A feature is a column of its view's parquet source, taken as is (no transformation);
`vivace features show` says so for each one.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Union

import yaml

from .errors import FeatureDefinitionError

# Join key types an entity may declare, and feature column types a view may declare.
KEY_DTYPES = ("int64", "string")
FEATURE_DTYPES = ("float32", "float64", "int32", "int64", "bool", "string")
# Feature types the online store holds (as float32); string features are offline only.
ONLINE_DTYPES = ("float32", "float64", "int32", "int64", "bool")

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TTL = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
_TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise FeatureDefinitionError(f"{kind} name {name!r} must match [A-Za-z_][A-Za-z0-9_]*")


def parse_ttl(value: Union[int, float, str, timedelta, None]) -> timedelta:
    """A TTL from seconds, a timedelta or a string such as '90s', '15m', '2h', '1d', '1w'."""
    if value is None:
        return timedelta(0)
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise FeatureDefinitionError(f"ttl {value!r} is not a duration")
    elif isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (m := _TTL.match(value)):
        seconds = int(m.group(1)) * _TTL_UNITS[m.group(2)]
    else:
        raise FeatureDefinitionError(f"ttl {value!r} is not a duration (e.g. 3600, '90s', '2h', '1d')")
    if seconds < 0:
        raise FeatureDefinitionError(f"ttl {value!r} is negative")
    return timedelta(seconds=seconds)


@dataclass(frozen=True)
class Entity:
    """A thing features describe, identified by its join key column (e.g. driver_id)."""

    name: str
    join_key: str
    dtype: str = "int64"
    description: str = ""

    def __post_init__(self) -> None:
        _check_name("entity", self.name)
        _check_name("join key", self.join_key)
        if self.dtype not in KEY_DTYPES:
            raise FeatureDefinitionError(
                f"entity {self.name!r}: join key type {self.dtype!r} is not one of {KEY_DTYPES}")


@dataclass(frozen=True)
class Field:
    """One feature column of a view's source."""

    name: str
    dtype: str = "float32"
    description: str = ""

    def __post_init__(self) -> None:
        _check_name("feature", self.name)
        if self.dtype not in FEATURE_DTYPES:
            raise FeatureDefinitionError(
                f"feature {self.name!r}: type {self.dtype!r} is not one of {FEATURE_DTYPES}")


@dataclass(frozen=True)
class FeatureView:
    """Features of one entity read from a parquet source, valid for `ttl` after their event time."""

    name: str
    entity: str
    source: str
    schema: tuple[Field, ...]
    ttl: timedelta = timedelta(0)
    timestamp_field: str = "event_timestamp"
    created_timestamp_field: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        _check_name("feature view", self.name)
        if isinstance(self.entity, Entity):
            object.__setattr__(self, "entity", self.entity.name)
        object.__setattr__(self, "schema", tuple(self.schema))
        object.__setattr__(self, "ttl", parse_ttl(self.ttl))
        object.__setattr__(self, "source", str(self.source))
        if not self.schema:
            raise FeatureDefinitionError(f"feature view {self.name!r} declares no features")
        for f in self.schema:
            if not isinstance(f, Field):
                raise FeatureDefinitionError(f"feature view {self.name!r}: schema entries must be Field, got {f!r}")
        names = [f.name for f in self.schema]
        if len(set(names)) != len(names):
            raise FeatureDefinitionError(f"feature view {self.name!r} declares a feature twice: {names}")
        reserved = {self.timestamp_field, self.created_timestamp_field}
        if clash := reserved.intersection(names):
            raise FeatureDefinitionError(
                f"feature view {self.name!r}: {sorted(clash)} is a timestamp column, not a feature")

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.schema]

    @property
    def ttl_seconds(self) -> float:
        return self.ttl.total_seconds()

    def field(self, name: str) -> Field:
        for f in self.schema:
            if f.name == name:
                return f
        raise KeyError(name)


@dataclass(frozen=True)
class FeatureService:
    """A named list of `view:feature` references (or `view:*`), e.g. the inputs of one model."""

    name: str
    features: tuple[str, ...]
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_name("feature service", self.name)
        object.__setattr__(self, "features", tuple(self.features))
        if not self.features:
            raise FeatureDefinitionError(f"feature service {self.name!r} lists no features")
        for ref in self.features:
            split_ref(ref)


Definition = Union[Entity, FeatureView, FeatureService]


def split_ref(ref: str) -> tuple[str, str]:
    """'view:feature' -> ('view', 'feature'); anything else is refused."""
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise FeatureDefinitionError(f"feature reference {ref!r} must be 'view:feature'")
    view, feature = ref.split(":")
    if not view or not feature:
        raise FeatureDefinitionError(f"feature reference {ref!r} must be 'view:feature'")
    return view, feature


# ---- dict / YAML forms ------------------------------------------------------------------

def to_dict(defn: Definition) -> dict[str, Any]:
    """The JSON/YAML form of a definition (TTL in seconds)."""
    d = asdict(defn)
    if isinstance(defn, FeatureView):
        d["ttl"] = defn.ttl_seconds
        d["schema"] = [asdict(f) for f in defn.schema]
    if isinstance(defn, FeatureService):
        d["features"] = list(defn.features)
    return d


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise FeatureDefinitionError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = set(cls.__dataclass_fields__)
    unknown = set(data) - known
    if unknown:
        raise FeatureDefinitionError(f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(known)})")
    try:
        return cls(**data)
    except TypeError as exc:
        raise FeatureDefinitionError(f"{where}: {exc}") from None


def entity_from_dict(data: dict[str, Any]) -> Entity:
    return _build(Entity, data, f"entity {data.get('name', '?') if isinstance(data, dict) else '?'}")


def view_from_dict(data: dict[str, Any], base_dir: Path | None = None) -> FeatureView:
    where = f"feature view {data.get('name', '?') if isinstance(data, dict) else '?'}"
    if not isinstance(data, dict):
        raise FeatureDefinitionError(f"{where}: expected a mapping")
    data = dict(data)
    schema = data.get("schema") or []
    if not isinstance(schema, list):
        raise FeatureDefinitionError(f"{where}: schema must be a list of fields")
    data["schema"] = [_build(Field, f, f"{where}, schema entry {i}") for i, f in enumerate(schema)]
    source = data.get("source")
    if not isinstance(source, str) or not source:
        raise FeatureDefinitionError(f"{where}: source must be a parquet file path")
    if base_dir is not None and not Path(source).is_absolute():
        data["source"] = str((base_dir / source).resolve())
    return _build(FeatureView, data, where)


def service_from_dict(data: dict[str, Any]) -> FeatureService:
    return _build(FeatureService, data, f"feature service {data.get('name', '?') if isinstance(data, dict) else '?'}")


def load_yaml(path: str | Path) -> list[Definition]:
    """Definitions from a YAML file; relative sources are resolved against the file's folder."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FeatureDefinitionError(f"definition file {path} not found") from None
    except yaml.YAMLError as exc:
        raise FeatureDefinitionError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise FeatureDefinitionError(f"{path}: expected a mapping with entities/feature_views/feature_services")
    unknown = set(doc) - {"entities", "feature_views", "feature_services"}
    if unknown:
        raise FeatureDefinitionError(f"{path}: unknown top-level keys {sorted(unknown)}")
    base = path.resolve().parent
    defs: list[Definition] = []
    for item in _list(doc, "entities", path):
        defs.append(entity_from_dict(item))
    for item in _list(doc, "feature_views", path):
        defs.append(view_from_dict(item, base))
    for item in _list(doc, "feature_services", path):
        defs.append(service_from_dict(item))
    if not defs:
        raise FeatureDefinitionError(f"{path}: defines nothing")
    return defs


def _list(doc: dict[str, Any], key: str, path: Path) -> Iterable[Any]:
    items = doc.get(key) or []
    if not isinstance(items, list):
        raise FeatureDefinitionError(f"{path}: {key} must be a list")
    return items
