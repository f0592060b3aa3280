"""vivace.engine: serving (HTTP front end, model runtime, backends), offline Scorer, CLI.

Heavy modules (torch, the HTTP stack) load on first use, so `import vivace.engine` stays
cheap for tools that only need part of it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Scorer", "ModelRunner", "load_backend"]

if TYPE_CHECKING:
    from .backends import load_backend
    from .runtime import ModelRunner
    from .scorer import Scorer


def __getattr__(name: str) -> Any:
    if name == "Scorer":
        from .scorer import Scorer

        return Scorer
    if name == "ModelRunner":
        from .runtime import ModelRunner

        return ModelRunner
    if name == "load_backend":
        from .backends import load_backend

        return load_backend
    raise AttributeError(f"module 'vivace.engine' has no attribute {name!r}")
