"""Python models (`platform: python`): a user's class with load() and predict(batch),
packaged by `vivace package MODULE.py:CLASS`, served through the batcher over real HTTP.
User code that raises, exits, hangs or returns the wrong shape or dtype fails only its
own batch with an answer naming the model; the server and its other models keep serving.

The served class picks its behaviour from the first feature of the batch's first row:
0 healthy, 1 raises, 2 wrong shape, 3 sleeps for the second feature's seconds (a hang
longer than the server's execution timeout), 4 wrong dtype, 5 sys.exit, 6 returns None.
"""
from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from conftest import ServerProcess, wait_for
from vivace.engine import Scorer
from vivace.registry.package import PackageError, load_package
from vivace.registry.packaging import package_python_model

MODULE = '''
import json
import sys
import time

import numpy as np


class Model:
    def load(self):
        self.scale = json.loads((self.package_dir / "scale.json").read_text())["scale"]

    def predict(self, batch):
        mode = int(batch[0, 0])
        if mode == 1:
            raise ValueError("cannot score this row")
        if mode == 2:
            return {"scaled": np.zeros((len(batch), 3)), "total": np.zeros((len(batch), 1))}
        if mode == 3:
            time.sleep(float(batch[0, 1]))
        if mode == 4:
            return {"scaled": np.full((len(batch), 2), "x"), "total": np.zeros((len(batch), 1))}
        if mode == 5:
            sys.exit(3)
        if mode == 6:
            return None
        # float64 results: cast to the declared FP32 (same kind)
        return {"scaled": batch.astype(np.float64) * self.scale, "total": batch.sum(axis=1, keepdims=True)}
'''
HEALTHY, RAISES, WRONG_SHAPE, HANGS, WRONG_DTYPE, EXITS, NONE = range(7)


def vivace(*args, home=None) -> subprocess.CompletedProcess:
    extra = ["--home", str(home)] if home is not None else []
    return subprocess.run([sys.executable, "-m", "vivace", *extra, *map(str, args)],
                          capture_output=True, text=True, timeout=180)


def body(mode: int, arg: float = 0.0, rows: int = 1) -> str:
    data = [float(mode), arg] + [0.25 * i for i in range(2 * rows - 2)]
    return json.dumps({"inputs": [{"name": "x", "shape": [rows, 2], "datatype": "FP32", "data": data}]})


def post(server, model: str, payload: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", f"/v2/models/{model}/infer", body=payload)
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    return response.status, data


def get(server, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", path)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    (src / "scaler.py").write_text(MODULE)
    (src / "scale.json").write_text('{"scale": 3}')
    return src


@pytest.fixture(scope="module")
def package(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("pkg") / "scaler"
    made = vivace("package", f"{sources / 'scaler.py'}:Model", "--out", out, "--name", "scaler",
                  "--input", "x:FP32:2", "--output", "scaled:FP32:2", "--output", "total:FP32:1",
                  "--file", sources / "scale.json", "--max-batch-size", "16")
    assert made.returncode == 0, made.stderr
    assert "python: x FP32 [-1, 2]" in made.stdout
    return out


@pytest.fixture(scope="module")
def other(sources, tmp_path_factory):
    """A second Python model in the same server: it must keep serving through the faults."""
    return package_python_model(f"{sources / 'scaler.py'}:Model", tmp_path_factory.mktemp("pkg") / "other",
                                name="other", inputs=["x:FP32:2"], files=[sources / "scale.json"]).path


@pytest.fixture(scope="module")
def server(package, other):
    srv = ServerProcess([package, other], "--execution-timeout", "1")
    yield srv
    assert srv.stop() == 0


def expected(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (rows.astype(np.float64) * 3).astype(np.float32), rows.sum(axis=1, keepdims=True)


def outputs(answer: dict) -> dict[str, np.ndarray]:
    return {o["name"]: np.asarray(o["data"], np.float32).reshape(o["shape"]) for o in answer["outputs"]}


def test_the_package_holds_the_module_its_files_and_the_class_name(package):
    pkg = load_package(package)  # hashes verify, model.py and scale.json included
    assert pkg.platform == "python" and pkg.model_file == "model.py"
    assert pkg.parameters == {"python_class": "Model"} and set(pkg.files) == {"model.py", "scale.json"}
    assert [(s.name, s.datatype, list(s.shape)) for s in pkg.outputs] == [
        ("scaled", "FP32", [-1, 2]), ("total", "FP32", [-1, 1])]


def test_happy_path_over_http_is_what_the_class_computes(server):
    status, answer = post(server, "scaler", body(HEALTHY, 1.5, rows=3))
    assert status == 200, answer
    rows = np.asarray([[0, 1.5], [0, 0.25], [0.5, 0.75]], np.float32)
    scaled, total = expected(rows)
    got = outputs(answer)
    np.testing.assert_array_equal(got["scaled"], scaled)
    np.testing.assert_array_equal(got["total"], total)
    assert {o["datatype"] for o in answer["outputs"]} == {"FP32"}


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(server):
    import concurrent.futures

    def one(i: int) -> tuple[float, tuple[int, dict]]:
        return float(i), post(server, "scaler", body(HEALTHY, float(i)))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(40)))
    for arg, (status, answer) in answers:
        assert status == 200, answer
        np.testing.assert_array_equal(outputs(answer)["scaled"], [[0.0, arg * 3]])
    status, stats = get(server, "/v2/models/scaler/stats")
    stats = json.loads(stats)["model_stats"][0]
    assert status == 200 and stats["inference_count"] >= 40 and stats["execution_count"] <= stats["inference_count"]


@pytest.mark.parametrize("mode, message", [
    (RAISES, "predict raised ValueError: cannot score this row"),
    (EXITS, "predict raised SystemExit: 3"),
    (WRONG_SHAPE, "output 'scaled' with shape (1, 3), expected (1, 2)"),
    (WRONG_DTYPE, "output 'scaled' of dtype <U1, which is not FP32"),
    (NONE, "predict returned NoneType, expected a dict of ['scaled', 'total']"),
])
def test_faults_in_user_code_are_a_500_naming_the_model_and_serving_goes_on(server, mode, message):
    status, answer = post(server, "scaler", body(mode))
    assert status == 500 and "'scaler'" in answer["error"] and message in answer["error"], answer
    assert post(server, "scaler", body(HEALTHY))[0] == 200
    assert post(server, "other", body(HEALTHY))[0] == 200
    status, metrics = get(server, "/metrics")
    assert b'vivace_request_failure_total{model="scaler",reason="backend_error",version="1"}' in metrics


def test_a_hanging_predict_is_failed_by_the_watchdog_and_the_model_comes_back(server):
    answers: list[tuple[int, dict]] = []
    hung = threading.Thread(target=lambda: answers.append(post(server, "scaler", body(HANGS, 4.0))))
    hung.start()
    hung.join(timeout=60)
    status, answer = answers[0]
    assert status == 500 and "execution timeout" in answer["error"] and "'scaler'" in answer["error"], answer
    # Out of service while predict still sleeps; the other model and the server are not.
    assert get(server, "/v2/models/scaler/ready")[0] == 503
    status, answer = post(server, "scaler", body(HEALTHY))
    assert status == 503 and "longer than" in answer["error"]
    assert post(server, "other", body(HEALTHY))[0] == 200
    assert get(server, "/v2/health/live")[0] == 200
    wait_for(lambda: get(server, "/v2/models/scaler/ready")[0] == 200, timeout=60, what="the model to come back")
    assert post(server, "scaler", body(HEALTHY))[0] == 200


def test_scorer_and_vivace_score_run_the_class(package, tmp_path):
    rows = np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32)
    rows[:, 0] = 0  # healthy mode
    scaled, total = expected(rows)
    scored = Scorer(package, batch_size=16).predict(rows)
    np.testing.assert_array_equal(scored["scaled"], scaled)
    np.testing.assert_array_equal(scored["total"], total)
    with pytest.raises(RuntimeError, match="predict raised ValueError"):
        Scorer(package).predict(np.ones((2, 2), np.float32))
    np.save(tmp_path / "x.npy", rows)
    done = vivace("score", package, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.parquet")
    assert done.returncode == 0, done.stderr
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "y.parquet").to_pydict()
    np.testing.assert_array_equal(np.asarray(table["total"], np.float32), total[:, 0])


def test_packaging_errors_name_the_problem_and_write_nothing(sources, tmp_path):
    def module(text: str) -> str:
        path = tmp_path / f"m{abs(hash(text))}.py"
        path.write_text(text)
        return str(path)

    ok = "import numpy as np\nclass M:\n    def predict(self, batch):\n        return batch * 2\n"
    cases = [
        (module(ok) + ":Missing", {}, "defines no class 'Missing'"),
        (module("raise ImportError('no such dependency')\n") + ":M", {}, "importing"),
        (module("class M:\n    def load(self):\n        1 / 0\n    def predict(self, b):\n        return b\n") + ":M", {},
         "M.load() raised ZeroDivisionError"),
        (module("class M:\n    pass\n") + ":M", {}, "has no predict(batch) method"),
        (module(ok) + ":M", {"outputs": ["y:FP32:3"]}, "output 'y' with shape (2, 2), expected (2, 3)"),
        (module(ok) + ":M", {"outputs": ["y:INT8:2"]}, "of dtype float32, which is not INT8"),
        (module("class M:\n    def predict(self, b):\n        return {'label': [None] * len(b)}\n") + ":M", {},
         "cannot be served"),
        (module(ok), {}, "expected MODULE.py:CLASS"),
        (str(tmp_path / "absent.py") + ":M", {}, "no such module"),
        (module(ok) + ":M", {"files": [tmp_path / "absent.json"]}, "absent.json: no such file"),
    ]
    for source, extra, message in cases:
        with pytest.raises(PackageError) as refused:
            package_python_model(source, tmp_path / "bad", name="bad", inputs=["x:FP32:2"], **extra)
        assert message in str(refused.value), (source, extra, str(refused.value))
        assert not (tmp_path / "bad").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")]  # no staging left behind
    # A predict that fails on zeros is refused; given an example it can score, it packages.
    picky = module("class M:\n    def predict(self, b):\n        assert (b > 0).all(), 'needs positive rows'\n"
                   "        return b\n")
    cli = vivace("package", picky + ":M", "--out", tmp_path / "bad", "--name", "bad", "--input", "x:FP32:2")
    assert cli.returncode == 1 and "predict raised AssertionError: needs positive rows" in cli.stderr, cli.stderr
    assert not (tmp_path / "bad").exists()
    package_python_model(picky + ":M", tmp_path / "picky", name="picky", inputs=["x:FP32:2"],
                         example=np.ones((3, 2), np.float32))
    assert load_package(tmp_path / "picky").outputs[0].name == "output__0"
    onnx_only = vivace("package", tmp_path / "picky" / "model.py", "--out", tmp_path / "bad", "--name", "bad",
                       "--input", "x:FP32:2", "--file", sources / "scale.json", "--platform", "torchscript")
    assert onnx_only.returncode == 1 and "--file is for Python models" in onnx_only.stderr


def test_a_model_whose_load_fails_is_refused_at_serve_time_with_the_reason(package, tmp_path):
    import shutil

    from vivace.registry.package import write_package

    manifest = load_package(package).manifest()
    broken = tmp_path / "model.py"
    broken.write_text("class Model:\n    def load(self):\n        raise RuntimeError('weights missing')\n"
                      "    def predict(self, b):\n        return b\n")
    write_package(tmp_path / "broken", manifest, {"model.py": broken, "scale.json": package / "scale.json"})
    served = vivace("serve", tmp_path / "broken", "--port", "0")
    assert served.returncode == 1
    assert "model 'scaler': Model.load() raised RuntimeError: weights missing" in served.stderr, served.stderr
    shutil.rmtree(tmp_path / "broken")


def test_drift_monitoring_of_a_python_model(sources, tmp_path):
    import pandas as pd

    rng = np.random.default_rng(0)
    pd.DataFrame(rng.normal(size=(2000, 2)), columns=["a", "b"]).to_parquet(tmp_path / "train.parquet")
    assert vivace("monitor", "profile", tmp_path / "train.parquet", "--out", tmp_path / "profile.json").returncode == 0
    package_python_model(f"{sources / 'scaler.py'}:Model", tmp_path / "monitored", name="monitored",
                         inputs=["x:FP32:2"], files=[sources / "scale.json"], profile=tmp_path / "profile.json")
    server = ServerProcess([tmp_path / "monitored"], "--drift-interval", "0.2")
    try:
        assert post(server, "monitored", body(HEALTHY, 0.5, rows=4))[0] == 200

        def sketched():  # the batch's rows reach the drift window (checked every 0.2 s)
            status, drift = get(server, "/v2/models/monitored/drift")
            assert status == 200
            drift = json.loads(drift)
            return drift if drift["rows"] == 4 else None

        drift = wait_for(sketched, timeout=30, what="the rows in the drift window")
        assert drift["state"] == "collecting" and drift["min_rows"] == 1000
    finally:
        assert server.stop() == 0
