"""ONNX models (`platform: onnxruntime`): packaged by `vivace package model.onnx`, served
over HTTP, scored with `Scorer` and `vivace score`, every answer equal to onnxruntime's
own for the same graph; malformed requests, corrupt files and mis-declared graphs refused
with errors naming the problem. The graphs are real ONNX models built with onnx.helper."""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import ServerProcess

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from vivace.engine import Scorer  # noqa: E402
from vivace.registry.package import PackageError, load_package, write_package  # noqa: E402
from vivace.registry.packaging import package_onnx_model  # noqa: E402


def vivace(*args, home=None) -> subprocess.CompletedProcess:
    extra = ["--home", str(home)] if home is not None else []
    return subprocess.run([sys.executable, "-m", "vivace", *extra, *map(str, args)],
                          capture_output=True, text=True, timeout=180)


def two_heads(batch="batch", hidden=16, row_dim=8) -> bytes:
    """x FP32 [batch, 8] and ids INT64 [batch, 2] -> probs FP32 [batch, 3]
    (softmax(relu(x W1 + b1) W2 + b2)) and twice INT64 [batch, 2] (ids * 2)."""
    rng = np.random.default_rng(7)
    weights = {
        "W1": rng.normal(size=(8, hidden)).astype(np.float32), "b1": rng.normal(size=hidden).astype(np.float32),
        "W2": rng.normal(size=(hidden, 3)).astype(np.float32), "b2": rng.normal(size=3).astype(np.float32),
        "two": np.array(2, np.int64),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]), helper.make_node("MatMul", ["h2", "W2"], ["z0"]),
        helper.make_node("Add", ["z0", "b2"], ["z1"]), helper.make_node("Softmax", ["z1"], ["probs"], axis=1),
        helper.make_node("Mul", ["ids", "two"], ["twice"]),
    ]
    graph = helper.make_graph(
        nodes, "two_heads",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, row_dim]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, [batch, 2])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [batch, 3]),
         helper.make_tensor_value_info("twice", TensorProto.INT64, [batch, 2])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def direct(model: bytes, feed: dict) -> list[np.ndarray]:
    """onnxruntime called directly, with its own default session options."""
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, feed)


def rows(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 8)).astype(np.float32),
            "ids": rng.integers(-1000, 1000, size=(n, 2)).astype(np.int64)}


def post(server, model: str, payload: dict | bytes) -> tuple[int, dict]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(f"{server.url}/v2/models/{model}/infer", data=data, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def oip(feed: dict[str, np.ndarray]) -> dict:
    datatype = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
    return {"inputs": [{"name": k, "shape": list(v.shape), "datatype": datatype[v.dtype], "data": v.ravel().tolist()}
                       for k, v in feed.items()]}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "two_heads.onnx"
    path.write_bytes(two_heads())
    return path


@pytest.fixture(scope="module")
def package(model_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("pkg") / "heads"
    made = vivace("package", model_file, "--out", out, "--name", "heads", "--max-batch-size", "64",
                  "--param", "intra_op_thread_count=1", "--param", "graph_optimization_level=extended")
    assert made.returncode == 0, made.stderr
    assert "onnxruntime: x FP32 [-1, 8], ids INT64 [-1, 2]" in made.stdout
    return out


@pytest.fixture(scope="module")
def server(package):
    srv = ServerProcess([package])
    yield srv
    assert srv.stop() == 0


def test_the_package_takes_its_signature_and_settings_from_the_graph_and_the_command(package):
    pkg = load_package(package)  # hashes verify
    assert pkg.platform == "onnxruntime" and pkg.model_file == "model.onnx"
    assert [(s.name, s.datatype, list(s.shape)) for s in pkg.inputs] == [("x", "FP32", [-1, 8]), ("ids", "INT64", [-1, 2])]
    assert [(s.name, s.datatype, list(s.shape)) for s in pkg.outputs] == [
        ("probs", "FP32", [-1, 3]), ("twice", "INT64", [-1, 2])]
    assert pkg.parameters == {"intra_op_thread_count": 1, "inter_op_thread_count": 1,
                              "graph_optimization_level": "extended"}
    # The settings reach the session the backend serves with.
    options = Scorer(package).backend.session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED


def test_http_answers_equal_onnxruntime_called_directly(server, model_file):
    feed = rows(5)
    expected = direct(model_file.read_bytes(), feed)
    status, answer = post(server, "heads", oip(feed))
    assert status == 200, answer
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["probs"]["datatype"] == "FP32" and outputs["probs"]["shape"] == [5, 3]
    np.testing.assert_array_equal(np.asarray(outputs["probs"]["data"], np.float32).reshape(5, 3), expected[0])
    np.testing.assert_array_equal(np.asarray(outputs["twice"]["data"], np.int64).reshape(5, 2), expected[1])


def test_concurrent_requests_batched_together_each_get_their_own_rows(server, model_file):
    import concurrent.futures

    feeds = [rows(1 + i % 3, seed=i) for i in range(24)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda f: post(server, "heads", oip(f)), feeds))
    model = model_file.read_bytes()
    for feed, (status, answer) in zip(feeds, answers):
        assert status == 200, answer
        probs = next(o for o in answer["outputs"] if o["name"] == "probs")
        np.testing.assert_array_equal(np.asarray(probs["data"], np.float32).reshape(-1, 3), direct(model, feed)[0])
    with urllib.request.urlopen(f"{server.url}/v2/models/heads/config", timeout=10) as response:
        config = json.loads(response.read())
    assert (config["platform"], config["backend"]) == ("onnxruntime_onnx", "onnxruntime")


def test_malformed_requests_get_400_naming_the_problem_and_the_model_keeps_serving(server):
    good = oip(rows(2))
    wrong_shape = oip(rows(2))
    wrong_shape["inputs"][0]["shape"] = [2, 7]
    wrong_shape["inputs"][0]["data"] = wrong_shape["inputs"][0]["data"][:14]
    wrong_type = oip(rows(2))
    wrong_type["inputs"][1]["datatype"] = "FP32"
    missing = {"inputs": good["inputs"][:1]}
    short = oip(rows(2))
    short["inputs"][0]["data"] = short["inputs"][0]["data"][:-1]
    cases = [(wrong_shape, "model expects [-1, 8]"), (wrong_type, "'ids'"), (missing, "'ids'"),
             (short, "15 elements"), (b'{"inputs": [', "")]
    for payload, message in cases:
        status, answer = post(server, "heads", payload)
        assert status == 400 and message in answer["error"], (payload, answer)
    assert post(server, "heads", good)[0] == 200


def test_scorer_and_vivace_score_equal_onnxruntime_called_directly(package, model_file, tmp_path):
    feed = rows(300, seed=3)
    expected = direct(model_file.read_bytes(), feed)
    scored = Scorer(package, batch_size=128).predict(feed)  # chunked: 128 + 128 + 44 rows
    np.testing.assert_array_equal(scored["probs"], expected[0])
    np.testing.assert_array_equal(scored["twice"], expected[1])
    single = Scorer(package).predict([feed["x"][0], feed["ids"][0]])  # one row, no batch dimension
    np.testing.assert_array_equal(single["probs"], expected[0][:1])
    with pytest.raises(ValueError, match="input 'x' has shape"):
        Scorer(package).predict({"x": feed["x"][:, :7], "ids": feed["ids"]})


def test_vivace_score_writes_what_onnxruntime_computes(tmp_path):
    # `vivace score` takes one table: a single-input graph (x FP32 [-1, 8] -> y FP32 [-1, 3]).
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(np.random.default_rng(1).normal(size=(8, 3)).astype(np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    package_onnx_model(model, tmp_path / "linear", name="linear")
    x = rows(50)["x"]
    np.save(tmp_path / "x.npy", x)
    scored = vivace("score", tmp_path / "linear", "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy")
    assert scored.returncode == 0, scored.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), direct(model.SerializeToString(), {"x": x})[0])


def test_a_corrupt_or_truncated_onnx_file_is_refused_at_package_time(model_file, tmp_path):
    (tmp_path / "garbage.onnx").write_bytes(b"\x08\x07 this is not a protobuf \xff\xfe")
    (tmp_path / "truncated.onnx").write_bytes(model_file.read_bytes()[:200])
    for name in ("garbage.onnx", "truncated.onnx"):
        result = vivace("package", tmp_path / name, "--out", tmp_path / "bad", "--name", "bad")
        assert result.returncode == 1, result.stdout
        assert f"{name}: not a model onnxruntime can load" in result.stderr, result.stderr
        assert not (tmp_path / "bad").exists()
    missing = vivace("package", tmp_path / "nope.onnx", "--out", tmp_path / "bad", "--name", "bad")
    assert missing.returncode == 1 and "no such model file" in missing.stderr


def test_graphs_vivace_cannot_batch_and_wrong_declarations_are_refused(tmp_path):
    cases = [
        (two_heads(batch=1), {}, "fixed batch dimension 1"),
        (two_heads(row_dim="features"), {}, "only the first (batch) dimension may vary"),
        (two_heads(), {"inputs": ["x:FP64:8", "ids:INT64:2"]}, "'x' is FP64 in the package, tensor(float)"),
        (two_heads(), {"inputs": ["x:FP32:8"]}, "declares inputs ['x'], the ONNX graph has ['x', 'ids']"),
        (two_heads(), {"outputs": ["probs:FP32:4", "twice:INT64:2"]}, "'probs' has shape [-1, 4] in the package"),
        (two_heads(), {"parameters": {"graph_optimization_level": "max"}},
         "at `$.parameters.graph_optimization_level`"),
        (two_heads(), {"parameters": {"intra_op_thread_count": -2}}, "at `$.parameters.intra_op_thread_count`"),
    ]
    for model, extra, message in cases:
        with pytest.raises(PackageError) as refused:
            package_onnx_model(model, tmp_path / "bad", name="bad", **extra)
        assert message in str(refused.value), (extra, str(refused.value))
        assert not (tmp_path / "bad").exists()
    # A row dimension the graph leaves open is served once declared.
    pkg = package_onnx_model(two_heads(row_dim="features"), tmp_path / "open", name="open",
                             inputs=["x:FP32:8", "ids:INT64:2"])
    assert [list(s.shape) for s in pkg.inputs] == [[-1, 8], [-1, 2]]
    feed = rows(3)
    np.testing.assert_array_equal(Scorer(pkg).predict(feed)["probs"], direct(two_heads(), feed)[0])


def test_a_hand_edited_package_that_contradicts_its_graph_is_refused_when_loaded(package, tmp_path):
    manifest = load_package(package).manifest()
    manifest["outputs"][0]["shape"] = [-1, 4]
    write_package(tmp_path / "edited", manifest, {"model.onnx": package / "model.onnx"})
    with pytest.raises(RuntimeError, match="'probs' has shape \\[-1, 4\\] in the package"):
        Scorer(tmp_path / "edited")
    manifest["parameters"]["execution_mode"] = "turbo"
    with pytest.raises(PackageError, match="parameters.execution_mode"):
        write_package(tmp_path / "edited2", manifest, {"model.onnx": package / "model.onnx"})


def test_an_output_whose_open_shape_is_declared_wrongly_makes_the_model_unavailable(tmp_path):
    """A graph output with an open row dimension declared as the wrong size: caught by the
    server's warm-up (onnxruntime refuses to write that shape into the batch buffer)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "open",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "k"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "k"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    manifest = {"name": "open", "platform": "onnxruntime", "model_file": "model.onnx",
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
                "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 5]}]}
    write_package(tmp_path / "open", manifest, {"model.onnx": model.SerializeToString()})
    served = vivace("serve", tmp_path / "open", "--port", "0")
    assert served.returncode != 0
    assert "failed warm-up" in served.stderr and "'open'" in served.stderr, served.stderr[-2000:]


@pytest.mark.gpu
def test_the_cuda_provider_answers_like_the_cpu_one(package, model_file):
    from vivace.registry import onnx_model

    if not onnx_model.cuda_available():
        pytest.skip("onnxruntime here has no CUDA execution provider (onnxruntime-gpu)")
    feed = rows(64)
    gpu = Scorer(package, device="cuda")
    assert gpu.backend.session.get_providers()[0] == "CUDAExecutionProvider"
    np.testing.assert_allclose(gpu.predict(feed)["probs"], direct(model_file.read_bytes(), feed)[0], rtol=1e-5, atol=1e-6)
