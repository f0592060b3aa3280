"""Fitted scikit-learn estimators (tree ensembles, pipelines): `vivace package` converts them
to ONNX with skl2onnx, checks the conversion against the estimator's own predictions, and
the package is served by onnxruntime like any ONNX model. Answers over HTTP and from
`Scorer` are compared with the estimator itself; estimators that cannot be converted or
checked are refused with the reason, writing nothing."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
import urllib.request

import numpy as np
import pytest

from conftest import ServerProcess

pytest.importorskip("onnxruntime")
pytest.importorskip("skl2onnx")
sklearn = pytest.importorskip("sklearn")
from sklearn.datasets import make_classification, make_regression  # noqa: E402
from sklearn.ensemble import (  # noqa: E402
    GradientBoostingClassifier, GradientBoostingRegressor, RandomForestClassifier)
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from vivace.engine import Scorer  # noqa: E402
from vivace.registry.package import PackageError, load_package  # noqa: E402
from vivace.registry.packaging import package_sklearn_model  # noqa: E402


def vivace(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vivace", *map(str, args)], capture_output=True, text=True, timeout=180)


def data(n: int = 1500, seed: int = 0):
    X, y = make_classification(n, 12, n_informative=6, random_state=seed)
    return X.astype(np.float32), y


def infer(server, model: str, rows: np.ndarray) -> dict[str, np.ndarray]:
    body = json.dumps({"inputs": [{"name": "input__0", "shape": list(rows.shape), "datatype": "FP32",
                                   "data": rows.ravel().tolist()}]}).encode()
    request = urllib.request.Request(f"{server.url}/v2/models/{model}/infer", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        outputs = json.loads(response.read())["outputs"]
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in outputs}


@pytest.fixture(scope="module")
def fitted():
    X, y = data()
    Xr, yr = make_regression(1500, 12, noise=5.0, random_state=1)
    return {
        "forest": RandomForestClassifier(40, max_depth=8, random_state=0).fit(X, y),
        "boosted": GradientBoostingClassifier(n_estimators=40, random_state=0).fit(X, y),
        "regressor": GradientBoostingRegressor(n_estimators=40, random_state=0).fit(Xr.astype(np.float32), yr),
        "pipeline": make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y),
    }


@pytest.fixture(scope="module")
def packages(fitted, tmp_path_factory):
    root = tmp_path_factory.mktemp("sklearn")
    X, _ = data(seed=1)
    return {name: package_sklearn_model(est, root / name, name=name, example=X[:400]).path
            for name, est in fitted.items()}


def test_the_packages_are_checked_conversions_with_the_outputs_named(packages):
    forest = load_package(packages["forest"])
    assert forest.platform == "onnxruntime"
    assert [(s.name, s.datatype, list(s.shape)) for s in forest.outputs] == [
        ("label", "INT64", [-1]), ("probabilities", "FP32", [-1, 2])]
    assert forest.metadata["converted_from"] == "sklearn.RandomForestClassifier"
    assert forest.metadata["conversion"]["rows"] == 400 and forest.metadata["conversion"]["max_abs_error"] < 1e-5
    regressor = load_package(packages["regressor"])
    assert [(s.name, s.datatype, list(s.shape)) for s in regressor.outputs] == [("variable", "FP32", [-1, 1])]


def test_served_answers_agree_with_the_estimators(packages, fitted):
    X, _ = data(seed=2)
    rows = X[:7]
    server = ServerProcess(list(packages.values()))
    try:
        for name in ("forest", "boosted", "pipeline"):
            got = infer(server, name, rows)
            np.testing.assert_array_equal(got["label"], fitted[name].predict(rows))
            np.testing.assert_allclose(got["probabilities"], fitted[name].predict_proba(rows), atol=1e-5)
        got = infer(server, "regressor", rows)
        expected = fitted["regressor"].predict(rows)
        np.testing.assert_allclose(got["variable"][:, 0], expected, rtol=1e-5, atol=1e-4 * np.abs(expected).max())
    finally:
        assert server.stop() == 0


def test_scorer_agrees_with_the_estimator_on_many_rows(packages, fitted):
    X, _ = data(5000, seed=3)
    scored = Scorer(packages["forest"], batch_size=1024).predict(X)
    np.testing.assert_array_equal(scored["label"], fitted["forest"].predict(X))
    np.testing.assert_allclose(scored["probabilities"], fitted["forest"].predict_proba(X), atol=1e-5)


def test_the_cli_packages_a_joblib_or_pickle_file(fitted, tmp_path):
    import joblib

    X, _ = data(seed=4)
    joblib.dump(fitted["boosted"], tmp_path / "boosted.joblib")
    with open(tmp_path / "forest.pkl", "wb") as f:
        pickle.dump(fitted["forest"], f)
    np.save(tmp_path / "rows.npy", X[:100])
    made = vivace("package", tmp_path / "boosted.joblib", "--out", tmp_path / "boosted", "--name", "boosted",
                  "--example", tmp_path / "rows.npy")
    assert made.returncode == 0, made.stderr
    assert load_package(tmp_path / "boosted").metadata["conversion"]["rows"] == 100
    made = vivace("package", tmp_path / "forest.pkl", "--out", tmp_path / "forest", "--name", "forest")
    assert made.returncode == 0, made.stderr
    assert load_package(tmp_path / "forest").metadata["conversion"]["rows"] == 256  # default rows
    np.save(tmp_path / "narrow.npy", X[:10, :5])
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    cases = [
        (["--example", tmp_path / "narrow.npy"], "forest.pkl", "example rows have shape [10, 5], the estimator takes 12"),
        (["--input", "x:FP32:12"], "forest.pkl", "drop --input/--output"),
        ([], "junk.pkl", "junk.pkl: cannot load the estimator"),
        ([], "absent.pkl", "absent.pkl: no such model file"),
    ]
    for extra, source, message in cases:
        refused = vivace("package", tmp_path / source, "--out", tmp_path / "bad", "--name", "bad", *extra)
        assert refused.returncode == 1 and message in refused.stderr, (extra, refused.stderr)
        assert not (tmp_path / "bad").exists()


def test_string_classes_are_listed_in_the_metadata_and_probabilities_served(tmp_path):
    X, y = data()
    forest = RandomForestClassifier(10, random_state=0).fit(X, np.array(["stay", "churn"])[y])
    package = package_sklearn_model(forest, tmp_path / "labels", name="labels")
    assert [s.name for s in package.outputs] == ["probabilities"]
    assert package.metadata["classes"] == ["churn", "stay"]
    scored = Scorer(package).predict(X[:20])
    np.testing.assert_allclose(scored, forest.predict_proba(X[:20]), atol=1e-5)


def test_estimators_that_cannot_be_served_are_refused_with_the_reason(tmp_path):
    X, y = data()

    class Custom(sklearn.base.BaseEstimator):  # no skl2onnx converter for it
        def fit(self, X, y):
            self.n_features_in_ = X.shape[1]
            return self

        def predict(self, X):
            return np.zeros(len(X))

    cases = [
        (RandomForestClassifier(5), "not a fitted scikit-learn estimator"),
        (Custom().fit(X, y), "skl2onnx cannot convert"),
        ("a string", "not a fitted scikit-learn estimator"),
    ]
    for estimator, message in cases:
        with pytest.raises(PackageError, match=message):
            package_sklearn_model(estimator, tmp_path / "bad", name="bad")
        assert not (tmp_path / "bad").exists()
    with pytest.raises(PackageError, match="differs from the estimator by"):
        package_sklearn_model(GradientBoostingRegressor(n_estimators=5).fit(X, y * 1e9), tmp_path / "bad", name="bad",
                              tolerance=0.0)


@pytest.mark.parametrize("library", ["lightgbm", "xgboost"])
def test_boosting_libraries_estimators_convert_through_onnxmltools(library, tmp_path):
    module = pytest.importorskip(library)
    pytest.importorskip("onnxmltools")
    X, y = data()
    if library == "lightgbm":
        classifier = module.LGBMClassifier(n_estimators=40, verbose=-1).fit(X, y)
        regressor = make_pipeline(StandardScaler(), module.LGBMRegressor(n_estimators=40, verbose=-1)).fit(X, y * 10.0)
        kind = "lightgbm.LGBMClassifier"
    else:
        classifier = module.XGBClassifier(n_estimators=30, max_depth=4).fit(X, y)
        regressor = module.XGBRegressor(n_estimators=30, max_depth=4).fit(X, y * 10.0)
        kind = "xgboost.XGBClassifier"
    classified = package_sklearn_model(classifier, tmp_path / "cls", name="cls", example=X[:300])
    assert classified.metadata["converted_from"] == kind
    regressed = package_sklearn_model(regressor, tmp_path / "reg", name="reg", example=X[:300])
    rows = data(seed=5)[0][:200]
    scored = Scorer(classified).predict(rows)
    np.testing.assert_array_equal(scored["label"], classifier.predict(rows))
    np.testing.assert_allclose(scored["probabilities"], classifier.predict_proba(rows), atol=1e-5)
    server = ServerProcess([regressed.path])
    try:
        expected = regressor.predict(rows[:5])
        np.testing.assert_allclose(infer(server, "reg", rows[:5])["variable"][:, 0], expected, rtol=1e-4, atol=1e-4)
    finally:
        assert server.stop() == 0
