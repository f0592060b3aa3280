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
from typing import Annotated, Any, Callable, Optional, TypeVar, Union

import msgspec
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


# The YAML (and registry.json) document, typed: msgspec checks its structure and names
# the path of a bad value; the dataclasses above then check what the values mean.
class _FieldDoc(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    dtype: str = "float32"
    description: str = ""


class _EntityDoc(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    join_key: str
    dtype: str = "int64"
    description: str = ""


class _ViewDoc(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    entity: str
    source: Annotated[str, msgspec.Meta(min_length=1)]
    schema: Optional[list[_FieldDoc]] = None
    ttl: Union[int, float, str, None] = None
    timestamp_field: str = "event_timestamp"
    created_timestamp_field: Optional[str] = None
    tags: dict[str, Any] = msgspec.field(default_factory=dict)
    description: str = ""


class _ServiceDoc(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    features: list[str]
    description: str = ""
    tags: dict[str, Any] = msgspec.field(default_factory=dict)


class _Document(msgspec.Struct, forbid_unknown_fields=True):
    entities: Optional[list[_EntityDoc]] = None
    feature_views: Optional[list[_ViewDoc]] = None
    feature_services: Optional[list[_ServiceDoc]] = None


_D = TypeVar("_D")


def _convert(data: Any, doc_type: type[_D], where: str) -> _D:
    try:
        return msgspec.convert(data, doc_type)
    except msgspec.ValidationError as exc:
        raise FeatureDefinitionError(f"{where}: {exc}") from None


def _at(path: str, build: Callable[..., _D], *args: Any) -> _D:
    """build(*args); the definition's own checks gain the document path in their errors."""
    try:
        return build(*args)
    except FeatureDefinitionError as exc:
        raise FeatureDefinitionError(f"{exc} - at `{path}`") from None


def _entity(doc: _EntityDoc) -> Entity:
    return Entity(doc.name, doc.join_key, doc.dtype, doc.description)


def _view(doc: _ViewDoc, base_dir: Path | None, path: str) -> FeatureView:
    schema = [_at(f"{path}.schema[{i}]", Field, f.name, f.dtype, f.description) for i, f in enumerate(doc.schema or [])]
    source = doc.source
    if base_dir is not None and not Path(source).is_absolute():
        source = str((base_dir / source).resolve())
    return _at(path, FeatureView, doc.name, doc.entity, source, tuple(schema), doc.ttl, doc.timestamp_field,
               doc.created_timestamp_field, doc.tags, doc.description)


def _service(doc: _ServiceDoc) -> FeatureService:
    return FeatureService(doc.name, tuple(doc.features), doc.description, doc.tags)


def entity_from_dict(data: dict[str, Any]) -> Entity:
    return _at("$", _entity, _convert(data, _EntityDoc, "entity"))


def view_from_dict(data: dict[str, Any], base_dir: Path | None = None) -> FeatureView:
    return _view(_convert(data, _ViewDoc, "feature view"), base_dir, "$")


def service_from_dict(data: dict[str, Any]) -> FeatureService:
    return _at("$", _service, _convert(data, _ServiceDoc, "feature service"))


def load_yaml(path: str | Path) -> list[Definition]:
    """Definitions from a YAML file; relative sources are resolved against the file's folder.

    Errors name the file and the path inside it, e.g. `$.feature_views[0].schema[1]`."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FeatureDefinitionError(f"definition file {path} not found") from None
    except yaml.YAMLError as exc:
        raise FeatureDefinitionError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise FeatureDefinitionError(f"{path}: expected a mapping with entities/feature_views/feature_services")
    doc = _convert(data, _Document, str(path))
    base = path.resolve().parent
    defs: list[Definition] = []
    try:
        for i, e in enumerate(doc.entities or []):
            defs.append(_at(f"$.entities[{i}]", _entity, e))
        for i, v in enumerate(doc.feature_views or []):
            defs.append(_view(v, base, f"$.feature_views[{i}]"))
        for i, s in enumerate(doc.feature_services or []):
            defs.append(_at(f"$.feature_services[{i}]", _service, s))
    except FeatureDefinitionError as exc:
        raise FeatureDefinitionError(f"{path}: {exc}") from None
    if not defs:
        raise FeatureDefinitionError(f"{path}: defines nothing")
    return defs
