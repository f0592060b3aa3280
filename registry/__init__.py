"""vivace.registry: data versions, training runs, model registry, artifacts, lineage.

Python entry points: `open_dataset("name@v3")` loads a dataset version as a DataFrame;
`resolve(home, "name@production")` returns the verified package directory the engine
serves. The `vivace data|models|runs|train|audit` commands live in `cli.py`.

Names are imported on first use, so that `import vivace.registry.package` (which the
engine does on every start) does not pay for SQLite and the registry modules.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "open_dataset": "data", "resolve": "models", "Home": "store", "RegistryError": "store",
    "NotFoundError": "store", "IntegrityError": "store",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
