"""Reference profile of training inputs and predictions, stored in a model package for drift.

Format (``profile.json``, ``"format": "vivace-reference-profile/1"``):

    {"format": ..., "rows": N,
     "features": {
        "<numeric>":     {"kind": "numeric", "edges": [e1, ..., e9], "frequencies": [f0, ..., f9],
                          "count": n, "null_fraction": p, "min": ., "max": ., "mean": ., "std": .},
        "<categorical>": {"kind": "categorical", "frequencies": {"value": f, ...},
                          "count": n, "null_fraction": p}},
     "prediction": {numeric entry as above}}

Numeric bins come from training quantiles: `edges` are the interior cut points and bin i
holds values in (edges[i-1], edges[i]], the outer bins open-ended, so values outside the
training range land in the first or last bin. Frequencies are fractions of non-null values.
"""
from __future__ import annotations

from typing import Any

import numpy as np

FORMAT = "vivace-reference-profile/1"


def bin_frequencies(values: np.ndarray, edges: list[float]) -> list[float]:
    """Fractions of `values` in each (edges[i-1], edges[i]] bin, outer bins open-ended."""
    if len(values) == 0:
        return [0.0] * (len(edges) + 1)
    counts = np.bincount(np.searchsorted(np.asarray(edges), values, side="left"), minlength=len(edges) + 1)
    return (counts / len(values)).tolist()


def numeric_profile(values: np.ndarray, bins: int = 10) -> dict[str, Any]:
    values = np.asarray(values, dtype="float64")
    present = values[~np.isnan(values)]
    entry: dict[str, Any] = {"kind": "numeric", "count": int(len(values)),
                             "null_fraction": float(1 - len(present) / len(values)) if len(values) else 0.0}
    if len(present) == 0:
        return {**entry, "edges": [], "frequencies": [0.0]}
    edges = np.unique(np.quantile(present, np.linspace(0, 1, bins + 1)[1:-1])).tolist()
    return {**entry, "edges": edges, "frequencies": bin_frequencies(present, edges),
            "min": float(present.min()), "max": float(present.max()),
            "mean": float(present.mean()), "std": float(present.std())}


def categorical_profile(values: Any) -> dict[str, Any]:
    import pandas as pd

    series = pd.Series(values)
    present = series.dropna().astype(str)
    freqs = present.value_counts(normalize=True).sort_index()
    return {"kind": "categorical", "count": int(len(series)),
            "null_fraction": float(1 - len(present) / len(series)) if len(series) else 0.0,
            "frequencies": {str(k): float(v) for k, v in freqs.items()}}


def build_profile(frame: Any, categorical: list[str], predictions: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Profile every column of `frame` (pandas) and the model's predictions on it."""
    features = {
        str(col): categorical_profile(frame[col]) if col in categorical
        else numeric_profile(frame[col].to_numpy(dtype="float64", na_value=np.nan), bins)
        for col in frame.columns
    }
    return {"format": FORMAT, "rows": int(len(frame)), "features": features,
            "prediction": numeric_profile(np.asarray(predictions).reshape(-1), bins)}
