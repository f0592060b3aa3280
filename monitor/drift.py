"""Drift statistics, reference profiles and offline drift reports.

Reference profile
-----------------
A model version carries a profile of its training inputs and predictions (``profile.json``
in the model package). Its format, its one writer and its validator are in
``vivace.profile`` (shared by ``vivace train`` and ``vivace monitor profile``): numeric
features as decile bins (edges, frequencies, per-bin means) plus min/max/mean/std,
categorical ones as value frequencies.

Statistics (per feature, reference R vs current C)
--------------------------------------------------
* ``psi``: population stability index, sum_i (c_i - r_i) * ln(c_i / r_i) over the
  reference bins (numeric) or the union of categories (categorical), with proportions
  clipped below at ``PSI_EPSILON`` = 1e-4 so empty bins stay finite.
* ``js``: Jensen-Shannon distance, sqrt of the JS divergence with natural logarithms, as
  ``scipy.spatial.distance.jensenshannon`` (range 0 .. sqrt(ln 2) = 0.83), same bins.
* ``ks``: two-sample Kolmogorov-Smirnov statistic sup|F_R - F_C|, exactly as
  ``scipy.stats.ks_2samp``; ``ks_pvalue`` from the Kolmogorov distribution with
  Stephens' small-sample correction (within 1% of scipy's for p >= 1e-4 and
  n*m/(n+m) >= 5000; ``exact_pvalues=True`` calls scipy's ``kstwo``, ~0.1 s per column).
* ``wasserstein``: the 1-Wasserstein distance (as ``scipy.stats.wasserstein_distance``)
  divided by the reference std.
When only a profile is at hand (online, or a report against a model's profile), all four
come from the binned distributions, with values below the reference min and above its
max split off as two extra bins of reference mass 0 for PSI, JS and KS: KS at the bin
edges (a lower bound). Wasserstein from bins (``binned_wasserstein``): per bin, the
integral of F_R - F_C is exact given both samples' bin frequencies and bin means
(int_a^b F = b F(b) - a F(a) - E[X; a < X <= b]), so the sum of its absolute values over
the bins is the Wasserstein-1 distance whenever F_R - F_C keeps one sign inside each
bin -- every location shift, of any distribution -- and otherwise a lower bound (the
part lost is where the two CDFs cross inside a bin: sampling noise on unchanged data,
or a scale change at the crossing point). The open outer bins need no width, so a long
tail costs nothing. The sketch sums the values per bin for it; profiles without
per-bin means estimate them (``vivace.profile.bin_means``).

Default thresholds (``DriftThresholds``): a numeric feature drifts when any of
``psi >= 0.2``, ``js >= 0.1``, ``wasserstein >= 0.1`` (Evidently's defaults for large
data: Wasserstein/std >= 0.1, JS >= 0.1; PSI 0.2 is the usual "significant shift") or
``ks >= 0.01 and ks_pvalue < 0.001``. The KS rule is what catches small shifts in large
samples (+0.05 std gives ks ~ 0.02), which distance thresholds alone miss; the 0.01 floor
keeps negligible shifts in huge samples from firing. A categorical feature drifts when
``psi >= 0.2`` or ``js >= 0.1``. The dataset drifts when at least ``dataset_share`` (0.5)
of the features do. Thresholds can be set globally and per feature.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from vivace import _core
from vivace import profile as profiles

PROFILE_FORMAT = profiles.FORMAT
REPORT_FORMAT = "vivace-drift-report/1"
PSI_EPSILON = 1e-4
DEFAULT_BINS = profiles.DEFAULT_BINS


class DriftInputError(profiles.ProfileError):
    """Data or a profile given to the drift functions cannot be used; the message says why."""


@dataclass(frozen=True)
class DriftThresholds:
    """Per-statistic thresholds; a statistic at or above its threshold marks drift.

    ``ks_pvalue`` is an upper bound (drift when the p-value is below it) and applies only
    together with ``ks``. ``None`` disables a statistic.
    """

    psi: float | None = 0.2
    js: float | None = 0.1
    wasserstein: float | None = 0.1
    ks: float | None = 0.01
    ks_pvalue: float = 0.001
    dataset_share: float = 0.5

    def crossed(self, stats: Mapping[str, float | None], kind: str) -> list[str]:
        """Names of the statistics in `stats` that cross their thresholds."""
        hits = []
        for name in ("psi", "js") if kind == "categorical" else ("psi", "js", "wasserstein"):
            limit, value = getattr(self, name), stats.get(name)
            if limit is not None and value is not None and value >= limit:
                hits.append(name)
        if kind == "numeric" and self.ks is not None:
            ks, p = stats.get("ks"), stats.get("ks_pvalue")
            if ks is not None and p is not None and ks >= self.ks and p < self.ks_pvalue:
                hits.append("ks")
        return hits

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> DriftThresholds:
        unknown = set(obj) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise DriftInputError(f"unknown drift threshold(s): {', '.join(sorted(unknown))}")
        for required in ("ks_pvalue", "dataset_share"):
            if required in obj and obj[required] is None:
                raise DriftInputError(f"drift threshold {required} cannot be disabled")
        return cls(**{k: (None if v is None else float(v)) for k, v in obj.items()})


# ---------------------------------------------------------------------------- statistics


def psi(reference: np.ndarray, current: np.ndarray, epsilon: float = PSI_EPSILON) -> float:
    """Population stability index of two frequency (or count) vectors over the same bins."""
    r = _proportions(reference)
    c = _proportions(current)
    r = np.maximum(r, epsilon)
    c = np.maximum(c, epsilon)
    return float(np.sum((c - r) * np.log(c / r)))


def js_distance(reference: np.ndarray, current: np.ndarray) -> float:
    """Jensen-Shannon distance (natural log) of two frequency (or count) vectors."""
    p = _proportions(reference)
    q = _proportions(current)
    m = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log(p / m), 0.0).sum()
        kl_q = np.where(q > 0, q * np.log(q / m), 0.0).sum()
    return float(math.sqrt(max(0.5 * (kl_p + kl_q), 0.0)))


def ks_pvalue(statistic: np.ndarray | float, n: np.ndarray | float, m: np.ndarray | float,
              exact: bool = False) -> np.ndarray:
    """Two-sided p-value of a two-sample KS statistic for sample sizes n and m."""
    d = np.asarray(statistic, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    m = np.asarray(m, dtype=np.float64)
    en = n * m / (n + m)
    if exact:  # scipy.stats.ks_2samp(method="asymp") exactly; slow for small p-values
        from scipy.stats import kstwo

        return np.clip(kstwo.sf(d, np.round(en)), 0.0, 1.0)
    from scipy.special import kolmogorov

    root = np.sqrt(en)
    return np.clip(kolmogorov((root + 0.12 + 0.11 / root) * d), 0.0, 1.0)


def _proportions(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    total = v.sum()
    return v / total if total > 0 else v


def binned_ks(ref_freq: np.ndarray, cur_freq: np.ndarray) -> float:
    """KS statistic at the bin edges of two histograms over the same bins (a lower bound)."""
    p = _proportions(ref_freq)
    q = _proportions(cur_freq)
    diff = np.abs(np.cumsum(p)[:-1] - np.cumsum(q)[:-1])  # CDF gap at each interior edge
    return float(diff.max()) if len(diff) else 0.0


def binned_wasserstein(edges: np.ndarray, ref_freq: np.ndarray, ref_means: np.ndarray,
                       cur_freq: np.ndarray, cur_means: np.ndarray) -> float:
    """Wasserstein-1 estimate from two histograms over the same bins (outer bins open)
    and the mean of each sample's values in each bin (module docs: exact while the CDF
    gap keeps one sign inside each bin, else a lower bound).

    Per bin (a, b] with CDF gap d = F_R - F_C at the edges, frequencies p, q and means
    mu, nu: integral of F_R - F_C = d(a) (b - a) + p (b - mu) - q (b - nu), written with
    distances inside the bin so that large offsets cancel nothing; the open first bin
    has d(a) = 0 and the open last bin p (a - mu) - q (a - nu) measured from a."""
    p = _proportions(ref_freq)
    q = _proportions(cur_freq)
    if len(p) < 2:
        return abs(float(np.dot(p, ref_means) - np.dot(q, cur_means)))
    e = np.asarray(edges, dtype=np.float64)
    d = np.cumsum(p)[:-1] - np.cumsum(q)[:-1]
    # Empty bins carry no weight; their mean may be anything (0 from an empty sketch bin).
    mu = np.where(p > 0, ref_means, 0.0)
    nu = np.where(q > 0, cur_means, 0.0)
    upper = p[:-1] * (e - mu[:-1]) - q[:-1] * (e - nu[:-1])  # bins 0 .. B-2, up to their upper edge
    upper[1:] += d[:-1] * np.diff(e)
    last = q[-1] * (nu[-1] - e[-1]) - p[-1] * (mu[-1] - e[-1])
    return float(np.abs(upper).sum() + abs(last))


# ---------------------------------------------------------------------------- input data


def load_table(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a parquet, csv or npy file into named columns.

    A 2-D numeric ``.npy`` array gives columns ``f0, f1, ...``; a structured array its
    field names; a 1-D array one column ``value``.
    """
    p = Path(path)
    if not p.is_file():
        raise DriftInputError(f"{p}: no such file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return table_columns(pq.read_table(p))
        if suffix == ".csv":
            import pyarrow.csv as pcsv

            return table_columns(pcsv.read_csv(p))
        if suffix == ".npy":
            return array_columns(np.load(p, allow_pickle=False))
    except DriftInputError as exc:
        raise DriftInputError(f"{p}: {exc}") from None
    except Exception as exc:  # parser errors from pyarrow/numpy: name the file
        raise DriftInputError(f"{p}: cannot read {suffix[1:]} file: {exc}") from exc
    raise DriftInputError(f"{p}: unsupported file type {suffix or '(none)'}; use .parquet, .csv or .npy")


def array_columns(array: np.ndarray) -> dict[str, np.ndarray]:
    """Named columns of a numpy array: fields of a structured array, f0.. of a 2-D one."""
    if array.dtype.names:
        return {name: array[name] for name in array.dtype.names}
    if array.ndim == 1:
        return {"value": array}
    if array.ndim == 2:
        return {f"f{j}": array[:, j] for j in range(array.shape[1])}
    raise DriftInputError(f"expected a 1-D, 2-D or structured array, got shape {array.shape}")


def table_columns(table: Any) -> dict[str, Any]:
    """Columns of a pyarrow Table: numeric ones as numpy float/int arrays (nulls -> NaN),
    the others kept as pyarrow arrays, counted by pyarrow without Python objects."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out: dict[str, Any] = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
            if col.null_count:
                col = pc.fill_null(col.cast(pa.float64()), float("nan"))
            out[name] = col.to_numpy()
        else:
            out[name] = col
    return out


def as_columns(data: Any) -> dict[str, np.ndarray]:
    """Named columns of a mapping, a pyarrow Table, a pandas DataFrame or a numpy array."""
    if isinstance(data, (str, os.PathLike)):
        return load_table(data)
    if isinstance(data, np.ndarray):
        return array_columns(data)
    if hasattr(data, "column_names") and hasattr(data, "column"):  # pyarrow Table / RecordBatch
        return table_columns(data)
    if hasattr(data, "columns") and hasattr(data, "to_numpy"):  # pandas DataFrame
        return {str(c): data[c].to_numpy() for c in data.columns}
    if isinstance(data, Mapping):
        return {str(k): np.asarray(v) for k, v in data.items()}
    raise DriftInputError(f"cannot read columns from {type(data).__name__}")


def _is_numeric(values: Any) -> bool:
    return isinstance(values, np.ndarray) and values.dtype.kind in "iuf"


def _numeric(values: Any, name: str, which: str) -> np.ndarray:
    """float64 view of a numeric column; other columns must hold numbers (or None) only."""
    if _is_numeric(values):
        return values.astype(np.float64, copy=False)
    items = values.to_pylist() if not isinstance(values, np.ndarray) else values
    try:
        return np.array([np.nan if v is None else v for v in items], dtype=np.float64)
    except (TypeError, ValueError):
        bad = next(v for v in items if v is not None and not _parses_as_float(v))
        raise DriftInputError(
            f"column {name!r} is numeric in the reference but {which} holds non-numeric value {bad!r}"
        ) from None


def _parses_as_float(v: Any) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def _is_number(v: Any) -> bool:
    try:
        float(v)
        return v is not None and not isinstance(v, (str, bytes))
    except (TypeError, ValueError):
        return False


def _category_counts(values: Any) -> tuple[list[str], np.ndarray, int]:
    """(categories as strings, counts, missing) of a categorical column."""
    if not isinstance(values, np.ndarray):  # pyarrow: hash counting in Arrow
        import pyarrow.compute as pc

        counts = pc.value_counts(values)
        labels = counts.field("values").to_pylist()
        n = np.asarray(counts.field("counts").to_numpy(zero_copy_only=False), dtype=np.int64)
        keep = np.array([v is not None for v in labels], dtype=bool)
        missing = int(n[~keep].sum())
        return [str(v) for v, k in zip(labels, keep) if k], n[keep], missing
    if values.dtype.kind == "O":
        missing_mask = np.fromiter((v is None or (isinstance(v, float) and math.isnan(v)) for v in values),
                                   dtype=bool, count=len(values))
        values = values[~missing_mask].astype(str)
        missing = int(missing_mask.sum())
    elif values.dtype.kind == "f":
        finite = np.isfinite(values)
        missing = int(len(values) - finite.sum())
        cats, counts = np.unique(values[finite], return_counts=True)
        return [_number_label(c) for c in cats.tolist()], counts.astype(np.int64), missing
    else:
        missing = 0
    if values.dtype.kind not in "USiub" or len(values) == 0:
        cats, counts = np.unique(values, return_counts=True)
        return [str(c) for c in cats.tolist()], counts.astype(np.int64), missing
    rows = np.ascontiguousarray(values).view(np.uint8).reshape(len(values), -1)
    first, counts = _core.drift_count_categories(rows)
    labels = [str(v) for v in values[first].tolist()]
    order = np.argsort(labels, kind="stable")
    return [labels[i] for i in order], counts[order], missing


def _number_label(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


# ---------------------------------------------------------------------------- profiles


def _split_kinds(columns: Mapping[str, np.ndarray], categorical: Iterable[str] | None) -> tuple[list[str], list[str]]:
    forced = set(categorical or ())
    unknown = forced - set(columns)
    if unknown:
        raise DriftInputError(f"categorical column(s) not in the data: {', '.join(sorted(unknown))}")
    numeric, cats = [], []
    for name, values in columns.items():
        if isinstance(values, np.ndarray) and values.ndim != 1:
            raise DriftInputError(f"column {name!r} is not one-dimensional (shape {values.shape})")
        if name in forced or not _is_numeric(values) and not _holds_numbers(values):
            cats.append(name)
        else:
            numeric.append(name)
    return numeric, cats


def _holds_numbers(values: Any) -> bool:
    """An object column of numbers (and None) counts as numeric."""
    if not isinstance(values, np.ndarray) or values.dtype.kind != "O" or len(values) == 0:
        return False
    head = [v for v in values[:1000] if v is not None]
    return bool(head) and all(_is_number(v) for v in head)


def _sorted_numeric(cols: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if not cols:
        return np.empty((0, 0)), np.empty(0, dtype=np.int64)
    return _core.drift_sort_finite(cols)


def build_profile(data: Any, *, bins: int = DEFAULT_BINS, categorical: Iterable[str] | None = None,
                  predictions: np.ndarray | None = None) -> dict[str, Any]:
    """Reference profile (``vivace.profile``) of `data` and optionally the predictions on it.

    A numeric column without finite values gets an all-missing entry (as in ``vivace
    train``); reports leave its statistics undefined."""
    if bins < 2:
        raise DriftInputError(f"bins must be at least 2, got {bins}")
    columns = _checked_columns(as_columns(data), "reference")
    numeric, cats = _split_kinds(columns, categorical)
    rows = len(next(iter(columns.values())))
    sorted_ref, finite = _sorted_numeric([_numeric(columns[n], n, "the reference") for n in numeric])
    features: dict[str, Any] = {}
    for i, name in enumerate(numeric):
        features[name] = profiles.numeric_entry_sorted(sorted_ref[i, : finite[i]], rows, bins)
    for name in cats:
        features[name] = profiles.categorical_entry(*_category_counts(columns[name]))
    prediction = None
    if predictions is not None:
        prediction = profiles.numeric_entry(predictions, bins)
        if not profiles.has_values(prediction):
            raise DriftInputError("predictions have no finite values")
    return profiles.make_profile({name: features[name] for name in columns}, rows, prediction)


def validate_profile(profile: Any) -> dict[str, Any]:
    """Check a profile's structure (``vivace.profile.validate_profile``); returns it."""
    try:
        return profiles.validate_profile(profile)
    except profiles.ProfileError as exc:
        raise DriftInputError(str(exc)) from None


def load_profile(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a profile.json (or a model package directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "profile.json"
    try:
        return validate_profile(json.loads(p.read_text()))
    except FileNotFoundError:
        raise DriftInputError(f"{p}: no such file") from None
    except json.JSONDecodeError as exc:
        raise DriftInputError(f"{p}: not valid JSON ({exc})") from None


# ---------------------------------------------------------------------------- reports


@dataclass
class FeatureDrift:
    """Drift of one feature: the statistics, which thresholds it crossed, and context."""

    name: str
    kind: str  # "numeric" or "categorical"
    stats: dict[str, float | None]
    crossed: list[str]
    reference_count: int
    current_count: int
    reference_missing: float  # fraction
    current_missing: float
    detail: dict[str, Any] = field(default_factory=dict)  # e.g. new categories, out-of-range share

    @property
    def drifted(self) -> bool:
        return bool(self.crossed)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "drifted": self.drifted, "crossed": self.crossed,
                "stats": {k: json_number(v) for k, v in self.stats.items()},
                "reference_count": self.reference_count, "current_count": self.current_count,
                "reference_missing": self.reference_missing, "current_missing": self.current_missing,
                "detail": self.detail}


def json_number(v: float | None) -> float | None:
    """A statistic for strict JSON: non-finite values (e.g. Wasserstein/std with std 0) -> null."""
    return None if v is None or not math.isfinite(v) else float(v)


@dataclass
class DriftReport:
    """A drift report: one FeatureDrift per feature, plus what the plots need."""

    features: list[FeatureDrift]
    thresholds: DriftThresholds
    reference_rows: int
    current_rows: int
    exact_reference: bool  # True: computed from reference data; False: from a profile
    # name -> (edges, reference histogram, current histogram) for the HTML plots
    plots: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)
    ignored_columns: list[str] = field(default_factory=list)
    # What the model says beside the data (monitor/quality.py): {"importance": {"training": ...,
    # "production": ...}, "groups": {"training": {attribute: group metrics}, "production": ...}}
    model: dict[str, Any] | None = None

    @property
    def drifted_features(self) -> list[str]:
        return [f.name for f in self.features if f.drifted]

    @property
    def drift_share(self) -> float:
        return len(self.drifted_features) / len(self.features) if self.features else 0.0

    @property
    def dataset_drift(self) -> bool:
        return bool(self.features) and self.drift_share >= self.thresholds.dataset_share

    def feature(self, name: str) -> FeatureDrift:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"format": REPORT_FORMAT, "reference_rows": self.reference_rows,
                "current_rows": self.current_rows,
                "reference": "data" if self.exact_reference else "profile",
                "dataset_drift": self.dataset_drift, "drift_share": self.drift_share,
                "drifted_features": self.drifted_features,
                "thresholds": {k: getattr(self.thresholds, k) for k in self.thresholds.__dataclass_fields__},
                "ignored_columns": self.ignored_columns,
                "features": [f.to_dict() for f in self.features],
                **({"model": self.model} if self.model else {})}

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def to_html(self, title: str = "Vivace drift report") -> str:
        from .report_html import render_report

        return render_report(self, title)


def _checked_columns(columns: dict[str, np.ndarray], which: str) -> dict[str, np.ndarray]:
    if not columns:
        raise DriftInputError(f"{which} data has no columns")
    lengths = {len(v) for v in columns.values()}
    if len(lengths) != 1:
        raise DriftInputError(f"{which} data has columns of different lengths")
    if lengths.pop() == 0:
        raise DriftInputError(f"{which} data has no rows")
    return columns


def _thresholds_for(name: str, base: DriftThresholds, per_feature: Mapping[str, Mapping[str, Any]] | None) -> DriftThresholds:
    if per_feature and name in per_feature:
        return replace(base, **{k: (None if v is None else float(v)) for k, v in per_feature[name].items()})
    return base


def _categorical_stats(ref_labels: list[str], ref_freq: np.ndarray, cur_labels: list[str],
                       cur_counts: np.ndarray) -> tuple[dict[str, float | None], list[str], np.ndarray, np.ndarray]:
    """PSI/JS over the union of categories; returns stats, new categories and both vectors."""
    index = {c: i for i, c in enumerate(ref_labels)}
    new = [c for c in cur_labels if c not in index]
    for c in new:
        index[c] = len(index)
    r = np.zeros(len(index))
    r[: len(ref_labels)] = ref_freq
    q = np.zeros(len(index))
    q[[index[c] for c in cur_labels]] = cur_counts
    return {"psi": psi(r, q), "js": js_distance(r, q)}, new, r, q


def drift_report(reference: Any, current: Any, *, thresholds: DriftThresholds | None = None,
                 feature_thresholds: Mapping[str, Mapping[str, Any]] | None = None,
                 categorical: Iterable[str] | None = None, bins: int = DEFAULT_BINS,
                 exact_pvalues: bool = False, plots: bool = True) -> DriftReport:
    """Compare `current` data with `reference` data (or a reference profile dict).

    Data: a mapping of columns, a pyarrow Table, a pandas DataFrame, a numpy array or a
    path to a parquet/csv/npy file. Every reference column must be in the current data;
    extra current columns are listed in ``ignored_columns``. With a profile as reference,
    KS and Wasserstein are computed from the binned distributions (module docs).
    """
    thresholds = thresholds or DriftThresholds()
    if bins < 2:
        raise DriftInputError(f"bins must be at least 2, got {bins}")
    if isinstance(reference, Mapping) and reference.get("format") == PROFILE_FORMAT:
        return _report_against_profile(validate_profile(reference), current, thresholds,
                                       feature_thresholds, exact_pvalues, plots)
    ref = _checked_columns(as_columns(reference), "reference")
    cur = _checked_columns(as_columns(current), "current")
    missing = [n for n in ref if n not in cur]
    if missing:
        raise DriftInputError(f"current data lacks reference column(s): {', '.join(missing)}")
    numeric, cats = _split_kinds(ref, categorical)
    for name in cats:
        if name in (categorical or ()):
            continue
        if _is_numeric(cur[name]):
            raise DriftInputError(f"column {name!r} is categorical (text) in the reference but numeric in the current data")
    ref_rows, cur_rows = len(next(iter(ref.values()))), len(next(iter(cur.values())))

    sorted_ref, n_ref = _sorted_numeric([_numeric(ref[n], n, "the reference") for n in numeric])
    sorted_cur, n_cur = _sorted_numeric([_numeric(cur[n], n, "the current data") for n in numeric])
    for i, name in enumerate(numeric):
        if n_ref[i] == 0:
            raise DriftInputError(f"column {name!r} of the reference has no finite values (all NaN/inf)")
        if n_cur[i] == 0:
            raise DriftInputError(f"column {name!r} of the current data has no finite values (all NaN/inf)")
    features: dict[str, FeatureDrift] = {}
    plot_data: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    if numeric:
        ks, w1 = _core.drift_compare_sorted(sorted_ref, n_ref, sorted_cur, n_cur)
        pvalues = ks_pvalue(ks, n_ref, n_cur, exact=exact_pvalues)
        for i, name in enumerate(numeric):
            r = sorted_ref[i, : n_ref[i]]
            c = sorted_cur[i, : n_cur[i]]
            entry = profiles.numeric_entry_sorted(r, ref_rows, bins)
            edges = np.asarray(entry["edges"])
            ref_counts = np.asarray(entry["frequencies"])
            cur_counts = profiles.bin_counts(c, edges)
            std = entry["std"]
            stats = {"psi": psi(ref_counts, cur_counts), "js": js_distance(ref_counts, cur_counts),
                     "ks": float(ks[i]), "ks_pvalue": float(pvalues[i]),
                     "wasserstein": _normalised(float(w1[i]), std),
                     "mean_shift": _normalised(float(c.mean()) - entry["mean"], std)}
            out_of_range = (np.searchsorted(c, entry["min"], "left") + len(c) - np.searchsorted(c, entry["max"], "right")) / len(c)
            features[name] = FeatureDrift(
                name, "numeric", stats, _thresholds_for(name, thresholds, feature_thresholds).crossed(stats, "numeric"),
                int(n_ref[i]), int(n_cur[i]), 1.0 - n_ref[i] / ref_rows, 1.0 - n_cur[i] / cur_rows,
                {"out_of_range": float(out_of_range), "reference_mean": entry["mean"], "reference_std": std,
                 "current_mean": float(c.mean())})
            if plots:
                plot_data[name] = _display_histograms(r, c)
    for name in cats:
        ref_labels, ref_counts, ref_missing = _category_counts(ref[name])
        cur_labels, cur_counts, cur_missing = _category_counts(cur[name])
        if ref_counts.sum() == 0:
            raise DriftInputError(f"column {name!r} of the reference has only missing values")
        if cur_counts.sum() == 0:
            raise DriftInputError(f"column {name!r} of the current data has only missing values")
        stats, new, r, q = _categorical_stats(ref_labels, ref_counts / ref_counts.sum(), cur_labels, cur_counts)
        features[name] = FeatureDrift(
            name, "categorical", stats,
            _thresholds_for(name, thresholds, feature_thresholds).crossed(stats, "categorical"),
            int(ref_counts.sum()), int(cur_counts.sum()), ref_missing / ref_rows, cur_missing / cur_rows,
            {"new_categories": new[:20], "new_category_count": len(new)})
        if plots:
            plot_data[name] = (np.asarray(ref_labels + new, dtype=object), r, q)
    return DriftReport([features[n] for n in ref], thresholds, ref_rows, cur_rows, True, plot_data,
                       [n for n in cur if n not in ref])


def _normalised(value: float, std: float) -> float:
    if std > 0:
        return value / std
    return 0.0 if value == 0 else math.inf


def _display_histograms(r: np.ndarray, c: np.ndarray, bins: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Uniform-bin histograms of both sorted samples over their joint 0.1%-99.9% range."""
    lo = min(r[int(0.001 * (len(r) - 1))], c[int(0.001 * (len(c) - 1))])
    hi = max(r[int(0.999 * (len(r) - 1))], c[int(0.999 * (len(c) - 1))])
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    def hist(s: np.ndarray) -> np.ndarray:
        cum = np.searchsorted(s, edges, side="right")
        counts = np.diff(cum).astype(np.float64)
        counts[0] += cum[0]  # values below the range go in the first bin, above in the last
        counts[-1] += len(s) - cum[-1]
        return counts / len(s)
    return edges, hist(r), hist(c)


def _report_against_profile(profile: dict[str, Any], current: Any, thresholds: DriftThresholds,
                            feature_thresholds: Mapping[str, Mapping[str, Any]] | None,
                            exact_pvalues: bool, plots: bool) -> DriftReport:
    cur = _checked_columns(as_columns(current), "current")
    feats = profile["features"]
    missing = [n for n in feats if n not in cur]
    if missing:
        raise DriftInputError(f"current data lacks profile column(s): {', '.join(missing)}")
    cur_rows = len(next(iter(cur.values())))
    numeric = [n for n, e in feats.items() if e["kind"] == "numeric"]
    sorted_cur, n_cur = _sorted_numeric([_numeric(cur[n], n, "the current data") for n in numeric])
    results: dict[str, FeatureDrift] = {}
    plot_data: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for i, name in enumerate(numeric):
        if n_cur[i] == 0:
            raise DriftInputError(f"column {name!r} of the current data has no finite values (all NaN/inf)")
        entry = feats[name]
        c = sorted_cur[i, : n_cur[i]]
        edges = np.asarray(entry["edges"], dtype=np.float64)
        counts = profiles.bin_counts(c, edges)
        sums = profiles.bin_sums(c, edges)
        known = profiles.has_values(entry)
        below = int(np.searchsorted(c, entry["min"], "left")) if known else 0
        above = int(len(c) - np.searchsorted(c, entry["max"], "right")) if known else 0
        results[name] = compare_numeric(name, entry, counts, sums, len(c), cur_rows - len(c), below, above,
                                        _thresholds_for(name, thresholds, feature_thresholds), exact_pvalues)
        if known:
            results[name].stats["mean_shift"] = _normalised(float(c.mean()) - entry["mean"], entry["std"])
        if plots and known:
            plot_data[name] = (edges, np.asarray(entry["frequencies"]), counts / len(c))
    for name, entry in feats.items():
        if entry["kind"] != "categorical":
            continue
        labels, counts, missing_count = _category_counts(cur[name])
        if counts.sum() == 0:
            raise DriftInputError(f"column {name!r} of the current data has only missing values")
        results[name] = compare_categorical(name, entry, labels, counts, missing_count,
                                            _thresholds_for(name, thresholds, feature_thresholds))
        if plots:
            ref_labels = list(entry["frequencies"])
            _, new, r, q = _categorical_stats(ref_labels, np.asarray(list(entry["frequencies"].values())), labels, counts)
            plot_data[name] = (np.asarray(ref_labels + new, dtype=object), r, q / q.sum())
    return DriftReport([results[n] for n in feats], thresholds, int(profile.get("rows", 0)), cur_rows, False,
                       plot_data, [n for n in cur if n not in feats])


def compare_numeric(name: str, entry: Mapping[str, Any], counts: np.ndarray, sums: np.ndarray, present: int,
                    missing: int, below: int, above: int, thresholds: DriftThresholds,
                    exact_pvalues: bool = False) -> FeatureDrift:
    """Drift of a numeric feature from current bin counts (and the sums of the values in
    each bin) over the profile entry's bins.

    Used by profile-based reports and by the online monitor (sketch snapshots). An entry
    of an all-missing reference column has nothing to compare: its statistics are None.
    """
    ref_freq = np.asarray(entry["frequencies"], dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    sums = np.asarray(sums, dtype=np.float64)
    if len(counts) != len(ref_freq) or len(sums) != len(ref_freq):
        raise DriftInputError(f"feature {name!r}: {len(counts)} bin counts for {len(ref_freq)} profile bins")
    ref_present = round(entry["count"] * (1.0 - entry["null_fraction"]))
    known = profiles.has_values(entry)
    std = float(entry["std"]) if known else math.nan
    stats: dict[str, float | None]
    if present == 0 or not known:
        stats = {"psi": None, "js": None, "ks": None, "ks_pvalue": None, "wasserstein": None}
    else:
        edges = np.asarray(entry["edges"], dtype=np.float64)
        # Split off the values beyond the reference range as two more bins (reference mass
        # 0): a shift outside the training range shows even when all of it lands in one
        # open outer bin (e.g. a constant reference has a single bin).
        inner = counts.copy()
        inner[0] -= below
        inner[-1] -= above
        cur_ext = np.concatenate(([below], inner, [above]))
        ref_ext = np.concatenate(([0.0], ref_freq, [0.0]))
        ks = binned_ks(ref_ext, cur_ext)
        w1 = binned_wasserstein(edges, ref_freq, profiles.bin_means(entry), counts,
                                sums / np.maximum(counts, 1.0))
        stats = {"psi": psi(ref_ext, cur_ext), "js": js_distance(ref_ext, cur_ext), "ks": ks,
                 "ks_pvalue": float(ks_pvalue(ks, max(ref_present, 1), present, exact=exact_pvalues)),
                 "wasserstein": _normalised(w1, std)}
    total = present + missing
    return FeatureDrift(name, "numeric", stats, thresholds.crossed(stats, "numeric"), ref_present, present,
                        float(entry["null_fraction"]), missing / total if total else 0.0,
                        {"out_of_range": (below + above) / present if present else 0.0,
                         "reference_mean": entry.get("mean"), "reference_std": entry.get("std")})


def compare_categorical(name: str, entry: Mapping[str, Any], labels: list[str], counts: np.ndarray,
                        missing: int, thresholds: DriftThresholds) -> FeatureDrift:
    """Drift of a categorical feature from current category counts against a profile entry."""
    ref_labels = list(entry["frequencies"])
    ref_freq = np.asarray([entry["frequencies"][k] for k in ref_labels], dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    present = int(counts.sum())
    if present == 0:
        stats: dict[str, float | None] = {"psi": None, "js": None}
        new: list[str] = []
    else:
        stats, new, _, _ = _categorical_stats(ref_labels, ref_freq, labels, counts)
    ref_present = round(entry["count"] * (1.0 - entry["null_fraction"]))
    total = present + missing
    return FeatureDrift(name, "categorical", stats, thresholds.crossed(stats, "categorical"), ref_present, present,
                        float(entry["null_fraction"]), missing / total if total else 0.0,
                        {"new_categories": new[:20], "new_category_count": len(new)})
