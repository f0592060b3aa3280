"""Serving by entity id: a model whose package declares a feature service is called with
only the INT64 join key; the batch path looks the features up in the LMDB online store
natively. Real feature store, real materialization, real server, real tritonclient."""
from __future__ import annotations

import http.client
import json
import time

import numpy as np
import pytest

from conftest import N_FEATURES, WEIGHTS, ServerProcess, feature_values

def post(port, model, ids, extra=None):
    body = {"inputs": [{"name": "customer_id", "shape": [len(ids), 1], "datatype": "INT64", "data": ids}]}
    body.update(extra or {})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", f"/v2/models/{model}/infer", json.dumps(body))
    response = conn.getresponse()
    return response.status, json.loads(response.read())


@pytest.fixture(scope="module")
def entity_server(entity_home):
    home, packages = entity_home
    server = ServerProcess([packages["error"], packages["default"]], env={"VIVACE_HOME": str(home)})
    yield server
    assert server.stop() == 0


def test_metadata_shows_the_entity_signature(entity_server):
    conn = http.client.HTTPConnection("127.0.0.1", entity_server.port, timeout=10)
    conn.request("GET", "/v2/models/scorer_error")
    meta = json.loads(conn.getresponse().read())
    assert meta["inputs"] == [{"name": "customer_id", "datatype": "INT64", "shape": [-1, 1]}]
    assert [o["name"] for o in meta["outputs"]] == ["output__0", "entity_found"]


def test_entity_ids_are_scored_from_the_online_store(entity_server):
    ids = [3, 17, 100, 3]
    status, result = post(entity_server.port, "scorer_error", ids, {"id": "e1"})
    assert status == 200, result
    expected = feature_values(np.array(ids)) @ WEIGHTS
    np.testing.assert_allclose(result["outputs"][0]["data"], expected, rtol=1e-6)
    assert result["outputs"][1]["data"] == [True] * 4 and result["id"] == "e1"


def test_unknown_entity_policies(entity_server):
    status, result = post(entity_server.port, "scorer_error", [5, 999, 1000])
    assert status == 404 and "[999, 1000]" in result["error"]
    status, result = post(entity_server.port, "scorer_default", [5, 999])  # native JSON path
    assert status == 200
    assert result["outputs"][1]["data"] == [True, False]
    assert result["outputs"][0]["data"][0] == pytest.approx(float(feature_values(np.array([5])) @ WEIGHTS))
    assert result["outputs"][0]["data"][1] is None  # NaN features: no score, flagged


def test_wrong_key_type_is_refused(entity_server):
    conn = http.client.HTTPConnection("127.0.0.1", entity_server.port, timeout=10)
    body = {"inputs": [{"name": "customer_id", "shape": [1, 1], "datatype": "FP32", "data": [1.5]}]}
    conn.request("POST", "/v2/models/scorer_error/infer", json.dumps(body))
    response = conn.getresponse()
    assert response.status == 400 and "INT64" in json.loads(response.read())["error"]


def test_tritonclient_binary_entity_request(entity_server):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(f"127.0.0.1:{entity_server.port}")
    ids = np.array([[1], [2], [42]], np.int64)
    inp = triton.InferInput("customer_id", list(ids.shape), "INT64")
    inp.set_data_from_numpy(ids)
    result = client.infer("scorer_error", [inp])
    np.testing.assert_allclose(result.as_numpy("output__0").reshape(-1), feature_values(ids.reshape(-1)) @ WEIGHTS,
                               rtol=1e-6)
    assert result.as_numpy("entity_found").reshape(-1).tolist() == [True, True, True]
    client.close()


def test_entity_models_are_monitored_on_the_features_they_were_served(entity_home, tmp_path):
    """Drift sketches of an entity-id model count the looked-up features, not the keys."""
    from vivace.monitor.drift import build_profile
    from vivace.registry.package import load_package, write_package

    home, packages = entity_home
    source = load_package(packages["default"])
    # Reference: the features of entities 1..50; traffic from entities 51..100 has drifted.
    reference = feature_values(np.arange(1, 51))
    profile = build_profile({f"f{j}": reference[:, j] for j in range(N_FEATURES)})
    manifest = source.manifest()
    manifest["name"] = "monitored"
    manifest["metadata"]["profile"] = "profile.json"
    path = tmp_path / "monitored"
    write_package(path, manifest, {"model.pt": (source.path / "model.pt").read_bytes(),
                                   "profile.json": json.dumps(profile).encode()})
    server = ServerProcess([path], "--drift-interval", "0.2", "--drift-window", "1200", env={"VIVACE_HOME": str(home)})
    try:
        for _ in range(30):  # 1200 rows: alerts need at least 1000
            assert post(server.port, "monitored", list(range(51, 91)))[0] == 200
        deadline = time.monotonic() + 20
        while True:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            conn.request("GET", "/v2/models/monitored/drift")
            doc = json.loads(conn.getresponse().read())
            if doc["rows"] >= 1200 and doc["drifting"]:
                break
            assert time.monotonic() < deadline, doc
            time.sleep(0.1)
        assert doc["drifting"] == ["f0", "f1", "f2", "f3"]
    finally:
        assert server.stop() == 0
