"""Ground truth: labels joined to logged predictions, rolling quality, production feature
importance and group (bias) metrics, with degradation alerts.

How labels meet predictions
---------------------------
The server's prediction log (monitor/predlog.py) holds sampled requests: request id, model,
version, inputs and outputs. Labels arrive later (``POST /v2/models/{m}/feedback`` or
``vivace monitor feedback FILE``), one item per logged request id, or per entity (the value
of a declared entity-key input and an optional time: the latest prediction for that entity
at or before the time). Accepted labels are appended to the feedback log beside the
prediction log (``<stem>-feedback<suffix>``, one file per writer, rotated like it) before
they are acknowledged, so nothing acknowledged is lost, and they can be joined again offline.

`LogJoin` tails both logs (every worker's files and their rotated backups, by inode and
offset) and joins each label to the prediction it names:

* **late labels** join whenever the prediction is still in the index: the last
  `max_predictions` logged requests (``--feedback-index``), however old;
* **duplicates**: the *last label wins* — a second label for the same request row
  replaces the first in the window (counted under ``duplicates``);
* **unknown ids** (never logged, not sampled, or evicted) are counted, listed in the
  answer, and kept in the feedback log; they are not errors;
* a label list whose length is not the request's row count is counted as ``mismatched``.

Quality (per model version, over the last `window` labelled rows)
----------------------------------------------------------------
The prediction of a row is the first value of the first output. A ``binary`` model (the
package's ``metadata.task``, or: predictions in [0, 1] and labels 0/1) gets accuracy
(threshold 0.5), ROC AUC (rank-sum, ties halved), log-loss (predictions clipped to
[1e-15, 1 - 1e-15]), Brier score and expected calibration error (10 equal-width bins:
the row-weighted mean of |observed rate - mean prediction|) with its reliability bins; a
regression model MAE, RMSE and bias (mean prediction - label).

Group metrics (bias)
--------------------
For each sensitive attribute — the package's ``metadata.sensitive`` columns (their value is
read from the logged inputs; a categorical code maps back to its category) or any attribute
a label carries in ``groups`` — per group: rows, label rate, selection rate (prediction >=
0.5), true and false positive rates, error rate; and the differences max - min across
groups: demographic parity difference (selection rates), equal opportunity difference
(true positive rates), error rate difference. Regression: per-group MAE and its difference.

Production feature importance
-----------------------------
Permutation importance on a sample of at most `importance_rows` recent rows, every
`importance_interval` seconds, on the monitor's own thread (never on the request path),
with a model copy of its own (the server passes `ModelInfo.predict`). Method: for repeat
r = 0..R-1 and feature j = 0..F-1 in that order, column j of the sample is permuted with
``numpy.random.default_rng(seed).permutation(n)`` (one generator for the whole run) and
the whole stack of F x R permuted copies is scored in one call. With labels for at least
`importance_min_labels` of the sampled rows, importance is the mean drop of the quality
score (AUC for binary models with both classes present, else accuracy; minus RMSE for
regression) — the same method `vivace train` records on the validation set; without
labels it is the sensitivity of the prediction: the mean absolute change of the output.
"""
from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from .alerts import AlertConfig, Periodic, fire_alert
from .predlog import RotatingFile

log = logging.getLogger("vivace.monitor.quality")

MAX_LABELS_PER_REQUEST = 10_000
RELIABILITY_BINS = 10
HIGHER_IS_BETTER = {"accuracy", "auc"}  # of the quality metrics; every other one is lower-is-better
FAIRNESS_METRICS = ("demographic_parity_difference", "equal_opportunity_difference", "error_rate_difference",
                    "mae_difference")


# ---- the feedback format ----------------------------------------------------------------

Scalar = bool | int | float | str


class FeedbackItem(msgspec.Struct, forbid_unknown_fields=True):
    """One label: for a logged request id, or for an entity (its key input's value)."""

    label: bool | float | list[bool | float]  # one per row of the request (or of `row`)
    id: str | None = None
    row: int | None = None                     # label one row of a multi-row request
    entity: dict[str, int | str] | None = None  # {entity-key input: value}
    time: float | None = None                  # with entity: the prediction at or before this time
    groups: dict[str, Scalar] | None = None    # sensitive attributes of the row(s)


class FeedbackRequest(msgspec.Struct, forbid_unknown_fields=True):
    labels: list[FeedbackItem]


_decoder = msgspec.json.Decoder(FeedbackRequest)


class FeedbackError(ValueError):
    """A feedback body that cannot be accepted; `status` is the HTTP status (400 or 413)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def parse_feedback(body: bytes, max_labels: int = MAX_LABELS_PER_REQUEST) -> list[FeedbackItem]:
    """Validate a feedback body entirely (nothing is applied unless all of it is valid)."""
    if not body.strip():
        raise FeedbackError('the body must be a JSON object like {"labels": [{"id": "...", "label": 1}]}')
    try:
        items = _decoder.decode(body).labels
    except msgspec.DecodeError as exc:
        raise FeedbackError(f'invalid feedback body ({exc}); expected {{"labels": [{{"id": "...", "label": 1}}]}}') \
            from None
    if len(items) > max_labels:
        raise FeedbackError(f"{len(items)} labels in one request; at most {max_labels} (split the upload)", 413)
    for i, item in enumerate(items):
        where = f"labels[{i}]"
        if (item.id is None) == (item.entity is None):
            raise FeedbackError(f"{where}: give exactly one of 'id' (a logged request id) or 'entity'")
        if item.id is not None and not (0 < len(item.id) <= 256):
            raise FeedbackError(f"{where}.id: must be 1 to 256 characters")
        if item.entity is not None and len(item.entity) != 1:
            raise FeedbackError(f"{where}.entity: must name one entity-key input, e.g. {{\"customer_id\": 42}}")
        if item.row is not None and (item.row < 0 or isinstance(item.label, list)):
            raise FeedbackError(f"{where}.row: a non-negative row index, with one scalar label")
        labels = item.label if isinstance(item.label, list) else [item.label]
        if not labels or len(labels) > 65_536:
            raise FeedbackError(f"{where}.label: one value per row of the request (1 to 65536)")
        if any(isinstance(v, float) and not math.isfinite(v) for v in labels):
            raise FeedbackError(f"{where}.label: labels must be finite numbers")
        if item.time is not None and not math.isfinite(item.time):
            raise FeedbackError(f"{where}.time: unix seconds")
        if item.groups is not None and len(item.groups) > 32:
            raise FeedbackError(f"{where}.groups: at most 32 attributes")
    return items


def feedback_log_path(prediction_log: str | os.PathLike) -> Path:
    """Where the labels of a server with this prediction log are kept."""
    path = Path(prediction_log)
    return path.with_name(f"{path.stem}-feedback{path.suffix}")


def _log_family(base: Path, feedback: bool) -> list[Path]:
    """The files of a log (base, its workers' files, rotated backups), oldest first."""
    stem, suffix = base.stem, base.suffix
    if base.parent.is_dir():
        names = [p for p in base.parent.iterdir() if p.is_file()]
    else:
        names = []
    tag = "-feedback" if feedback else ""
    own = re.compile(re.escape(stem) + r"(?:\.worker\d+)?" + re.escape(tag) + r"(?:\.worker\d+)?"
                     + re.escape(suffix) + r"(?:\.(\d+))?")
    found = []
    for p in names:
        m = own.fullmatch(p.name)
        if m and (feedback or "-feedback" not in p.name):
            found.append((-int(m.group(1) or 0), p.name, p))
    return [p for *_, p in sorted(found)]


# ---- metrics ----------------------------------------------------------------------------

def _finite(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties counted half; NaN with one class."""
    y = np.asarray(y) == 1
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(np.asarray(p, dtype=np.float64), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]  # average rank of ties, 1-based
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def reliability(y: np.ndarray, p: np.ndarray, bins: int = RELIABILITY_BINS) -> tuple[float, list[dict[str, Any]]]:
    """Expected calibration error over equal-width bins of [0, 1], and the bins."""
    y, p = np.asarray(y, np.float64), np.clip(np.asarray(p, np.float64), 0.0, 1.0)
    index = np.minimum((p * bins).astype(np.int64), bins - 1)
    ece, out = 0.0, []
    for b in range(bins):
        sel = index == b
        n = int(sel.sum())
        entry: dict[str, Any] = {"lower": b / bins, "upper": (b + 1) / bins, "count": n,
                                 "mean_predicted": None, "observed_rate": None}
        if n:
            mp, obs = float(p[sel].mean()), float(y[sel].mean())
            entry.update(mean_predicted=mp, observed_rate=obs)
            ece += n / len(p) * abs(obs - mp)
        out.append(entry)
    return (ece if len(p) else float("nan")), out


def classification_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    if not len(y):
        return {}
    clipped = np.clip(p, 1e-15, 1 - 1e-15)
    ece, _ = reliability(y, p)
    return {
        "accuracy": float(((p >= 0.5) == (y == 1)).mean()),
        "auc": auc(y, p),
        "logloss": float(-(y * np.log(clipped) + (1 - y) * np.log(1 - clipped)).mean()),
        "brier": float(((p - y) ** 2).mean()),
        "ece": float(ece),
    }


def regression_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    if not len(y):
        return {}
    err = p - y
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean())), "bias": float(err.mean())}


def quality_metrics(task: str, y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    return classification_metrics(y, p) if task == "binary" else regression_metrics(y, p)


def group_metrics(task: str, y: np.ndarray, p: np.ndarray, groups: Sequence[Any]) -> dict[str, Any]:
    """Per-group rates and their max - min differences across groups (rows without a group
    value, None, are left out)."""
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    keys = np.asarray(["" if g is None else str(g) for g in groups], dtype=object)
    known = np.asarray([g is not None for g in groups], dtype=bool)
    per: dict[str, dict[str, Any]] = {}
    for g in sorted(set(keys[known].tolist())):
        sel = known & (keys == g)
        yg, pg = y[sel], p[sel]
        if task == "binary":
            chosen, positive = pg >= 0.5, yg == 1
            per[g] = {
                "rows": int(sel.sum()),
                "label_rate": float(positive.mean()),
                "selection_rate": float(chosen.mean()),
                "tpr": float(chosen[positive].mean()) if positive.any() else None,
                "fpr": float(chosen[~positive].mean()) if (~positive).any() else None,
                "error_rate": float((chosen != positive).mean()),
            }
        else:
            per[g] = {"rows": int(sel.sum()), "mae": float(np.abs(pg - yg).mean()), "mean_prediction": float(pg.mean())}

    def spread(key: str) -> float | None:
        values = [v[key] for v in per.values() if v.get(key) is not None]
        return float(max(values) - min(values)) if len(values) >= 2 else None

    out: dict[str, Any] = {"groups": per}
    if task == "binary":
        out["demographic_parity_difference"] = spread("selection_rate")
        out["equal_opportunity_difference"] = spread("tpr")
        out["error_rate_difference"] = spread("error_rate")
    else:
        out["mae_difference"] = spread("mae")
    return out


def importance_score(task: str, y: np.ndarray, p: np.ndarray) -> tuple[str, float]:
    """(name, value) of the score permutation importance measures drops of (higher is better)."""
    if task == "binary":
        if len(np.unique(y)) == 2:
            return "auc", auc(y, p)
        return "accuracy", float(((p >= 0.5) == (y == 1)).mean())
    return "neg_rmse", -float(np.sqrt(((p - y) ** 2).mean()))


def permutation_importance(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, names: Sequence[str],
                           y: np.ndarray | None = None, task: str = "binary", repeats: int = 3,
                           seed: int = 0) -> dict[str, Any]:
    """Permutation importance of each column of `x` (method in the module docstring):
    {"method", "metric", "rows", "repeats", "features": {name: mean}, "std": {name: std}}."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, f = x.shape
    rng = np.random.default_rng(seed)
    stack = np.empty((repeats * f + 1, n, f), dtype=np.float32)
    stack[0] = x
    for r in range(repeats):
        for j in range(f):
            k = 1 + r * f + j
            stack[k] = x
            stack[k, :, j] = x[rng.permutation(n), j]
    out = np.asarray(predict(stack.reshape(-1, f)), dtype=np.float64).reshape(repeats * f + 1, n, -1)[:, :, 0]
    base = out[0]
    drops = np.empty((repeats, f))
    if y is not None:
        metric, base_score = importance_score(task, y, base)
        for r in range(repeats):
            for j in range(f):
                drops[r, j] = base_score - importance_score(task, y, out[1 + r * f + j])[1]
        method = "permutation"
    else:
        metric = "mean_abs_change"
        for r in range(repeats):
            for j in range(f):
                drops[r, j] = float(np.abs(out[1 + r * f + j] - base).mean())
        method = "sensitivity"
    return {"method": method, "metric": metric, "rows": int(n), "repeats": repeats, "seed": seed,
            "features": {name: float(drops[:, j].mean()) for j, name in enumerate(names)},
            "std": {name: float(drops[:, j].std()) for j, name in enumerate(names)}}


# ---- logged inputs as rows ---------------------------------------------------------------

def logged_matrix(inputs: Any, features: Sequence[dict[str, Any]] | None, input_name: str | None,
                  width: int | None) -> np.ndarray | None:
    """The model's FP32 input rows of a logged request: its one tensor (flat or nested data),
    or its raw features by name, encoded as `vivace train` encodes them (category index,
    -1 unseen; null -> NaN). None when the request was not logged that way."""
    if not isinstance(inputs, list) or not inputs:
        return None
    try:
        if len(inputs) == 1 and isinstance(inputs[0], dict) and (input_name is None or inputs[0].get("name") == input_name):
            data = np.asarray(inputs[0]["data"], dtype=np.float32)
            rows = int((inputs[0].get("shape") or [-1])[0])
            out = data.reshape(rows, -1)
            return out if width is None or out.shape[1] == width else None
        if features is None:
            return None
        by_name = {t.get("name"): t for t in inputs if isinstance(t, dict)}
        columns = []
        for spec in features:
            tensor = by_name.get(spec["name"])
            if tensor is None:
                return None
            values = [v[0] if isinstance(v, list) and len(v) == 1 else v for v in tensor["data"]]
            if spec["kind"] == "numeric":
                columns.append(np.asarray([np.nan if v is None else v for v in values], dtype=np.float32))
            else:
                codes = {c: k for k, c in enumerate(spec.get("categories") or [])}
                columns.append(np.asarray([codes.get(v, -1) if isinstance(v, str) else -1 for v in values],
                                          dtype=np.float32))
        return np.stack(columns, axis=1)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return None


def first_output(outputs: Any) -> np.ndarray | None:
    """The prediction per row: the first value of each row of the first output."""
    if not isinstance(outputs, list) or not outputs or not isinstance(outputs[0], dict):
        return None
    try:
        data = np.asarray(outputs[0]["data"], dtype=np.float64)
        rows = int((outputs[0].get("shape") or [len(data)])[0])
        return data.reshape(rows, -1)[:, 0]
    except (KeyError, TypeError, ValueError, IndexError):
        return None


# ---- models -------------------------------------------------------------------------------

@dataclass
class ModelInfo:
    """What the monitor knows of one served model version (built by the server, or from a
    package by the command line): task, input columns, sensitive attributes, entity keys,
    training-time importance and group metrics, and optionally a predictor for importance."""

    name: str
    version: str
    task: str | None = None                    # "binary" | "regression" | None: inferred
    features: list[dict[str, Any]] | None = None  # metadata.features of a trained model
    input_name: str | None = None              # the one input a row matrix comes from
    width: int | None = None                   # its columns
    sensitive: list[str] = field(default_factory=list)
    entity_keys: list[str] = field(default_factory=list)
    training_importance: dict[str, Any] | None = None
    training_fairness: dict[str, Any] | None = None
    predict: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def names(self) -> list[str]:
        if self.features:
            return [f["name"] for f in self.features]
        return [f"{self.input_name}[{j}]" for j in range(self.width or 0)]

    @classmethod
    def from_package(cls, name: str, version: str, package: Any,
                     predict: Callable[[np.ndarray], np.ndarray] | None = None) -> ModelInfo:
        """From a registry.package.ModelPackage (duck-typed: inputs, metadata)."""
        meta = package.metadata if isinstance(package.metadata, dict) else {}
        inputs = package.inputs
        single = len(inputs) == 1 and len(inputs[0].row_shape) == 1 and inputs[0].datatype in ("FP32", "FP64")
        features = meta.get("features") if single else None
        if features and inputs[0].row_shape[0] != len(features):
            features = None
        task = meta.get("task") if meta.get("task") in ("binary", "regression") else None
        entity_keys = [s.name for s in inputs if s.datatype in ("INT64", "INT32", "BYTES")
                       and s.row_elements == 1] if meta.get("feature_service") else []
        return cls(name, version, task, features, inputs[0].name if single else None,
                   inputs[0].row_shape[0] if single else None, list(meta.get("sensitive") or []), entity_keys,
                   meta.get("importance"), meta.get("fairness"), predict if single else None)


# ---- the join -------------------------------------------------------------------------------

@dataclass
class _Prediction:
    ts: float
    model: str
    version: str
    inputs: Any
    preds: np.ndarray
    matrix: np.ndarray | None = None
    converted: bool = False


@dataclass
class _Labelled:
    ts: float
    y: float
    p: float
    x: np.ndarray | None
    groups: dict[str, Any]


@dataclass
class QualityConfig:
    window: int = 10_000              # labelled rows per model version
    max_predictions: int = 100_000    # logged requests indexed for the join
    min_labels: int = 100             # before thresholds are judged
    thresholds: list[tuple[str, str, float]] = field(default_factory=list)  # (metric, ">=" | "<=", value)
    importance_interval: float = 60.0  # seconds; 0: off
    importance_rows: int = 1000
    importance_repeats: int = 3
    importance_min_labels: int = 200
    alerts: AlertConfig = field(default_factory=AlertConfig)


def parse_threshold(text: str) -> tuple[str, str, float]:
    """'auc>=0.7', 'logloss<=0.6', 'demographic_parity_difference<=0.1' -> (metric, op, value)."""
    m = re.fullmatch(r"\s*([a-z_]+)\s*(>=|<=)\s*([-+0-9.eE]+)\s*", text)
    if m is None:
        raise ValueError(f"a quality threshold is METRIC>=VALUE or METRIC<=VALUE, got {text!r}")
    return m.group(1), m.group(2), float(m.group(3))


class LogJoin:
    """Joins labels (the feedback log) to predictions (the prediction log), per model version.

    `models` gives the ModelInfo of a (model, version) (None: unknown, defaults apply).
    `own_pid`: counters count only the labels this process received (the other workers of
    a --workers server count theirs), while every process joins every worker's labels, so
    all of them show the same windows. None: count every label (offline use).
    """

    def __init__(self, prediction_log: str | os.PathLike, feedback_log: str | os.PathLike | None = None,
                 config: QualityConfig | None = None, own_pid: int | None = None,
                 models: Callable[[str, str], ModelInfo | None] | None = None, read_feedback: bool = True):
        self.prediction_log = Path(prediction_log)
        self.feedback_file = Path(feedback_log) if feedback_log is not None else None
        self.config = config or QualityConfig()
        self.own_pid = own_pid
        self.models = models or (lambda name, version: None)
        self.read_feedback = read_feedback  # False: labels come from `ingest` only (offline joins)
        self._lock = threading.RLock()
        self._offsets: dict[tuple[int, int], int] = {}   # (device, inode) -> bytes consumed
        self.predictions: OrderedDict[str, _Prediction] = OrderedDict()
        self._entities: dict[tuple[str, str], dict[Any, list[tuple[float, str, int]]]] = {}
        self.windows: dict[tuple[str, str], OrderedDict[tuple[str, int], _Labelled]] = {}
        self.counts: Counter[tuple[str, str, str]] = Counter()  # (model, version, outcome)
        self._batches: dict[str, Counter[str]] = {}
        self._unknown_ids: dict[str, list[str]] = {}
        self._changed: dict[tuple[str, str], int] = {}
        self._writer: RotatingFile | None = None
        self._encoder = msgspec.json.Encoder()

    # -- writing labels ----------------------------------------------------------------------
    def write(self, model: str, version: str | None, items: Iterable[FeedbackItem]) -> str:
        """Append labels to this process's feedback log; returns the batch id."""
        if self.feedback_file is None:
            raise ValueError("this join has no feedback file to write")
        if self._writer is None:
            self._writer = RotatingFile(self.feedback_file, max_bytes=64 << 20, backups=5)
        batch = uuid.uuid4().hex
        lines = b"".join(self._encoder.encode(r) + b"\n" for r in _records(model, version, items, batch))
        with self._lock:
            self._batches[batch] = Counter()
        self._writer.write(lines)  # one write: a batch is never split by a rotation
        return batch

    def ingest(self, model: str, version: str | None, items: Iterable[FeedbackItem]) -> dict[str, Any]:
        """Join labels directly, without a feedback file (offline: `vivace monitor feedback`)."""
        batch = uuid.uuid4().hex
        with self._lock:
            self._batches[batch] = Counter()
            for record in _records(model, version, items, batch):
                self._on_label(msgspec.json.decode(self._encoder.encode(record)))
        return self.batch_result(batch)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def batch_result(self, batch: str) -> dict[str, Any]:
        with self._lock:
            counts = self._batches.pop(batch, Counter())
            unknown = self._unknown_ids.pop(batch, [])
        return {"received": counts["received"], "joined": counts["joined"], "duplicates": counts["duplicates"],
                "unknown": counts["unknown"], "mismatched": counts["mismatched"], "unknown_ids": unknown[:20]}

    # -- reading the logs ------------------------------------------------------------------------
    def refresh(self) -> None:
        """Read what the logs gained since the last call: predictions first, then labels."""
        with self._lock:
            seen: set[tuple[int, int]] = set()
            for path in _log_family(self.prediction_log, feedback=False):
                self._tail(path, self._on_prediction, seen)
            for path in _log_family(self.prediction_log, feedback=True) if self.read_feedback else ():
                self._tail(path, self._on_label, seen)
            for key in [k for k in self._offsets if k not in seen]:  # deleted by rotation
                del self._offsets[key]

    def _tail(self, path: Path, handle: Callable[[dict[str, Any]], None], seen: set[tuple[int, int]]) -> None:
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                key = (st.st_dev, st.st_ino)
                seen.add(key)
                offset = self._offsets.get(key, 0)
                if st.st_size < offset:
                    offset = 0
                f.seek(offset)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next call
        self._offsets[key] = offset + end
        for line in data[:end].splitlines():
            try:
                record = msgspec.json.decode(line)
            except msgspec.DecodeError:
                continue
            if isinstance(record, dict):
                try:
                    handle(record)
                except (KeyError, TypeError, ValueError) as exc:
                    log.debug("skipping a log record of %s: %s", path, exc)

    def _on_prediction(self, record: dict[str, Any]) -> None:
        if record.get("shadow_of") is not None or record.get("inputs") is None:
            return  # a shadow copy answered nobody: labels belong to the answered version
        preds = first_output(record.get("outputs"))
        if preds is None:
            return
        rid, model, version = str(record["request_id"]), str(record["model"]), str(record["version"])
        entry = _Prediction(float(record.get("ts", 0.0)), model, version, record["inputs"], preds)
        self.predictions.pop(rid, None)
        self.predictions[rid] = entry
        while len(self.predictions) > self.config.max_predictions:
            self.predictions.popitem(last=False)
        for (m, key), index in self._entities.items():
            if m == model:
                self._index_entity(index, key, rid, entry)

    def _index_entity(self, index: dict[Any, list[tuple[float, str, int]]], key: str, rid: str,
                      entry: _Prediction) -> None:
        for tensor in entry.inputs if isinstance(entry.inputs, list) else ():
            if isinstance(tensor, dict) and tensor.get("name") == key:
                values = tensor.get("data") or []
                for row, v in enumerate(values):
                    v = v[0] if isinstance(v, list) and len(v) == 1 else v
                    if isinstance(v, (int, str)):
                        bucket = index.setdefault(v, [])
                        bucket.append((entry.ts, rid, row))
                        if len(bucket) > 64:
                            del bucket[0]

    def _entity_rows(self, model: str, key: str, value: Any, at: float | None) -> tuple[str, int] | None:
        index = self._entities.get((model, key))
        if index is None:  # first label by this key: index what the join holds, then keep it up
            index = self._entities[(model, key)] = {}
            for rid, entry in self.predictions.items():
                if entry.model == model:
                    self._index_entity(index, key, rid, entry)
        best = None
        for ts, rid, row in index.get(value, ()):
            if (at is None or ts <= at) and rid in self.predictions and (best is None or ts >= best[0]):
                best = (ts, rid, row)
        return None if best is None else (best[1], best[2])

    def _on_label(self, record: dict[str, Any]) -> None:
        model, want = str(record["model"]), record.get("version")
        batch = record.get("batch")
        own = self.own_pid is None or record.get("pid") == self.own_pid
        outcome = self._join(record, model, want)
        version = outcome[1] if outcome[1] is not None else (want or "")
        if own:
            self.counts[(model, version, "received")] += 1
            self.counts[(model, version, outcome[0])] += 1
        if batch in self._batches:
            counts = self._batches[batch]
            counts["received"] += 1
            counts[outcome[0]] += 1
            if outcome[0] == "unknown":
                ids = self._unknown_ids.setdefault(batch, [])
                if len(ids) < 20:
                    ids.append(str(record.get("id") or record.get("entity")))

    def _join(self, record: dict[str, Any], model: str, want: str | None) -> tuple[str, str | None]:
        rows: list[int] | None = None
        if record.get("id") is not None:
            rid = str(record["id"])
            entry = self.predictions.get(rid)
            if record.get("row") is not None:
                rows = [int(record["row"])]
        else:
            (key, value), = record["entity"].items()
            hit = self._entity_rows(model, key, value, record.get("time"))
            if hit is None:
                return "unknown", None
            rid, rows = hit[0], [hit[1]]
            entry = self.predictions.get(rid)
        if entry is None or entry.model != model or (want is not None and entry.version != want):
            return "unknown", None
        labels = record["label"] if isinstance(record["label"], list) else [record["label"]]
        if rows is None:
            rows = list(range(len(entry.preds)))
        if len(labels) != len(rows) or any(r >= len(entry.preds) for r in rows):
            return "mismatched", entry.version
        info = self.models(model, entry.version)
        x = self._matrix(entry, info)
        groups_given = record.get("groups") or {}
        window = self.windows.setdefault((model, entry.version), OrderedDict())
        duplicate = False
        for row, label in zip(rows, labels):
            groups = dict(groups_given)
            if info is not None and x is not None and info.features:
                for j, spec in enumerate(info.features):
                    if spec["name"] in info.sensitive and spec["name"] not in groups:
                        groups[spec["name"]] = _decode_value(spec, x[row, j])
            key = (rid, row)
            if key in window:
                duplicate = True
                del window[key]  # last label wins
            window[key] = _Labelled(entry.ts, float(label), float(entry.preds[row]),
                                    None if x is None else x[row], groups)
        while len(window) > self.config.window:
            window.popitem(last=False)
        self._changed[(model, entry.version)] = self._changed.get((model, entry.version), 0) + 1
        return ("duplicates" if duplicate else "joined"), entry.version

    def _matrix(self, entry: _Prediction, info: ModelInfo | None) -> np.ndarray | None:
        if not entry.converted:
            entry.converted = True
            entry.matrix = logged_matrix(entry.inputs, info.features if info else None,
                                         info.input_name if info else None, info.width if info else None)
            if entry.matrix is not None and entry.matrix.shape[0] != len(entry.preds):
                entry.matrix = None
        return entry.matrix

    # -- what the windows say ------------------------------------------------------------------------
    def labelled(self, model: str, version: str) -> list[_Labelled]:
        with self._lock:
            return list(self.windows.get((model, version), {}).values())

    def recent_inputs(self, model: str, version: str, rows: int) -> np.ndarray | None:
        """Up to `rows` logged input rows of a version, the newest first (for sensitivity)."""
        info = self.models(model, version)
        parts, total = [], 0
        with self._lock:
            for entry in reversed(self.predictions.values()):
                if entry.model != model or entry.version != version:
                    continue
                x = self._matrix(entry, info)
                if x is not None:
                    parts.append(x)
                    total += len(x)
                    if total >= rows:
                        break
        return np.concatenate(parts)[:rows] if parts else None

    def versions(self) -> list[tuple[str, str]]:
        with self._lock:
            return sorted(self.windows)

    def generation(self, model: str, version: str) -> int:
        with self._lock:
            return self._changed.get((model, version), 0)


def _records(model: str, version: str | None, items: Iterable[FeedbackItem], batch: str) -> Iterable[dict[str, Any]]:
    now, pid = time.time(), os.getpid()
    for item in items:
        yield {"ts": now, "pid": pid, "batch": batch, "model": model, "version": version,
               **{k: v for k, v in msgspec.structs.asdict(item).items() if v is not None}}


def _decode_value(spec: dict[str, Any], value: float) -> Any:
    if spec["kind"] == "categorical":
        categories = spec.get("categories") or []
        k = int(value) if math.isfinite(value) else -1
        return categories[k] if 0 <= k < len(categories) else None
    return None if not math.isfinite(value) else float(value)


def _infer_task(info: ModelInfo | None, rows: list[_Labelled]) -> str:
    if info is not None and info.task:
        return info.task
    if rows and all(r.y in (0.0, 1.0) and 0.0 <= r.p <= 1.0 for r in rows):
        return "binary"
    return "regression"


def performance(join: LogJoin, model: str, version: str, config: QualityConfig,
                importance: dict[str, Any] | None = None) -> dict[str, Any]:
    """The quality of one model version over its label window (GET .../performance)."""
    rows = join.labelled(model, version)
    info = join.models(model, version)
    task = _infer_task(info, rows)
    y = np.fromiter((r.y for r in rows), np.float64, len(rows))
    p = np.fromiter((r.p for r in rows), np.float64, len(rows))
    metrics = quality_metrics(task, y, p)
    bins = reliability(y, p)[1] if task == "binary" and len(rows) else []
    attributes = sorted({a for r in rows for a in r.groups} | set(info.sensitive if info else []))
    groups = {a: clean_json(group_metrics(task, y, p, [r.groups.get(a) for r in rows])) for a in attributes}
    judged = len(rows) >= config.min_labels
    checks = []
    for metric, op, value in config.thresholds:
        current = metrics.get(metric)
        if metric in FAIRNESS_METRICS:
            values = [g.get(metric) for g in groups.values() if g.get(metric) is not None]
            current = max(values) if values else None
        current = _finite(current)
        breached = judged and current is not None and (current < value if op == ">=" else current > value)
        checks.append({"metric": metric, "op": op, "threshold": value, "value": current, "breached": breached})
    counts = {k: join.counts[(model, version, k)] for k in ("received", "joined", "duplicates", "mismatched")}
    state = "collecting" if not judged else ("degraded" if any(c["breached"] for c in checks) else "ok")
    return {
        "model": model, "version": version, "task": task, "labels": len(rows), "window": config.window,
        "min_labels": config.min_labels, "state": state,
        "metrics": {k: _finite(v) for k, v in metrics.items()},
        "reliability": bins, "thresholds": checks, "feedback": counts, "groups": groups,
        "importance": importance,
        "training": {"importance": info.training_importance if info else None,
                     "fairness": info.training_fairness if info else None},
    }


def clean_json(obj: Any) -> Any:
    """`obj` with non-finite floats as None (strict JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, float):
        return _finite(obj)
    return obj


class QualityMonitor:
    """The server's side: joins labels, judges thresholds (alerts through monitor/alerts.py),
    computes production importance on its own thread, and reports gauges."""

    def __init__(self, join: LogJoin, config: QualityConfig,
                 served: Callable[[], list[ModelInfo]] = list, clock: Callable[[], float] = time.time):
        self.join = join
        self.config = config
        self.served = served
        self.clock = clock
        self.importance: dict[tuple[str, str], dict[str, Any]] = {}
        self.breached: dict[tuple[str, str], set[str]] = {}
        self.last_alert_at: dict[tuple[str, str], float] = {}
        self.alerts: list[dict[str, Any]] = []
        self.processes: list[Any] = []
        self._cache: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._periodic = Periodic("quality-monitor", self.run_once, "quality monitoring round")
        self._last_importance = 0.0

    def feedback(self, model: str, version: str | None, items: list[FeedbackItem]) -> dict[str, Any]:
        """Record labels (durably, in the feedback log), join them, answer what became of them."""
        batch = self.join.write(model, version, items)
        self.join.refresh()
        result = {"model": model, **self.join.batch_result(batch)}
        self.check()
        return result

    def performance(self, model: str, version: str) -> dict[str, Any]:
        generation = self.join.generation(model, version)
        with self._lock:
            cached = self._cache.get((model, version))
            importance = self.importance.get((model, version))
        if cached is not None and cached[0] == generation and cached[1]["importance"] is importance:
            return cached[1]
        doc = performance(self.join, model, version, self.config, importance)
        doc["last_alert_at"] = self.last_alert_at.get((model, version))
        with self._lock:
            self._cache[(model, version)] = (generation, doc)
        return doc

    def check(self) -> list[dict[str, Any]]:
        """Judge every labelled version's thresholds; fire an alert for newly breached ones."""
        fired = []
        if not self.config.thresholds:
            return fired
        for model, version in self.join.versions():
            doc = self.performance(model, version)
            now_breached = {c["metric"] for c in doc["thresholds"] if c["breached"]}
            key = (model, version)
            new = now_breached - self.breached.get(key, set())
            self.breached[key] = now_breached
            last = self.last_alert_at.get(key)
            if not new or (last is not None and self.clock() - last < self.config.alerts.cooldown_s):
                continue
            self.last_alert_at[key] = self.clock()
            alert = {"kind": "quality", "model": model, "version": version, "breached": sorted(now_breached),
                     "metrics": doc["metrics"], "labels": doc["labels"],
                     "thresholds": [c for c in doc["thresholds"] if c["breached"]], "time": self.last_alert_at[key]}
            self.alerts.append(alert)
            fired.append(alert)
            fire_alert(self.config.alerts, alert, f"quality of {', '.join(sorted(now_breached))} degraded",
                       {"VIVACE_QUALITY_METRICS": ",".join(sorted(now_breached))}, self.processes)
        return fired

    def compute_importance(self, info: ModelInfo) -> dict[str, Any] | None:
        """Production importance of one version now (labels when there are enough)."""
        if info.predict is None or not (info.width or info.features):
            return None
        started = time.perf_counter()
        rows = [r for r in self.join.labelled(info.name, info.version) if r.x is not None]
        rows = rows[-self.config.importance_rows:]
        if len(rows) >= self.config.importance_min_labels:
            x = np.stack([r.x for r in rows])
            y = np.fromiter((r.y for r in rows), np.float64, len(rows))
            task = _infer_task(info, rows)
        else:
            x, y, task = self.join.recent_inputs(info.name, info.version, self.config.importance_rows), None, \
                info.task or "binary"
            if x is None or len(x) < 2:
                return None
        result = permutation_importance(info.predict, x, info.names, y, task, self.config.importance_repeats)
        result["seconds"] = time.perf_counter() - started
        result["computed_at"] = self.clock()
        with self._lock:
            self.importance[(info.name, info.version)] = result
        return result

    def run_once(self) -> None:
        self.join.refresh()
        self.check()
        interval = self.config.importance_interval
        if interval > 0 and time.monotonic() - self._last_importance >= interval:
            self._last_importance = time.monotonic()
            for info in self.served():
                try:
                    self.compute_importance(info)
                except Exception:  # noqa: BLE001 - one model's failure must not stop monitoring
                    log.exception("importance of %s/%s failed", info.name, info.version)

    def start(self, interval_s: float = 5.0) -> None:
        self._periodic.start(interval_s)

    def stop(self) -> None:
        self._periodic.stop()
        self.join.close()

    def gauge_samples(self) -> dict[str, list[tuple[list[str], float]]]:
        """Families of /metrics: {family: [(label values after model and version, value)]}
        keyed by (model, version) inside the label values (model, version first)."""
        out: dict[str, list[tuple[list[str], float]]] = {
            "quality": [], "labels": [], "importance": [], "group": [], "fairness": [], "feedback": []}
        for info in self.served():
            for source, doc in (("training", info.training_importance),
                                ("production", self.importance.get((info.name, info.version)))):
                for feature, value in ((doc or {}).get("features") or {}).items():
                    if _finite(value) is not None:
                        out["importance"].append(([info.name, info.version, feature, source], float(value)))
        keys = set(self.join.versions()) | {(m, v) for m, v, _ in self.join.counts}
        for model, version in sorted(keys):
            for outcome in ("received", "joined", "duplicates", "unknown", "mismatched"):
                count = self.join.counts.get((model, version, outcome), 0)
                if count or version:
                    out["feedback"].append(([model, version, outcome], float(count)))
            if (model, version) not in self.join.windows:
                continue
            doc = self.performance(model, version)
            out["labels"].append(([model, version], float(doc["labels"])))
            for metric, value in doc["metrics"].items():
                if value is not None:
                    out["quality"].append(([model, version, metric], value))
            for attribute, g in doc["groups"].items():
                for metric in FAIRNESS_METRICS:
                    if g.get(metric) is not None:
                        out["fairness"].append(([model, version, attribute, metric], g[metric]))
                for group, stats in g["groups"].items():
                    for metric, value in stats.items():
                        if metric != "rows" and value is not None:
                            out["group"].append(([model, version, attribute, group, metric], value))
        return out
