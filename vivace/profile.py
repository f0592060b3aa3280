"""Reference profiles: the one writer and validator of ``profile.json`` (shared-format floor).

A model version carries a profile of its training inputs and predictions (``profile.json``
in the model package); ``vivace train`` (vivace.registry.profile) and ``vivace monitor
profile`` (vivace.monitor.drift) both write it through the functions here, and the drift
monitor reads it. This module imports nothing of vivace but the compiled core.

Format::

    {"format": "vivace-reference-profile/1", "rows": N,
     "features": {
       "<numeric>": {"kind": "numeric", "count": n, "null_fraction": p,
                     "edges": [e1, ..., eB-1], "frequencies": [f0, ..., fB-1],
                     "means": [m0, ..., mB-1],
                     "min": ., "max": ., "mean": ., "std": .},
       "<categorical>": {"kind": "categorical", "count": n, "null_fraction": p,
                         "frequencies": {"<value>": f, ...}}},
     "prediction": {numeric entry, optional}}

* ``count`` is every row, ``null_fraction`` the share that is missing: NaN, null and
  +-inf alike (an infinite value has no place in a histogram, a mean or a std).
* Numeric ``edges`` are the distinct interior quantiles of the non-missing values
  (default 10 bins: deciles, linear interpolation as ``numpy.quantile``); bin i holds
  values in (edges[i-1], edges[i]], the outer bins are open-ended. ``frequencies`` are
  fractions of non-missing values per bin; ``std`` is the population std (ddof=0).
* ``means`` (added later; optional on read) is the mean of the values in each bin, which
  makes the binned Wasserstein estimate exact for shifts (vivace.monitor.drift). Profiles
  written before it load unchanged: ``bin_means`` estimates them from the edges, min, max
  and mean.
* A numeric column with no finite value has ``null_fraction`` 1, ``edges`` [] and
  ``frequencies`` [0.0], and no means/min/max/mean/std: nothing to compare against.
* Categorical ``frequencies`` map each value, as a string, to its share of non-missing
  values.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from vivace import _core

FORMAT = "vivace-reference-profile/1"
DEFAULT_BINS = 10


class ProfileError(ValueError):
    """A profile (or the data given to build one) cannot be used; the message says why."""


def quantile_edges(sorted_values: np.ndarray, bins: int) -> np.ndarray:
    """Distinct interior quantiles of sorted values (numpy.quantile, linear method)."""
    n = len(sorted_values)
    pos = np.linspace(0.0, 1.0, bins + 1)[1:-1] * (n - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    t = pos - lo
    a, b = sorted_values[lo], sorted_values[hi]
    return np.unique(np.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t))


def bin_counts(sorted_values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per (edges[i-1], edges[i]] bin, outer bins open, of sorted values."""
    cum = np.searchsorted(sorted_values, edges, side="right")
    return np.diff(np.concatenate(([0], cum, [len(sorted_values)])))


def bin_sums(sorted_values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Sum of the sorted values in each (edges[i-1], edges[i]] bin, outer bins open."""
    cum = np.searchsorted(sorted_values, edges, side="right")
    prefix = np.concatenate(([0.0], np.cumsum(sorted_values)))
    return np.diff(prefix[np.concatenate(([0], cum, [len(sorted_values)]))])


def sort_finite(values: Any) -> tuple[np.ndarray, int]:
    """(finite values ascending, row count) of a 1-D numeric column."""
    column = np.asarray(values, dtype=np.float64).reshape(-1)
    s, n = _core.drift_sort_finite([column])
    return s[0, : n[0]], len(column)


def numeric_entry_sorted(sorted_values: np.ndarray, total: int, bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """Numeric entry of a column's finite values (sorted ascending) out of `total` rows."""
    if bins < 2:
        raise ProfileError(f"bins must be at least 2, got {bins}")
    n = len(sorted_values)
    entry: dict[str, Any] = {"kind": "numeric", "count": int(total),
                             "null_fraction": 1.0 - n / total if total else 0.0}
    if n == 0:
        return {**entry, "null_fraction": 1.0 if total else 0.0, "edges": [], "frequencies": [0.0]}
    edges = quantile_edges(sorted_values, bins)
    counts = bin_counts(sorted_values, edges)
    sums = bin_sums(sorted_values, edges)
    # An empty bin (possible between interpolated quantiles) gets its upper edge as mean;
    # its weight is 0, so the value only has to be a finite number inside the bin.
    upper = np.append(edges, sorted_values[-1])
    means = np.where(counts > 0, sums / np.maximum(counts, 1), upper)
    mean = float(sorted_values.mean())
    return {**entry, "edges": edges.tolist(), "frequencies": (counts / n).tolist(), "means": means.tolist(),
            "min": float(sorted_values[0]), "max": float(sorted_values[-1]),
            "mean": mean, "std": float(np.sqrt(np.mean(np.square(sorted_values - mean))))}


def numeric_entry(values: Any, bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """Numeric entry of a column (NaN and +-inf count as missing)."""
    return numeric_entry_sorted(*sort_finite(values), bins)


def categorical_entry(labels: list[str], counts: Any, missing: int) -> dict[str, Any]:
    """Categorical entry from the distinct labels, their counts and the missing count."""
    counts = np.asarray(counts, dtype=np.int64)
    present = int(counts.sum())
    total = present + int(missing)
    return {"kind": "categorical", "count": total, "null_fraction": missing / total if total else 0.0,
            "frequencies": {str(k): float(c) / present for k, c in zip(labels, counts.tolist())} if present else {}}


def make_profile(features: Mapping[str, dict[str, Any]], rows: int,
                 prediction: dict[str, Any] | None = None) -> dict[str, Any]:
    """The profile document of entries made by the functions above (validated)."""
    profile: dict[str, Any] = {"format": FORMAT, "rows": int(rows), "features": dict(features)}
    if prediction is not None:
        profile["prediction"] = prediction
    return validate_profile(profile)


def has_values(entry: Mapping[str, Any]) -> bool:
    """A numeric entry with a distribution (not an all-missing column)."""
    return "min" in entry


def validate_profile(profile: Any) -> dict[str, Any]:
    """Check a profile's structure; returns it. Raises ProfileError naming the problem."""
    if not isinstance(profile, Mapping) or profile.get("format") != FORMAT:
        raise ProfileError(f"not a drift profile (expected format {FORMAT!r})")
    feats = profile.get("features")
    if not isinstance(feats, Mapping) or not feats:
        raise ProfileError("profile has no features")
    entries = dict(feats)
    if isinstance(profile.get("prediction"), Mapping):
        entries["<prediction>"] = profile["prediction"]
    for name, entry in entries.items():
        kind = entry.get("kind") if isinstance(entry, Mapping) else None
        if kind == "numeric":
            _check_numeric(name, entry)
        elif kind == "categorical":
            if not isinstance(entry.get("frequencies"), Mapping):
                raise ProfileError(f"profile feature {name!r}: categorical needs a frequencies map")
        else:
            raise ProfileError(f"profile feature {name!r}: kind must be numeric or categorical")
    return dict(profile)


def _is_finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_numeric(name: str, entry: Mapping[str, Any]) -> None:
    edges, freqs = entry.get("edges"), entry.get("frequencies")
    if not isinstance(edges, list) or not isinstance(freqs, list) or len(freqs) != len(edges) + 1:
        raise ProfileError(f"profile feature {name!r}: needs edges and len(edges)+1 frequencies")
    if not _is_finite_number(entry.get("null_fraction", 0.0)) or not _is_finite_number(entry.get("count", 0)):
        raise ProfileError(f"profile feature {name!r}: count and null_fraction must be numbers")
    if entry.get("min") is None and not edges and float(entry.get("null_fraction", 0.0)) == 1.0:
        return  # an all-missing column: nothing else to check
    e = np.asarray(edges, dtype=np.float64)
    if not np.all(np.isfinite(e)) or np.any(np.diff(e) <= 0):
        raise ProfileError(f"profile feature {name!r}: edges must be finite and increasing")
    for key in ("min", "max", "mean", "std"):
        if not _is_finite_number(entry.get(key)):
            raise ProfileError(f"profile feature {name!r}: {key} must be a finite number")
    means = entry.get("means")
    if means is not None and (not isinstance(means, list) or len(means) != len(freqs)
                              or not all(_is_finite_number(m) for m in means)):
        raise ProfileError(f"profile feature {name!r}: means must be len(frequencies) finite numbers")


def bin_means(entry: Mapping[str, Any]) -> np.ndarray:
    """Mean of the reference values in each bin of a numeric entry.

    Profiles written before ``means`` existed: the interior bins' midpoints; each outer
    bin's mean lies t from its inner edge, t first guessed as an exponential tail with the
    density of the neighbouring bin (t = width * p_outer / p_neighbour), then both t moved
    the least (in squares) for the bins' means to average to the reference mean, within
    [0, distance to the reference min/max]. Symmetric tails keep their guess; a long tail
    on one side (lognormal) gets the mass the mean says it has.
    """
    if entry.get("means") is not None:
        return np.asarray(entry["means"], dtype=np.float64)
    edges = np.asarray(entry["edges"], dtype=np.float64)
    p = np.asarray(entry["frequencies"], dtype=np.float64)
    low, high, mean = float(entry["min"]), float(entry["max"]), float(entry["mean"])
    if len(edges) == 0:
        return np.array([mean])
    means = np.concatenate(([edges[0]], 0.5 * (edges[1:] + edges[:-1]), [edges[-1]]))
    room = np.array([edges[0] - low, high - edges[-1]])
    if len(edges) > 1:
        width = np.array([edges[1] - edges[0], edges[-1] - edges[-2]])
        neighbour = np.array([p[1], p[-2]])
        guess = np.where(neighbour > 0, width * np.array([p[0], p[-1]]) / np.maximum(neighbour, 1e-300), room / 2)
    else:
        guess = room / 2
    # mean = dot(p, means) - p0 t0 + pB tB: a linear constraint on t = (t0, tB).
    grad = np.array([-p[0], p[-1]])
    gap = mean - float(np.dot(p, means))
    t = np.clip(guess, 0.0, room)
    if grad @ grad > 0:
        t = np.clip(t + (gap - grad @ t) / (grad @ grad) * grad, 0.0, room)
        for side in (0, 1):  # one side at its bound: the other alone meets the mean
            other = 1 - side
            if t[side] in (0.0, room[side]) and grad[other] != 0:
                t[other] = np.clip((gap - grad[side] * t[side]) / grad[other], 0.0, room[other])
    means[0] -= t[0]
    means[-1] += t[1]
    return means


def sample_rows(profile: Mapping[str, Any], columns: list[tuple[str, list[str] | None]], rows: int,
                seed: int = 0) -> np.ndarray:
    """Rows drawn from a profile's marginals, as float32 [rows, len(columns)].

    `columns`: (feature name, categories) per model input column; a numeric feature is
    drawn bin by bin with its frequencies, uniformly within a bin (the outer bins reach the
    min and max), a categorical one by its frequencies and written as its index in
    `categories` (-1 for a value not among them, as training encodes it). Features are drawn
    independently: what the rows certify is each input's range and spread, not their joint
    structure. Raises ProfileError for a column the profile lacks or cannot draw from.
    """
    rng = np.random.default_rng(seed)
    features = validate_profile(profile)["features"]
    out = np.empty((rows, len(columns)), np.float32)
    for j, (name, categories) in enumerate(columns):
        entry = features.get(name)
        if entry is None:
            raise ProfileError(f"the profile has no feature {name!r}")
        if categories is not None:
            if entry["kind"] != "categorical" or not entry["frequencies"]:
                raise ProfileError(f"profile feature {name!r} has no category frequencies")
            values = list(entry["frequencies"])
            p = np.asarray([entry["frequencies"][v] for v in values], np.float64)
            codes = np.asarray([categories.index(v) if v in categories else -1 for v in values], np.float32)
            out[:, j] = codes[rng.choice(len(values), size=rows, p=p / p.sum())]
            continue
        if entry["kind"] != "numeric" or not has_values(entry):
            raise ProfileError(f"profile feature {name!r} has no numeric distribution to draw from")
        bounds = np.concatenate(([entry["min"]], entry["edges"], [entry["max"]]))
        p = np.asarray(entry["frequencies"], np.float64)
        bins = rng.choice(len(p), size=rows, p=p / p.sum())
        out[:, j] = bounds[bins] + rng.random(rows) * (bounds[bins + 1] - bounds[bins])
    return out


def dumps(profile: Mapping[str, Any]) -> str:
    """profile.json text (strict JSON: a profile holds no NaN or infinity)."""
    return json.dumps(validate_profile(profile), indent=1, allow_nan=False)
