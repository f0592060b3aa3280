"""Errors of the feature store: each names the definition, column or path at fault."""
from __future__ import annotations


class FeatureStoreError(Exception):
    """Base class; the CLI prints these as one line."""


class FeatureDefinitionError(FeatureStoreError, ValueError):
    """A definition is malformed or refers to something that does not exist."""


class SourceValidationError(FeatureStoreError, ValueError):
    """A view's source does not match its definition (missing/retyped column, empty file)."""


class UnknownFeatureError(FeatureStoreError, KeyError):
    """A requested feature, view or service is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class OnlineStoreError(FeatureStoreError, RuntimeError):
    """The online store is missing, unwritable or of another schema version."""
