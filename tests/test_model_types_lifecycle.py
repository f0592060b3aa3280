"""Every model type through the registry's lifecycle, as a user drives it with the CLI:
register with metrics, promote through the quality gate (a worse version is refused),
`vivace score NAME@production` offline, and `vivace serve NAME@production` over HTTP. The
types: ONNX, a scikit-learn forest (converted to ONNX), a Python class, and an ensemble
(Python step -> native MLP)."""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import numpy as np
import pytest

from conftest import ServerProcess
from vivace.engine import Scorer
from vivace.registry.packaging import package_ensemble, package_python_model

SCALE = '''
class Scale:
    def predict(self, x):
        return {"input__0": x * 0.5}
'''
WIDTH = 32


def vivace(home, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vivace", "--home", str(home), *map(str, args)],
                          capture_output=True, text=True, timeout=180)


def onnx_package(root):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    from vivace.registry.packaging import package_onnx_model

    weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(WIDTH, 2)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "linear",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return package_onnx_model(onnx.ModelProto.SerializeToString(model), root / "onnx", name="m").path


def sklearn_package(root):
    pytest.importorskip("skl2onnx")
    from sklearn.ensemble import RandomForestClassifier

    from vivace.registry.packaging import package_sklearn_model

    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, WIDTH)).astype(np.float32)
    forest = RandomForestClassifier(n_estimators=5, max_depth=4, random_state=0).fit(x, (x[:, 0] > 0).astype(int))
    return package_sklearn_model(forest, root / "sklearn", name="m").path


def python_package(root):
    (root / "scale.py").write_text(SCALE)
    return package_python_model(f"{root / 'scale.py'}:Scale", root / "python", name="m",
                                inputs=[f"x:FP32:{WIDTH}"]).path


def ensemble_package(root, mlp_package):
    from vivace.engine.native.convert import quantize_package

    native = quantize_package(mlp_package, root / "native", precision="fp32")[0].path
    return package_ensemble([("scale", python_package(root)), ("model", native)], root / "ensemble", name="m").path


@pytest.mark.parametrize("kind", ["onnx", "sklearn", "python", "ensemble"])
def test_register_promote_score_and_serve_every_type(kind, tmp_path, mlp_package):
    root = tmp_path / "src"
    root.mkdir()
    package = {"onnx": onnx_package, "sklearn": sklearn_package, "python": python_package,
               "ensemble": lambda r: ensemble_package(r, mlp_package)}[kind](root)
    home = tmp_path / "home"
    for auc in (0.8, 0.6):
        done = vivace(home, "models", "register", package, "--name", "m", "--metric", f"auc={auc}")
        assert done.returncode == 0, done.stderr
    done = vivace(home, "models", "promote", "m", "1", "--alias", "production")
    assert done.returncode == 0, done.stderr
    done = vivace(home, "models", "promote", "m", "2", "--alias", "production")
    assert done.returncode != 0 and "auc" in done.stderr  # the gate refuses the worse version

    rows = np.random.default_rng(2).normal(size=(7, WIDTH)).astype(np.float32)
    np.save(tmp_path / "rows.npy", rows)
    done = vivace(home, "score", "m@production", "--input", tmp_path / "rows.npy", "--output", tmp_path / "out.parquet")
    assert done.returncode == 0, done.stderr
    import pyarrow.parquet as pq

    scored = pq.read_table(tmp_path / "out.parquet").to_pandas()
    from vivace.registry.package import load_package

    name = next(t.name for t in load_package(package).outputs if t.name != "label")  # a float output
    expected = Scorer(package).predict(rows)
    expected = np.asarray(expected[name] if isinstance(expected, dict) else expected, np.float64).reshape(7, -1)
    column = name if expected.shape[1] == 1 else f"{name}_0"
    np.testing.assert_allclose(scored[column].to_numpy(), expected[:, 0], rtol=1e-5, atol=1e-6)

    server = ServerProcess(["m@production"], env={"VIVACE_HOME": str(home)})
    try:
        signature = json.loads(urllib.request.urlopen(f"{server.url}/v2/models/m", timeout=10).read())
        body = {"inputs": [{"name": signature["inputs"][0]["name"], "datatype": "FP32", "shape": [7, WIDTH],
                            "data": rows.ravel().tolist()}]}
        request = urllib.request.Request(f"{server.url}/v2/models/m/infer", data=json.dumps(body).encode())
        answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
        assert answer["model_version"] == "1"
        served = {o["name"]: o["data"] for o in answer["outputs"]}
        np.testing.assert_allclose(np.asarray(served[name], np.float64), expected.ravel(), rtol=1e-5, atol=1e-6)
    finally:
        assert server.stop() == 0
