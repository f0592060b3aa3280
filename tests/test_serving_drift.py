"""Online drift in the serving path: a package with a reference profile is sketched per
batch in C++; /v2/models/{m}/drift and the Prometheus gauges report the statistics."""
from __future__ import annotations

import http.client
import json
import time

import numpy as np
import pytest

from conftest import ServerProcess, wait_for


@pytest.fixture(scope="module")
def profiled_package(tmp_path_factory, mlp_package):
    from vivace.engine import Scorer
    from vivace.monitor.drift import build_profile
    from vivace.registry.package import load_package, write_package

    rng = np.random.default_rng(0)
    reference = rng.standard_normal((20_000, 32)).astype(np.float32)
    predictions = Scorer(mlp_package).predict(reference)
    columns = {f"f{i}": reference[:, i] for i in range(32)}
    profile = build_profile(columns, predictions=predictions)
    manifest = load_package(mlp_package).manifest()
    manifest["metadata"] = {"profile": "profile.json"}
    path = tmp_path_factory.mktemp("profiled") / "mlp"
    write_package(path, manifest, {"model.pt": (mlp_package / "model.pt").read_bytes(),
                                   "profile.json": json.dumps(profile).encode()})
    return path


def post_rows(port, rows: np.ndarray):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for start in range(0, len(rows), 100):
        chunk = rows[start:start + 100]
        body = json.dumps({"inputs": [{"name": "input__0", "shape": list(chunk.shape), "datatype": "FP32",
                                       "data": chunk.ravel().tolist()}]})
        conn.request("POST", "/v2/models/mlp/infer", body)
        response = conn.getresponse()
        assert response.status == 200, response.read()
        response.read()
    conn.close()


def get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, response.read()


def test_drift_endpoint_and_gauges_follow_the_traffic(profiled_package):
    server = ServerProcess([profiled_package], "--drift-interval", "0.2", "--drift-window", "3000")
    try:
        rng = np.random.default_rng(1)
        post_rows(server.port, rng.standard_normal((3000, 32)).astype(np.float32))

        def status():
            code, body = get(server.port, "/v2/models/mlp/drift")
            assert code == 200, body
            doc = json.loads(body)
            return doc if doc["rows"] >= 3000 else None

        calm = wait_for(status)
        assert calm["drifting"] == []
        # --drift-window N means N rows (issue 21 item 2), and /drift says so.
        assert calm["rows"] == 3000
        assert calm["window"] == {"kind": "rows", "rows": 3000, "buckets": 6, "bucket_rows": 500}
        names = {f["name"] for f in calm["features"]}
        assert {"f0", "f31", "prediction"} <= names

        shifted = rng.standard_normal((3000, 32)).astype(np.float32)
        shifted[:, 3] += 1.0
        shifted[:, 7] *= 3.0
        post_rows(server.port, shifted)

        def drifted():
            doc = json.loads(get(server.port, "/v2/models/mlp/drift")[1])
            return doc if {"f3", "f7"} <= set(doc["drifting"]) else None

        doc = wait_for(drifted)
        assert "f0" not in doc["drifting"]
        assert 2500 < doc["rows"] <= 3000  # the shifted rows only, not 6 x 3000
        metrics = get(server.port, "/metrics")[1].decode()
        # The HELP text names exactly the statistic label values exported (item 3).
        import re

        helped = re.search(r"# HELP vivace_drift_statistic .*\((.*)\)", metrics).group(1).split(", ")
        exported = set(re.findall(r'vivace_drift_statistic\{[^}]*statistic="([a-z_]+)"', metrics))
        assert exported == set(helped)
        assert 'vivace_drift_statistic{feature="f3",model="mlp",statistic="drifted",version="1"} 1.0' in metrics
        assert 'vivace_drift_statistic{feature="f0",model="mlp",statistic="drifted",version="1"} 0.0' in metrics
    finally:
        assert server.stop() == 0


def test_model_without_profile_has_no_drift_route(server):
    code, body = get(server.port, "/v2/models/mlp/drift")
    assert code == 404 and "reference profile" in json.loads(body)["error"]


def test_grafana_dashboard_queries_name_exported_metrics(profiled_package):
    """Every vivace_* metric a dashboard query uses is in a live server's /metrics."""
    import re
    from importlib.resources import files

    import yaml

    dashboard = json.loads(files("vivace.monitor.data").joinpath("grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"vivace_[a-z_]+", e)}
    assert len(used) >= 10
    scrape = yaml.safe_load(files("vivace.monitor.data").joinpath("prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["metrics_path"] == "/metrics"

    server = ServerProcess([profiled_package], "--drift-interval", "0.2", "--drift-window", "1000")
    try:
        post_rows(server.port, np.random.default_rng(2).standard_normal((1000, 32)).astype(np.float32))
        # 6 buckets of 166 rows: after 1000 rows the seventh opened, the window holds 834
        wait_for(lambda: json.loads(get(server.port, "/v2/models/mlp/drift")[1])["rows"] >= 834)
        time.sleep(0.5)  # one more drift check after the window filled
        text = get(server.port, "/metrics")[1].decode()
        exported = {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"^(vivace_[a-z_]+)", text, re.M)}
        # Rollout and shadow families have samples only while a rollout is served
        # (tests/test_rollouts.py checks those panels against a server running one).
        # Ground-truth families have samples only with a prediction log and labels
        # (tests/test_feedback.py checks those panels against a server receiving labels).
        missing = {m for m in used - exported if not m.startswith(
            ("vivace_rollout_", "vivace_shadow_", "vivace_model_quality", "vivace_feedback_", "vivace_feature_importance",
             "vivace_group_metric", "vivace_fairness_"))}
        assert not missing, f"dashboard queries metrics the server does not export: {sorted(missing)}"
    finally:
        assert server.stop() == 0


def test_prediction_log_records_sampled_requests_and_responses(mlp_package, tmp_path):
    path = tmp_path / "predictions.jsonl"
    server = ServerProcess([mlp_package], "--prediction-log", str(path), "--prediction-log-sample", "1")
    try:
        row = [0.25] * 32
        bodies = [
            {"id": "req-1", "inputs": [{"name": "input__0", "shape": [1, 32], "datatype": "FP32", "data": row}]},
            {"inputs": [{"name": "input__0", "shape": [2, 32], "datatype": "FP32", "data": row * 2}],
             "parameters": {"priority": 1}},  # the general decoder's path
        ]
        answers = []
        for body in bodies:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            conn.request("POST", "/v2/models/mlp/infer", json.dumps(body))
            answers.append(json.loads(conn.getresponse().read()))
            conn.close()
    finally:
        assert server.stop() == 0
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 2
    first, second = sorted(records, key=lambda r: r["request_id"] != "req-1")
    assert first["request_id"] == "req-1" and second["request_id"]  # a server id when the client sent none
    for record, body, answer in [(first, bodies[0], answers[0]), (second, bodies[1], answers[1])]:
        assert (record["model"], record["version"]) == ("mlp", "1") and record["latency_s"] > 0
        assert record["inputs"] == body["inputs"] and record["outputs"] == answer["outputs"]
