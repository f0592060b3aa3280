"""Online drift sketches: the serving path counts each batch into a native DriftSketch
(histograms over the reference profile's bins plus the sum of the values in each bin,
GIL released), and the monitor turns a snapshot into the same statistics as an offline
report against the profile (``vivace monitor report --profile``): PSI, JS, KS at the bin
edges and the Wasserstein estimate from bin frequencies and means (vivace.monitor.drift).

A model's sketch reads its input tensor rows ``[N, F]`` (float32/float64); ``columns``
maps each profiled feature to its column in the row. Categorical features arrive as
integer codes: give ``categories[name]`` (the label of code 0, 1, ...) to track them;
categorical features without a vocabulary are not sketched.

For the batcher's executor (C++): ``vivace::DriftSketch`` in ``csrc/sketch/sketch.h``;
``ProfileSketch.native`` is the ``std::shared_ptr<DriftSketch>`` to hand over, and
``DriftSketch::Update(const float* rows, int64_t n, int64_t row_stride)`` counts a batch.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vivace import _core

from .drift import (
    DriftInputError,
    DriftThresholds,
    FeatureDrift,
    compare_categorical,
    compare_numeric,
)


@dataclass(frozen=True)
class Window:
    """Sliding window: the newest `buckets` buckets of `span` rows (kind "rows") or
    `span` seconds (kind "time")."""

    kind: str = "rows"
    span: float = 10_000
    buckets: int = 6

    @classmethod
    def last_rows(cls, rows: int, buckets: int = 6) -> Window:
        """The newest `rows` rows, kept in `buckets` buckets of rows // buckets rows: the
        live window holds at most `rows` rows (buckets * (rows // buckets)) and, once
        full, at least (buckets - 1) / buckets of that (a full bucket drops out at once).
        What ``vivace serve --drift-window N`` means."""
        if rows < 1:
            raise DriftInputError(f"a drift window needs at least 1 row, got {rows}")
        buckets = max(1, min(buckets, rows))
        return cls("rows", rows // buckets, buckets)

    def describe(self) -> dict[str, Any]:
        """The window for /drift: its most rows (or seconds) and its buckets."""
        if self.kind == "time":
            return {"kind": "time", "seconds": self.span * self.buckets, "buckets": self.buckets}
        return {"kind": "rows", "rows": int(self.span) * self.buckets, "buckets": self.buckets,
                "bucket_rows": int(self.span)}

    def native_span(self) -> int:
        if self.kind == "time":
            return max(int(self.span * 1e9), 1)
        return max(int(self.span), 1)


class ProfileSketch:
    """Counts rows into the bins of a reference profile, over a sliding window."""

    def __init__(self, entries: Mapping[str, Mapping[str, Any]], columns: Mapping[str, int],
                 window: Window = Window(), categories: Mapping[str, Sequence[str]] | None = None):
        categories = categories or {}
        self.names: list[str] = []
        self.entries: dict[str, Mapping[str, Any]] = {}
        self.labels: dict[str, list[str]] = {}
        edges, ncat, low, high, cols = [], [], [], [], []
        for name, column in columns.items():
            if name not in entries:
                raise DriftInputError(f"sketch column {name!r} is not in the profile")
            entry = entries[name]
            if entry["kind"] == "categorical":
                if name not in categories:
                    continue
                self.labels[name] = [str(c) for c in categories[name]]
                edges.append([])
                ncat.append(len(self.labels[name]))
                low.append(0.0)
                high.append(0.0)
            else:
                edges.append([float(e) for e in entry["edges"]])
                ncat.append(0)
                # An all-missing reference column has no range: one bin, nothing below/above.
                low.append(float(entry.get("min", -math.inf)))
                high.append(float(entry.get("max", math.inf)))
            cols.append(int(column))
            self.names.append(name)
            self.entries[name] = entry
        if not self.names:
            raise DriftInputError("nothing to sketch: no profiled feature has a column")
        self.window = window
        self.native = _core.DriftSketch(edges, ncat, low, high, cols, window.kind, window.native_span(),
                                        window.buckets)

    def update(self, batch: Any) -> None:
        """Count a row-major [rows, columns] float32/float64 batch (any buffer)."""
        self.native.update(batch)

    def snapshot(self) -> dict[str, Any]:
        """Per-feature counts over the live window: {"rows": n, "features": {name: {...}}}."""
        raw = self.native.snapshot()
        off = raw["bin_offset"]
        feats = {}
        for f, name in enumerate(self.names):
            feats[name] = {"bins": raw["bins"][off[f]:off[f + 1]], "sums": raw["sums"][off[f]:off[f + 1]],
                           "nan": int(raw["nan"][f]),
                           "below": int(raw["below"][f]), "above": int(raw["above"][f])}
        return {"rows": int(raw["rows"]), "features": feats}

    def drift(self, thresholds: DriftThresholds | None = None,
              feature_thresholds: Mapping[str, Mapping[str, Any]] | None = None,
              snapshot: dict[str, Any] | None = None) -> list[FeatureDrift]:
        """Statistics of the live window against the profile, one FeatureDrift per feature."""
        from dataclasses import replace

        thresholds = thresholds or DriftThresholds()
        snap = snapshot or self.snapshot()
        out = []
        for name in self.names:
            counts = snap["features"][name]
            limits = thresholds
            if feature_thresholds and name in feature_thresholds:
                limits = replace(thresholds, **feature_thresholds[name])
            bins = np.asarray(counts["bins"], dtype=np.int64)
            if name in self.labels:
                # Codes outside the vocabulary are counted as "above": an unseen category.
                labels = self.labels[name] + (["<unknown>"] if counts["above"] else [])
                values = np.append(bins, counts["above"]) if counts["above"] else bins
                out.append(compare_categorical(name, self.entries[name], labels, values, counts["nan"], limits))
            else:
                out.append(compare_numeric(name, self.entries[name], bins, counts["sums"], int(bins.sum()),
                                           counts["nan"], counts["below"], counts["above"], limits))
        return out


def input_sketch(profile: Mapping[str, Any], columns: Sequence[str] | Mapping[str, int] | None = None,
                 window: Window = Window(), categories: Mapping[str, Sequence[str]] | None = None) -> ProfileSketch:
    """Sketch of a model's input rows; columns default to the profile's feature order."""
    feats = profile["features"]
    if columns is None:
        columns = list(feats)
    mapping = dict(columns) if isinstance(columns, Mapping) else {n: i for i, n in enumerate(columns)}
    return ProfileSketch(feats, mapping, window, categories)


def prediction_sketch(profile: Mapping[str, Any], column: int = 0, window: Window = Window()) -> ProfileSketch:
    """Sketch of a model's output rows against the profile's prediction entry."""
    if not isinstance(profile.get("prediction"), Mapping):
        raise DriftInputError("the profile has no prediction entry")
    return ProfileSketch({"prediction": profile["prediction"]}, {"prediction": column}, window)


def sketches_for_package(package: Any, window: Window = Window()) -> tuple[ProfileSketch, ProfileSketch | None]:
    """Input and prediction sketches for a model package (a ModelPackage or its directory).

    Reads what the registry's training step writes: ``metadata.profile`` (the profile file,
    default ``profile.json``) and ``metadata.features``, the input columns in order as
    ``{"name", "kind", "categories"}`` (categorical inputs are category indexes). Without
    ``metadata.features`` the input columns are the profile's features in order.
    """
    from vivace.registry.package import ModelPackage, load_package

    from .drift import load_profile

    pkg = package if isinstance(package, ModelPackage) else load_package(package)
    profile = load_profile(pkg.path / pkg.metadata.get("profile", "profile.json"))
    specs = pkg.metadata.get("features")
    if specs:
        columns = {s["name"]: j for j, s in enumerate(specs)}
        categories = {s["name"]: s["categories"] for s in specs if s.get("kind") == "categorical"}
    else:
        columns, categories = {n: j for j, n in enumerate(profile["features"])}, {}
    inputs = input_sketch(profile, columns, window, categories)
    outputs = prediction_sketch(profile, 0, window) if isinstance(profile.get("prediction"), Mapping) else None
    return inputs, outputs
