"""vivace.features: a feature store as Feast users know it, on embedded parts.

Entities, feature views over parquet sources and feature services are registered in the
Vivace home; `FeatureStore.get_historical_features` builds point-in-time correct training
sets; `materialize` writes the latest values to an LMDB online store that the C++ core
(`vivace._core.FeatureLookup`) reads for serving.
"""
from __future__ import annotations

import importlib
from typing import Any

from .errors import (
    FeatureDefinitionError, FeatureStoreError, OnlineStoreError, SourceValidationError, UnknownFeatureError,
)

# Loaded on first use: the store pulls in pandas and pyarrow, which the CLI and the
# server must not pay for at start-up unless a feature store is actually used.
_LAZY = {
    "Entity": "definitions", "FeatureService": "definitions", "FeatureView": "definitions",
    "Field": "definitions", "load_yaml": "definitions", "parse_ttl": "definitions",
    "FeatureStore": "store", "ServingSpec": "store",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)

__all__ = [
    "Entity", "FeatureService", "FeatureView", "Field", "FeatureStore", "load_yaml", "parse_ttl",
    "FeatureStoreError", "FeatureDefinitionError", "SourceValidationError", "UnknownFeatureError",
    "OnlineStoreError", "ServingSpec",
]
