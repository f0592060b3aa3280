"""vivace.features: a feature store as Feast users know it, on embedded parts.

Entities, feature views over parquet sources and feature services are registered in the
Vivace home; `FeatureStore.get_historical_features` builds point-in-time correct training
sets; `materialize` writes the latest values to an LMDB online store that the C++ core
(`vivace._core.FeatureLookup`) reads for serving.
"""
from .definitions import Entity, FeatureService, FeatureView, Field, load_yaml, parse_ttl
from .errors import (
    FeatureDefinitionError, FeatureStoreError, OnlineStoreError, SourceValidationError, UnknownFeatureError,
)
from .store import FeatureStore, ServingSpec

__all__ = [
    "Entity", "FeatureService", "FeatureView", "Field", "FeatureStore", "load_yaml", "parse_ttl",
    "FeatureStoreError", "FeatureDefinitionError", "SourceValidationError", "UnknownFeatureError",
    "OnlineStoreError", "ServingSpec",
]
