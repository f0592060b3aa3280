"""FeatureStore: the one object users hold — definitions, training sets, materialization, online reads."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import numpy as np
import pandas as pd
import pyarrow as pa

from .catalog import Catalog
from .definitions import Definition, Entity, FeatureService, FeatureView, load_yaml
from .errors import FeatureStoreError, OnlineStoreError
from .historical import EntityFrame, asof_match, entity_columns, join, take_rows
from .online import OnlineWriter, ProgressFn, ViewResult, online_dir, online_features, to_us
from .pit_index import load_view_index

FeatureRefs = Union[str, FeatureService, Sequence[str]]


@dataclass(frozen=True)
class ServingSpec:
    """What a server needs to score a model from entity ids alone (see `FeatureStore.serving_spec`)."""

    service: str
    join_key: str                  # name of the INT64 request input carrying the entity ids
    features: tuple[str, ...]      # 'view:feature', in the column order of the lookup's output
    lookup: Any                    # vivace._core.FeatureLookup: get / lookup_into, usable from C++


class FeatureStore:
    """The feature store of a Vivace home (definitions in <home>/features, online store in <home>/online)."""

    def __init__(self, home: str | Path = ".vivace", online_cache_capacity: int = 0):
        self.home = Path(home).resolve()
        self.catalog = Catalog(self.home)
        self.online_cache_capacity = online_cache_capacity
        self._lookups: dict[str | tuple[str, ...], object] = {}
        self._cache: object | None = None
        self.pit_index_dir = self.catalog.dir / "pit_index"  # sorted sources for historical joins

    # ---- definitions -----------------------------------------------------------------

    def apply(self, definitions: Iterable[Definition] | str | Path) -> list[str]:
        """Register definitions (objects, or a YAML file path) after validating them against their sources.

        Each applied view's source is also sorted into its point-in-time index now, so that
        the first historical join of a later process does not pay for it.
        """
        defs = load_yaml(definitions) if isinstance(definitions, (str, Path)) else list(definitions)
        applied = self.catalog.apply(defs)
        self._lookups.clear()  # a service may now name other features
        for view in (d for d in defs if isinstance(d, FeatureView)):
            try:
                load_view_index(view, self.catalog.entity(view.entity), self.pit_index_dir)
            except (FeatureStoreError, pa.ArrowException) as exc:
                # The definitions are registered (and valid); each historical join of this
                # view will raise the same error, so say it now without failing apply.
                warnings.warn(f"feature view {view.name!r}: point-in-time index not built: {exc}", stacklevel=2)
        return applied

    def list_entities(self) -> list[Entity]:
        return list(self.catalog.entities.values())

    def list_feature_views(self) -> list[FeatureView]:
        return list(self.catalog.views.values())

    def list_feature_services(self) -> list[FeatureService]:
        return list(self.catalog.services.values())

    def get_entity(self, name: str) -> Entity:
        return self.catalog.entity(name)

    def get_feature_view(self, name: str) -> FeatureView:
        return self.catalog.view(name)

    def get_feature_service(self, name: str) -> FeatureService:
        return self.catalog.service(name)

    # ---- offline ---------------------------------------------------------------------

    def get_historical_features(self, entity_df: EntityFrame, features: FeatureRefs, *,
                                timestamp_column: str = "event_timestamp",
                                full_feature_names: bool = False) -> EntityFrame:
        """Point-in-time correct join of features onto entity rows (see features/historical.py).

        entity_df: pandas DataFrame or Arrow Table with each view's join key column and a
        timestamp column (naive timestamps are UTC). Returns the same type with one column
        per feature (named `feature`, or `view__feature` with full_feature_names), one row
        per input row, in input order; nulls where nothing matches.
        """
        if not isinstance(entity_df, (pd.DataFrame, pa.Table)):
            raise FeatureStoreError(
                f"entity_df must be a pandas DataFrame or an Arrow Table, got {type(entity_df).__name__}")
        resolved = self.catalog.resolve(features)
        existing = set(entity_df.columns if isinstance(entity_df, pd.DataFrame) else entity_df.column_names)
        by_view: dict[str, tuple[FeatureView, list[str]]] = {}
        for view, feature in resolved:
            by_view.setdefault(view.name, (view, []))[1].append(feature)
        columns: list[tuple[str, pa.Array | pa.ChunkedArray]] = []
        for view, feats in by_view.values():
            entity = self.catalog.entity(view.entity)
            keys, ts_us = entity_columns(entity_df, entity, timestamp_column)
            index = load_view_index(view, entity, self.pit_index_dir)
            matches = asof_match(index, keys, ts_us, int(view.ttl.total_seconds() * 1_000_000))
            for f in feats:
                name = f"{view.name}__{f}" if full_feature_names else f
                if name in existing:
                    raise FeatureStoreError(
                        f"output column {name!r} already exists (in entity_df or from another view): "
                        "use full_feature_names=True")
                existing.add(name)
                columns.append((name, take_rows(index.features, f, matches)))
        return join(entity_df, columns)

    # ---- online ----------------------------------------------------------------------

    def materialize(self, start: datetime | None = None, end: datetime | None = None,
                    views: Sequence[str] | None = None, *, incremental: bool = False,
                    rebuild: bool = False, progress: ProgressFn | None = None) -> list[ViewResult]:
        """Write the latest in-TTL feature values per entity to the online store, atomically.

        Naive datetimes are UTC. See OnlineWriter.materialize for the window rules.
        """
        chosen = [self.catalog.view(v) for v in views] if views else list(self.catalog.views.values())
        if not chosen:
            raise FeatureStoreError("no feature views registered: run `vivace features apply` first")
        plan = [(v, self.catalog.entity(v.entity)) for v in chosen]
        return OnlineWriter(self.home).materialize(plan, start=start, end=end, incremental=incremental,
                                                   rebuild=rebuild, progress=progress)

    def materialize_incremental(self, end: datetime | None = None, views: Sequence[str] | None = None,
                                progress: ProgressFn | None = None) -> list[ViewResult]:
        """Materialize each view from where its last materialization ended up to `end` (default now)."""
        return self.materialize(end=end, views=views, incremental=True, progress=progress)

    def online_reader(self, features: FeatureRefs):
        """The C++ lookup for a fixed list of features: `.get(entity_ids) -> (values, found)`.

        Built once per feature list and reused; `.lookup_into(ids, out, found)` writes into
        preallocated arrays. Raises OnlineStoreError for a missing/old store or unknown view.
        """
        key = _lookup_key(features)
        lookup = self._lookups.get(key)
        if lookup is not None:
            return lookup
        from vivace import _core

        resolved = self.catalog.resolve(features)
        for view, feature in resolved:
            if feature not in online_features(view):
                raise FeatureStoreError(
                    f"feature {view.name}:{feature} is {view.field(feature).dtype}: "
                    "only numeric features are served online")
        try:
            if self._cache is None:
                self._cache = _core.FeatureCache(str(online_dir(self.home)), self.online_cache_capacity)
            lookup = _core.FeatureLookup(self._cache, [(v.name, f) for v, f in resolved])
        except _core.FeatureCacheError as exc:
            raise OnlineStoreError(str(exc)) from None
        self._lookups[key] = lookup
        return lookup

    def serving_spec(self, service: str | FeatureService) -> ServingSpec:
        """The online lookup of a feature service whose views share one int64 entity.

        A model package that declares this service can then be called with only the
        entity's join key; the engine passes the ids to `spec.lookup` in its batch path.
        """
        svc = service if isinstance(service, FeatureService) else self.catalog.service(service)
        resolved = self.catalog.resolve(svc)
        entities = {view.entity for view, _ in resolved}
        if len(entities) != 1:
            raise FeatureStoreError(
                f"feature service {svc.name!r} spans entities {sorted(entities)}: serving by id needs exactly one")
        entity = self.catalog.entity(entities.pop())
        if entity.dtype != "int64":
            raise FeatureStoreError(
                f"feature service {svc.name!r}: entity {entity.name!r} has {entity.dtype} keys, serving needs int64")
        return ServingSpec(svc.name, entity.join_key, tuple(f"{v.name}:{f}" for v, f in resolved),
                           self.online_reader(svc))

    def get_online_features(self, features: FeatureRefs, entity_ids, *,
                            now: datetime | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Latest materialized values for int64 entity ids: (float32 [n, F], found bool [n]).

        Columns follow `features` in order. NaN where the entity is unknown, its row is older
        than the view's TTL (checked now, against the clock or `now`), or the value is null;
        found[i] is False unless entity i has a fresh row in every view requested.
        """
        # The hot path: a feature list seen before, as a service name, tuple or list (no
        # exception on the way: a list's lookup costs one tuple() more than a tuple's).
        kind = features.__class__
        if kind is not str and kind is not tuple:
            features = _lookup_key(features)  # once: a generator is read a single time
        lookup = self._lookups.get(features)
        if lookup is None:
            lookup = self.online_reader(features)
        if now is None:
            return lookup.get(entity_ids)  # type: ignore[attr-defined]
        return lookup.get(entity_ids, to_us(now))  # type: ignore[attr-defined]


def _lookup_key(features: FeatureRefs) -> str | tuple[str, ...]:
    if isinstance(features, FeatureService):
        return features.name
    return features if isinstance(features, str) else tuple(features)
