"""Ground-truth metrics (monitor/quality.py) against reference implementations: scikit-learn's
metrics and permutation importance, fairness metrics by hand; and the label join on real
prediction-log files (late labels, duplicates, unknown ids, rotation, entities)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, brier_score_loss, log_loss, mean_absolute_error, mean_squared_error, \
    roc_auc_score

from vivace.monitor.predlog import PredictionLogger
from vivace.monitor.quality import (
    FeedbackError,
    LogJoin,
    ModelInfo,
    QualityConfig,
    classification_metrics,
    group_metrics,
    parse_feedback,
    performance,
    permutation_importance,
    regression_metrics,
)


def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(3)
    p = np.round(rng.random(2000), 2)  # rounded: many ties for the AUC
    y = (rng.random(2000) < p).astype(float)
    m = classification_metrics(y, p)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p >= 0.5))
    assert m["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert m["logloss"] == pytest.approx(log_loss(y, np.clip(p, 1e-15, 1 - 1e-15)), rel=1e-9)
    assert m["brier"] == pytest.approx(brier_score_loss(y, p))
    # expected calibration error by hand: 10 equal-width bins, the last one closed
    ece = 0.0
    for b in range(10):
        sel = (p >= b / 10) & ((p < (b + 1) / 10) if b < 9 else (p <= 1))
        if sel.any():
            ece += sel.mean() * abs(y[sel].mean() - p[sel].mean())
    assert m["ece"] == pytest.approx(ece, abs=1e-9)


def test_regression_metrics_match_sklearn():
    rng = np.random.default_rng(4)
    y, p = rng.normal(size=500), rng.normal(size=500)
    m = regression_metrics(y, p)
    assert m["mae"] == pytest.approx(mean_absolute_error(y, p))
    assert m["rmse"] == pytest.approx(np.sqrt(mean_squared_error(y, p)))


def test_group_metrics_by_hand():
    y = np.array([1, 0, 1, 1, 0, 0, 1, 0], float)
    p = np.array([0.9, 0.6, 0.2, 0.7, 0.1, 0.4, 0.8, 0.3])
    g = ["a", "a", "a", "a", "b", "b", "b", None]
    out = group_metrics("binary", y, p, g)
    # a: selected 3 of 4, TPR 2/3 (positives rows 0,2,3), errors: row1 (FP), row2 (FN) -> 0.5
    # b: selected 1 of 3, TPR 1/1, errors 0
    assert out["groups"]["a"] == {"rows": 4, "label_rate": 0.75, "selection_rate": 0.75, "tpr": pytest.approx(2 / 3),
                                  "fpr": 1.0, "error_rate": 0.5}
    assert out["groups"]["b"]["selection_rate"] == pytest.approx(1 / 3) and out["groups"]["b"]["tpr"] == 1.0
    assert out["demographic_parity_difference"] == pytest.approx(0.75 - 1 / 3)
    assert out["equal_opportunity_difference"] == pytest.approx(1 - 2 / 3)
    assert out["error_rate_difference"] == pytest.approx(0.5)


def _linear(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-(2.0 * x[:, 0] - 1.0 * x[:, 1] + 0.0 * x[:, 2])))


def test_permutation_importance_matches_a_direct_permutation_and_sklearn():
    from sklearn.inspection import permutation_importance as sk_permutation_importance

    rng = np.random.default_rng(5)
    x = rng.normal(size=(400, 3)).astype(np.float32)
    y = (rng.random(400) < _linear(x)).astype(float)
    got = permutation_importance(_linear, x, ["a", "b", "c"], y, "binary", repeats=4, seed=9)
    # the documented method, written out: one generator, repeat-major, feature-minor
    perm = np.random.default_rng(9)
    base = roc_auc_score(y, _linear(x))
    drops = np.zeros((4, 3))
    for r in range(4):
        for j in range(3):
            xp = x.copy()
            xp[:, j] = x[perm.permutation(400), j]
            drops[r, j] = base - roc_auc_score(y, _linear(xp))
    assert got["method"] == "permutation" and got["metric"] == "auc"
    assert [got["features"][n] for n in "abc"] == pytest.approx(drops.mean(axis=0).tolist(), abs=1e-6)

    from sklearn.base import BaseEstimator

    class Fixed(BaseEstimator):  # scikit-learn's own permutation importance on the same function
        def fit(self, *a):
            return self

    sk = sk_permutation_importance(Fixed(), x, y, scoring=lambda est, xs, ys: roc_auc_score(ys, _linear(xs)),
                                   n_repeats=30, random_state=0)
    assert np.argsort(-sk.importances_mean).tolist() == np.argsort(-drops.mean(axis=0)).tolist()
    assert got["features"]["a"] == pytest.approx(sk.importances_mean[0], rel=0.25)
    assert abs(got["features"]["c"]) < 1e-9  # the model ignores c

    sens = permutation_importance(_linear, x, ["a", "b", "c"], None, repeats=2, seed=1)
    perm = np.random.default_rng(1)
    expected = np.zeros((2, 3))
    for r in range(2):
        for j in range(3):
            xp = x.copy()
            xp[:, j] = x[perm.permutation(400), j]
            expected[r, j] = np.abs(_linear(xp) - _linear(x)).mean()
    assert sens["method"] == "sensitivity"
    assert [sens["features"][n] for n in "abc"] == pytest.approx(expected.mean(axis=0).tolist(), abs=1e-6)


@pytest.mark.parametrize("body, status, words", [
    (b"", 400, "JSON object"),
    (b"{", 400, "truncated"),
    (b'{"labels": [{"id": "a", "label": "yes"}]}', 400, "label"),
    (b'{"labels": [{"id": 7, "label": 1}]}', 400, "id"),
    (b'{"labels": [{"label": 1}]}', 400, "exactly one of"),
    (b'{"labels": [{"id": "a", "entity": {"k": 1}, "label": 1}]}', 400, "exactly one of"),
    (b'{"labels": [{"id": "a", "label": 1, "extra": 2}]}', 400, "unknown field"),
    (b'{"labels": [{"id": "a", "label": [1, 0], "row": 1}]}', 400, "row"),
    (b'{"labels": "x"}', 400, "array"),
    (b"[1, 2]", 400, "object"),
    (json.dumps({"labels": [{"id": str(i), "label": 1} for i in range(10_001)]}).encode(), 413, "at most"),
])
def test_hostile_feedback_bodies_are_refused_clearly(body, status, words):
    with pytest.raises(FeedbackError) as excinfo:
        parse_feedback(body)
    assert excinfo.value.status == status and words in str(excinfo.value)


def _log(logger: PredictionLogger, rid: str, rows: list[list[float]], preds: list[float], version: str = "1"):
    inputs = [{"name": "input__0", "shape": [len(rows), len(rows[0])], "datatype": "FP32",
               "data": [v for r in rows for v in r]}]
    outputs = [{"name": "output__0", "shape": [len(preds), 1], "datatype": "FP32", "data": preds}]
    logger.append(rid, "m", version, 0.001, inputs, outputs)


def _items(*dicts):
    return parse_feedback(json.dumps({"labels": list(dicts)}).encode())


def test_join_handles_late_duplicate_unknown_and_rotated_labels(tmp_path):
    path = tmp_path / "predictions.jsonl"
    logger = PredictionLogger(path, max_bytes=4096, backups=3)
    info = ModelInfo("m", "1", "binary", [{"name": "x", "kind": "numeric"},
                                          {"name": "group", "kind": "categorical", "categories": ["f", "m"]}],
                     "input__0", 2, ["group"])
    config = QualityConfig(max_predictions=1000, min_labels=1)
    join = LogJoin(path, tmp_path / "predictions-feedback.jsonl", config, models=lambda m, v: info)
    _log(logger, "r1", [[0.1, 0.0]], [0.9])
    _log(logger, "r2", [[0.2, 1.0], [0.3, 0.0]], [0.2, 0.7])
    for i in range(60):  # enough to rotate the file a few times: r1 and r2 now live in backups
        _log(logger, f"x{i}", [[0.5, 1.0]], [0.5])
    assert (tmp_path / "predictions.jsonl.1").exists()
    batch = join.write("m", None, _items({"id": "r1", "label": 0}, {"id": "r2", "label": [0, 1]},
                                         {"id": "nope", "label": 1}, {"id": "r2", "label": [1]}))
    join.refresh()
    result = join.batch_result(batch)
    assert result == {"received": 4, "joined": 2, "duplicates": 0, "unknown": 1, "mismatched": 1,
                      "unknown_ids": ["nope"]}
    # a late label for r1, after more traffic: it still joins; the last label wins
    _log(logger, "r3", [[0.9, 1.0]], [0.4])
    batch = join.write("m", None, _items({"id": "r1", "label": 1}, {"id": "r3", "label": 0}))
    join.refresh()
    assert join.batch_result(batch)["duplicates"] == 1
    doc = performance(join, "m", "1", config)
    rows = {(0.9, 1.0), (0.2, 0.0), (0.7, 1.0), (0.4, 0.0)}  # (prediction, label)
    y = np.array([r[1] for r in sorted(rows)])
    p = np.array([r[0] for r in sorted(rows)])
    assert doc["labels"] == 4 and doc["metrics"]["auc"] == pytest.approx(roc_auc_score(y, p))
    assert doc["metrics"]["logloss"] == pytest.approx(log_loss(y, p))
    # the group comes from the logged input column (a category code mapped back to its name)
    assert doc["groups"]["group"]["groups"]["f"]["rows"] == 2 and doc["groups"]["group"]["groups"]["m"]["rows"] == 2
    # a second reader of the same files (another worker) sees the same window
    other = LogJoin(path, None, config, own_pid=-1, models=lambda m, v: info)
    other.refresh()
    assert performance(other, "m", "1", config)["metrics"] == doc["metrics"]
    assert other.counts[("m", "1", "joined")] == 0  # its counters count only its own labels
    join.close()
    logger.close()


def test_entity_labels_join_the_latest_prediction_at_or_before_the_time(tmp_path):
    path = tmp_path / "p.jsonl"
    logger = PredictionLogger(path)

    def log_entity(rid, key, pred):
        logger.append(rid, "m", "1", 0.0, [{"name": "customer_id", "shape": [1], "datatype": "INT64", "data": [key]}],
                      [{"name": "output__0", "shape": [1, 1], "datatype": "FP32", "data": [pred]}])

    log_entity("a", 42, 0.1)
    middle = json.loads(path.read_text().splitlines()[-1])["ts"]
    log_entity("b", 42, 0.8)
    config = QualityConfig(min_labels=1)
    join = LogJoin(path, None, config, read_feedback=False)
    join.refresh()
    assert join.ingest("m", None, _items({"entity": {"customer_id": 42}, "time": middle, "label": 0}))["joined"] == 1
    assert join.ingest("m", None, _items({"entity": {"customer_id": 42}, "label": 1}))["joined"] == 1
    assert join.ingest("m", None, _items({"entity": {"customer_id": 7}, "label": 1}))["unknown"] == 1
    assert sorted((r.p, r.y) for r in join.labelled("m", "1")) == [(pytest.approx(0.1), 0.0), (pytest.approx(0.8), 1.0)]
    logger.close()
