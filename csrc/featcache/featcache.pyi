# Type stub of the feature cache part of vivace._core (to merge into vivace/_core.pyi).
from typing import Sequence

import numpy as np
import numpy.typing as npt

class FeatureCacheError(RuntimeError): ...

class FeatureCache:
    """The LMDB online store of a Vivace home, opened read-only once per process."""
    def __init__(self, path: str, cache_capacity: int = 0) -> None: ...
    @property
    def path(self) -> str: ...
    @property
    def cache_capacity(self) -> int: ...
    def generation(self) -> int: ...

class FeatureLookup:
    """A fixed list of (view, feature) columns read for batches of entity keys."""
    def __init__(self, cache: FeatureCache, columns: Sequence[tuple[str, str]]) -> None: ...
    @property
    def num_features(self) -> int: ...
    @property
    def columns(self) -> list[tuple[str, str]]: ...
    def get(
        self, entity_ids: int | Sequence[int] | npt.NDArray[np.integer], now_us: int | None = None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]: ...
    def lookup_into(
        self,
        entity_ids: int | Sequence[int] | npt.NDArray[np.integer],
        out: npt.NDArray[np.float32],
        found: npt.NDArray[np.bool_],
        now_us: int | None = None,
    ) -> None: ...
