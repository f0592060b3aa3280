"""Ensembles (`platform: ensemble`): Python preprocessing -> the native MLP -> Python
postprocessing, packaged by `vivace package --step ...` from three packages and served as
one model over real HTTP on both front ends. The answers must be what the three steps give
when called one after another in process; a step that fails fails only its batch, with a
500 naming the ensemble and the step; per-step statistics reach /stats and /metrics.
"""
from __future__ import annotations

import http.client
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ServerProcess
from vivace.engine import Scorer
from vivace.registry.package import MANIFEST, PackageError, load_package
from vivace.registry.packaging import package_ensemble, package_python_model

PRE = '''
import numpy as np


class Pre:
    SCALES = {b"retail": 1.0, b"business": 2.0}

    def predict(self, batch):
        scales = []
        for segment in batch["segment"][:, 0]:
            if segment not in self.SCALES:
                raise ValueError(f"unknown segment {segment!r}")
            scales.append(self.SCALES[segment])
        return {"input__0": batch["values"] * np.asarray(scales, np.float32)[:, None]}
'''
POST = '''
import numpy as np


class Post:
    def predict(self, logit):
        score = 1.0 / (1.0 + np.exp(-logit))
        return {"score": score.astype(np.float32),
                "decision": np.where(score >= 0.5, b"high", b"low").astype(object)}
'''
WIDTH = 32


@pytest.fixture(scope="module")
def steps(tmp_path_factory, mlp_package):
    from vivace.engine.native.convert import quantize_package

    root = tmp_path_factory.mktemp("ensemble")
    (root / "pre.py").write_text(PRE)
    (root / "post.py").write_text(POST)
    pre = package_python_model(f"{root / 'pre.py'}:Pre", root / "pre", name="pre",
                               inputs=[f"values:FP32:{WIDTH}", "segment:BYTES:1"],
                               example={"values": np.zeros((2, WIDTH)), "segment": [[b"retail"], [b"business"]]})
    native = quantize_package(mlp_package, root / "native", precision="fp32")[0]
    post = package_python_model(f"{root / 'post.py'}:Post", root / "post", name="post", inputs=["logit:FP32:1"])
    return {"pre": pre.path, "model": native.path, "post": post.path, "root": root}


@pytest.fixture(scope="module")
def ensemble(steps):
    out = steps["root"] / "scored"
    proc = subprocess.run(
        [sys.executable, "-m", "vivace", "package", "--name", "scored", "--out", str(out),
         "--step", f"pre={steps['pre']}", "--step", f"model={steps['model']}", "--step", f"post={steps['post']}",
         "--map", "model.output__0=logit"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "pre (python) -> model (native_mlp) -> post (python)" in proc.stdout
    return load_package(out)


def direct(steps, values: np.ndarray, segments: list[bytes]) -> tuple[np.ndarray, list[bytes]]:
    """The three steps called one after another in process, as a user would glue them."""
    from vivace.engine.backends import load_backend

    pre, model, post = (load_backend(load_package(steps[k])) for k in ("pre", "model", "post"))
    (features,) = pre.run([values, np.array([[s] for s in segments], object)])
    (logit,) = model.run([features])
    score, decision = post.run([logit])
    return score, [d for d in decision.ravel()]


def infer_body(values: np.ndarray, segments: list[bytes]) -> bytes:
    return json.dumps({"inputs": [
        {"name": "values", "datatype": "FP32", "shape": list(values.shape), "data": values.ravel().tolist()},
        {"name": "segment", "datatype": "BYTES", "shape": [len(segments), 1], "data": [s.decode() for s in segments]},
    ]}).encode()


def request(server, method: str, path: str, body: bytes | None = None) -> tuple[int, dict | bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request(method, path, body=body)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, (json.loads(data) if path != "/metrics" else data)


@pytest.fixture(scope="module", params=["native", "python"])
def server(ensemble, request):
    srv = ServerProcess([ensemble.path], "--http-frontend", request.param)
    yield srv
    assert srv.stop() == 0


def test_the_package_declares_the_pipeline_and_holds_every_steps_files(ensemble):
    assert ensemble.platform == "ensemble"
    assert [(t.name, t.datatype, t.shape) for t in ensemble.inputs] == [
        ("values", "FP32", (-1, WIDTH)), ("segment", "BYTES", (-1, 1))]
    assert [(t.name, t.datatype, t.shape) for t in ensemble.outputs] == [
        ("score", "FP32", (-1, 1)), ("decision", "BYTES", (-1, 1))]
    assert {"ensemble.json", "pre.model.py", "model.model.npz", "post.model.py"} <= set(ensemble.files)
    assert [s["name"] for s in ensemble.metadata["steps"]] == ["pre", "model", "post"]


def test_served_answers_are_the_steps_called_one_after_another(server, steps):
    rng = np.random.default_rng(7)
    values = rng.normal(size=(5, WIDTH)).astype(np.float32)
    segments = [b"retail", b"business", b"retail", b"business", b"business"]
    status, answer = request(server, "POST", "/v2/models/scored/infer", infer_body(values, segments))
    assert status == 200, answer
    outputs = {o["name"]: o for o in answer["outputs"]}
    score, decision = direct(steps, values, segments)
    np.testing.assert_allclose(np.asarray(outputs["score"]["data"], np.float32).reshape(5, 1), score, rtol=1e-5)
    assert outputs["decision"]["datatype"] == "BYTES"
    assert [d.encode() for d in outputs["decision"]["data"]] == decision
    assert answer["model_name"] == "scored"


def test_a_failing_step_is_a_500_naming_the_ensemble_and_step_and_serving_goes_on(server):
    values = np.zeros((1, WIDTH), np.float32)
    status, answer = request(server, "POST", "/v2/models/scored/infer", infer_body(values, [b"unknown"]))
    assert status == 500
    assert "scored/pre" in answer["error"] and "unknown segment" in answer["error"]
    status, answer = request(server, "POST", "/v2/models/scored/infer", infer_body(values, [b"retail"]))
    assert status == 200, answer


def test_wrong_inputs_are_a_400_naming_the_tensor(server):
    body = json.dumps({"inputs": [
        {"name": "values", "datatype": "FP32", "shape": [1, WIDTH], "data": [0.0] * WIDTH},
        {"name": "segment", "datatype": "BYTES", "shape": [1, 1], "data": [7]}]}).encode()
    status, answer = request(server, "POST", "/v2/models/scored/infer", body)
    assert status == 400 and "segment" in answer["error"]
    body = json.dumps({"inputs": [
        {"name": "values", "datatype": "FP32", "shape": [1, WIDTH], "data": [0.0] * WIDTH}]}).encode()
    status, answer = request(server, "POST", "/v2/models/scored/infer", body)
    assert status == 400 and "segment" in answer["error"]


def test_each_step_has_its_own_statistics(server):
    values = np.ones((3, WIDTH), np.float32)
    status, _ = request(server, "POST", "/v2/models/scored/infer", infer_body(values, [b"retail"] * 3))
    assert status == 200
    status, stats = request(server, "GET", "/v2/models/scored/stats")
    assert status == 200
    steps = stats["model_stats"][0]["steps"]
    assert [s["name"] for s in steps] == ["pre", "model", "post"]
    for s in steps:
        assert s["execution_count"] >= 1 and s["inference_count"] >= 3 and s["compute_infer"]["ns"] > 0
    # the first step runs on every batch, even one a later step fails
    assert steps[0]["execution_count"] >= steps[-1]["execution_count"]
    status, metrics = request(server, "GET", "/metrics")
    text = metrics.decode()
    for step in ("pre", "model", "post"):
        assert f'vivace_step_execution_count_total{{model="scored",step="{step}",version="1"}}' in text


def test_scorer_runs_the_pipeline_offline(ensemble, steps):
    values = np.random.default_rng(3).normal(size=(4, WIDTH)).astype(np.float32)
    segments = [b"business", b"retail", b"retail", b"business"]
    out = Scorer(ensemble.path).predict({"values": values, "segment": np.array([[s] for s in segments], object)})
    score, decision = direct(steps, values, segments)
    np.testing.assert_allclose(out["score"], score, rtol=1e-5)
    assert list(out["decision"].ravel()) == decision


def test_the_registry_stores_and_serves_it(ensemble, tmp_path):
    home = tmp_path / "home"
    run = [sys.executable, "-m", "vivace", "--home", str(home)]
    registered = subprocess.run([*run, "models", "register", str(ensemble.path), "--name", "scored"],
                                capture_output=True, text=True, timeout=60)
    assert registered.returncode == 0, registered.stderr
    srv = ServerProcess(["scored/1"], env={"VIVACE_HOME": str(home)})
    try:
        values = np.ones((1, WIDTH), np.float32)
        status, answer = request(srv, "POST", "/v2/models/scored/infer", infer_body(values, [b"retail"]))
        assert status == 200, answer
    finally:
        assert srv.stop() == 0


def test_wiring_mistakes_are_refused_before_anything_is_written(steps, tmp_path):
    out = tmp_path / "bad"
    # without --map, post's `logit` is fed by nothing earlier: it becomes an input of the ensemble
    loose = package_ensemble([("model", steps["model"]), ("post", steps["post"])], out, name="loose")
    assert [t.name for t in loose.inputs] == ["input__0", "logit"]
    cases = [
        ([("pre", steps["pre"]), ("model", steps["model"])], {"model.nothing": "x"}, None, "name no step"),
        ([("pre", steps["pre"]), ("pre", steps["post"])], {}, None, "unique"),
        ([("model", steps["model"]), ("again", steps["model"])], {}, None, "already is"),
        ([("pre", steps["pre"]), ("model", steps["model"])], {}, ["missing"], "not produced"),
        # the model's FP32 [-1, 1] output cannot feed pre's FP32 [-1, 32] input
        ([("model", steps["model"]), ("pre", steps["pre"])], {"pre.values": "output__0", "pre.input__0": "features"},
         None, "FP32 \\[-1, 1\\]"),
    ]
    before = (out / MANIFEST).read_bytes()
    for step_list, tensor_map, outputs, message in cases:
        with pytest.raises(PackageError, match=message):
            package_ensemble(step_list, out, name="bad", tensor_map=tensor_map, outputs=outputs, overwrite=True)
        assert (out / MANIFEST).read_bytes() == before  # the package there is untouched
        assert load_package(out).name == "loose"


def test_a_tampered_or_miswired_ensemble_is_refused_at_load(ensemble, tmp_path):
    import hashlib
    import shutil

    from vivace.engine.backends import load_backend

    copy = tmp_path / "copy"
    shutil.copytree(ensemble.path, copy)
    graph = json.loads((copy / "ensemble.json").read_text())
    graph["steps"][2]["input_map"] = {"logit": "values"}  # FP32 [-1, 32] into an FP32 [-1, 1] input
    (copy / "ensemble.json").write_text(json.dumps(graph))
    with pytest.raises(PackageError, match="corrupted"):
        load_package(copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["files"]["ensemble.json"] = hashlib.sha256((copy / "ensemble.json").read_bytes()).hexdigest()
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="step 'post': input 'logit'"):
        load_backend(load_package(copy))
    (copy / "ensemble.json").write_text('{"format": "vivace-ensemble/1", "steps": [{"name": "x"}]}')
    manifest["files"]["ensemble.json"] = hashlib.sha256((copy / "ensemble.json").read_bytes()).hexdigest()
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="platform"):
        load_backend(load_package(copy))
