"""The feature registry: definitions applied to a Vivace home, kept in <home>/features/registry.json.

`apply` validates the whole batch (references, sources) before it writes anything, and
writes the file atomically (temporary file, fsync, rename) under an exclusive lock, so a
failed or killed apply leaves the previous registry intact.
"""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from .definitions import (
    Definition, Entity, FeatureService, FeatureView, entity_from_dict, service_from_dict,
    split_ref, to_dict, view_from_dict,
)
from .errors import FeatureDefinitionError, FeatureStoreError, UnknownFeatureError
from .sources import validate_source

REGISTRY_FORMAT = "vivace-feature-registry/1"
_SECTIONS = {Entity: "entities", FeatureView: "feature_views", FeatureService: "feature_services"}


class Catalog:
    """Registered entities, feature views and feature services of one Vivace home."""

    def __init__(self, home: str | Path):
        self.dir = Path(home) / "features"
        self.path = self.dir / "registry.json"
        self.entities: dict[str, Entity] = {}
        self.views: dict[str, FeatureView] = {}
        self.services: dict[str, FeatureService] = {}
        self.reload()

    def reload(self) -> None:
        """Re-read the registry file (another process may have applied definitions)."""
        if not self.path.exists():
            return
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise FeatureStoreError(f"feature registry {self.path} is unreadable: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != REGISTRY_FORMAT:
            raise FeatureStoreError(f"feature registry {self.path} is not a {REGISTRY_FORMAT} file")
        self.entities = {d["name"]: entity_from_dict(d) for d in doc.get("entities", [])}
        self.views = {d["name"]: view_from_dict(d) for d in doc.get("feature_views", [])}
        self.services = {d["name"]: service_from_dict(d) for d in doc.get("feature_services", [])}

    # ---- lookups ---------------------------------------------------------------------

    def entity(self, name: str) -> Entity:
        try:
            return self.entities[name]
        except KeyError:
            raise UnknownFeatureError(f"unknown entity {name!r} (registered: {sorted(self.entities)})") from None

    def view(self, name: str) -> FeatureView:
        try:
            return self.views[name]
        except KeyError:
            raise UnknownFeatureError(f"unknown feature view {name!r} (registered: {sorted(self.views)})") from None

    def service(self, name: str) -> FeatureService:
        try:
            return self.services[name]
        except KeyError:
            raise UnknownFeatureError(
                f"unknown feature service {name!r} (registered: {sorted(self.services)})") from None

    def resolve(self, features: str | FeatureService | Iterable[str]) -> list[tuple[FeatureView, str]]:
        """Feature references (a service, its name, or 'view:feature' / 'view:*' strings) → (view, feature)."""
        if isinstance(features, FeatureService):
            refs: Iterable[str] = features.features
        elif isinstance(features, str):
            refs = self.service(features).features if ":" not in features else [features]
        else:
            refs = features
        return _resolve_refs(refs, self.views)

    # ---- apply -----------------------------------------------------------------------

    def apply(self, definitions: Iterable[Definition]) -> list[str]:
        """Validate and register definitions (replacing same-named ones); return what was applied."""
        defs = list(definitions)
        with self._locked():
            self.reload()
            entities, views, services = dict(self.entities), dict(self.views), dict(self.services)
            for d in defs:
                section = {Entity: entities, FeatureView: views, FeatureService: services}.get(type(d))
                if section is None:
                    raise FeatureDefinitionError(f"cannot apply {d!r}: not an Entity, FeatureView or FeatureService")
                section[d.name] = d  # type: ignore[index]
            for v in views.values():
                if v.entity not in entities:
                    raise FeatureDefinitionError(
                        f"feature view {v.name!r} refers to unknown entity {v.entity!r} (known: {sorted(entities)})")
            for d in defs:
                if isinstance(d, FeatureView):
                    validate_source(d, entities[d.entity])
            for s in services.values():
                try:
                    _resolve_refs(s.features, views)
                except UnknownFeatureError as exc:
                    raise FeatureDefinitionError(f"feature service {s.name!r}: {exc}") from None
            self._write(entities, views, services)
            self.entities, self.views, self.services = entities, views, services
        return [f"{type(d).__name__} {d.name}" for d in defs]

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            lock = open(self.dir / "registry.lock", "a")
        except OSError as exc:
            raise FeatureStoreError(f"cannot write the feature registry under {self.dir}: {exc}") from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _write(self, entities: dict[str, Entity], views: dict[str, FeatureView],
               services: dict[str, FeatureService]) -> None:
        doc: dict[str, Any] = {
            "format": REGISTRY_FORMAT,
            "entities": [to_dict(e) for e in entities.values()],
            "feature_views": [to_dict(v) for v in views.values()],
            "feature_services": [to_dict(s) for s in services.values()],
        }
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".registry-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _resolve_refs(refs: Iterable[str], views: dict[str, FeatureView]) -> list[tuple[FeatureView, str]]:
    out: list[tuple[FeatureView, str]] = []
    for ref in refs:
        view_name, feature = split_ref(ref)
        view = views.get(view_name)
        if view is None:
            raise UnknownFeatureError(f"unknown feature view {view_name!r} in {ref!r} (registered: {sorted(views)})")
        if feature == "*":
            out.extend((view, f) for f in view.feature_names)
        elif feature in view.feature_names:
            out.append((view, feature))
        else:
            raise UnknownFeatureError(
                f"unknown feature {feature!r} in view {view_name!r} (features: {view.feature_names})")
    if not out:
        raise UnknownFeatureError("no features requested")
    return out
