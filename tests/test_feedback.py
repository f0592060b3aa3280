"""Ground truth through a real `vivace serve` on loopback: the churn demo model from a real
registry (SQLite), requests logged to the prediction log, labels POSTed to
/v2/models/churn/feedback; quality, group metrics, importance and alerts checked against
scikit-learn and hand computations; hostile feedback refused without losing labels; the
offline `vivace monitor feedback` join and the drift report with importance and groups."""
from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

from conftest import ServerProcess, wait_for

FEATURES = ["tenure_months", "monthly_charges", "support_calls", "contract", "plan", "region"]


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    from vivace.registry.demo_data import run_lifecycle

    home = tmp_path_factory.mktemp("home")
    run_lifecycle(home, home / "work", log=lambda line: None)
    return home


def request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    try:
        doc = json.loads(data)
    except ValueError:
        doc = {"text": data.decode()}
    return response.status, doc, dict(response.getheaders())


def infer_rows(port: int, frame, prefix: str) -> dict[str, list[float]]:
    """Send the rows by raw feature name in requests of 1-3 rows; {request id: predictions}."""
    out, start, k = {}, 0, 0
    while start < len(frame):
        chunk = frame.iloc[start:start + 1 + k % 3]
        inputs = []
        for name in FEATURES:
            values = chunk[name].tolist()
            datatype = "BYTES" if isinstance(values[0], str) else "FP64"
            inputs.append({"name": name, "shape": [len(values)], "datatype": datatype, "data": values})
        rid = f"{prefix}-{k}"
        status, doc, _ = request(port, "POST", "/v2/models/churn/infer", json.dumps({"id": rid, "inputs": inputs}).encode())
        assert status == 200, doc
        out[rid] = doc["outputs"][0]["data"]
        start += len(chunk)
        k += 1
    return out


def serve(home: Path, tmp_path: Path, frontend: str, *extra: str) -> ServerProcess:
    return ServerProcess(["churn@production"], "--prediction-log", str(tmp_path / "pred.jsonl"),
                         "--prediction-log-sample", "1", "--http-frontend", frontend, "--max-body-bytes",
                         str(1 << 20), *extra, env={"VIVACE_HOME": str(home)})


def test_labels_join_predictions_into_quality_groups_importance_and_alerts(home, tmp_path):
    from vivace.registry.demo_data import churn_frame

    alert_file = tmp_path / "alert.json"
    hook = f"{sys.executable} -c \"import os,sys; open(sys.argv[1],'w').write(os.environ['VIVACE_ALERT'])\" {alert_file}"
    server = serve(home, tmp_path, "native", "--quality-threshold", "auc>=0.99", "--quality-threshold",
                   "ece<=0.9", "--quality-min-labels", "50", "--importance-interval", "0.2", "--drift-command", hook)
    try:
        port = server.port
        frame = churn_frame(rows=400, seed=11)
        predictions = infer_rows(port, frame, "a")
        ids = list(predictions)
        labels, offset = {}, 0
        for rid in ids:
            n = len(predictions[rid])
            labels[rid] = frame["churned"].iloc[offset:offset + n].astype(float).tolist()
            offset += n
        # first half, then a duplicate with a flipped label (the last label wins), unknown ids,
        # a label list of the wrong length, and a versioned route for the second half
        first = [{"id": rid, "label": labels[rid]} for rid in ids[:100]]
        status, answer, _ = request(port, "POST", "/v2/models/churn/feedback", json.dumps({"labels": first + [
            {"id": "never-logged", "label": 1}, {"id": ids[0], "label": [1.0] * (len(labels[ids[0]]) + 1)}]}).encode())
        assert status == 200, answer
        assert answer == {"model": "churn", "received": 102, "joined": 100, "duplicates": 0, "unknown": 1,
                          "mismatched": 1, "unknown_ids": ["never-logged"]}
        flipped = ids[1]
        labels[flipped] = [1.0 - v for v in labels[flipped]]
        rest = [{"id": rid, "label": labels[rid]} for rid in [flipped, *ids[100:]]]
        status, answer, _ = request(port, "POST", "/v2/models/churn/versions/1/feedback",
                                    json.dumps({"labels": rest}).encode())
        assert status == 200 and answer["duplicates"] == 1 and answer["joined"] == len(ids) - 100, answer

        # hostile input: clear errors, and nothing already accepted is lost
        for body, code in [(b'{"labels": [{"id": "x", "label": 1', 400), (b"not json", 400),
                           (b'{"labels": [{"id": ["x"], "label": 1}]}', 400),
                           (b'{"labels": [{"id": "x", "label": "1"}]}', 400), (b"", 400),
                           (json.dumps({"labels": [{"id": str(i), "label": 0} for i in range(10_001)]}).encode(), 413),
                           (b'{"labels": [' + b'{"id": "y", "label": 1},' * 60_000 + b'{"id": "y", "label": 1}]}', 413)]:
            status, answer, _ = request(port, "POST", "/v2/models/churn/feedback", body)
            assert status == code and "error" in answer, (status, answer)
        status, answer, _ = request(port, "POST", "/v2/models/nope/feedback", b'{"labels": []}')
        assert status == 404

        status, perf, _ = request(port, "GET", "/v2/models/churn/performance")
        assert status == 200, perf
        y = np.array([v for rid in ids for v in labels[rid]])
        p = np.array([v for rid in ids for v in predictions[rid]])
        assert perf["labels"] == len(y) == 400 and perf["task"] == "binary"
        m = perf["metrics"]
        assert m["accuracy"] == pytest.approx(accuracy_score(y, p >= 0.5))
        assert m["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-9)
        assert m["logloss"] == pytest.approx(log_loss(y, p), rel=1e-6)
        # group metrics of the declared sensitive attribute, read from the logged inputs
        region = frame["region"].to_numpy()
        chosen = p >= 0.5
        rates = {g: chosen[region == g].mean() for g in sorted(set(region))}
        tprs = {g: chosen[(region == g) & (y == 1)].mean() for g in sorted(set(region))}
        groups = perf["groups"]["region"]
        assert {g: v["selection_rate"] for g, v in groups["groups"].items()} == pytest.approx(rates)
        assert groups["demographic_parity_difference"] == pytest.approx(max(rates.values()) - min(rates.values()))
        assert groups["equal_opportunity_difference"] == pytest.approx(max(tprs.values()) - min(tprs.values()))
        assert perf["state"] == "degraded" and [c["metric"] for c in perf["thresholds"] if c["breached"]] == ["auc"]
        assert perf["training"]["importance"]["method"] == "permutation"

        # the alert went through the alert actions: the retraining command ran with the payload
        alert = json.loads(wait_for(lambda: alert_file.exists() and alert_file.read_text(), what="the alert"))
        assert alert["kind"] == "quality" and alert["breached"] == ["auc"] and alert["version"] == "1"

        # production importance (labels: the drop of AUC), off the request path
        perf = wait_for(lambda: (d := request(port, "GET", "/v2/models/churn/performance")[1])["importance"] and d,
                        what="production importance")
        importance = perf["importance"]
        assert importance["method"] == "permutation" and importance["metric"] == "auc"
        assert set(importance["features"]) == set(FEATURES) and importance["rows"] == 400
        top = max(importance["features"], key=importance["features"].get)
        assert top in ("tenure_months", "contract", "support_calls")

        metrics = request(port, "GET", "/metrics")[1]["text"]
        assert re.search(r'vivace_model_quality\{metric="auc",model="churn",version="1"\} ' + re.escape(
            repr(m["auc"])[:8]), metrics)
        assert 'vivace_feedback_labels_total{model="churn",outcome="unknown",version=""} 1.0' in metrics
        assert 'vivace_feature_importance{feature="region",model="churn",source="training",version="1"}' in metrics
        assert 'vivace_fairness_difference{attribute="region",metric="demographic_parity_difference"' in metrics
        from importlib.resources import files

        dashboard = json.loads(files("vivace.monitor.data").joinpath("grafana-dashboard.json").read_text())
        used = {m for p_ in dashboard["panels"] for t in p_["targets"] for m in re.findall(
            r"vivace_(?:model_quality|feedback_[a-z_]+|feature_importance|group_metric|fairness_difference)", t["expr"])}
        assert len(used) == 6 and all(re.search(rf"^{u}(_total)?\{{", metrics, re.M) for u in used), used
        (tmp_path / "perf.json").write_text(json.dumps(perf))

        # the same labels joined offline by the command line give the same metrics
        csv = tmp_path / "labels.csv"
        csv.write_text("id,label,row\n" + "".join(f"{rid},{v},{i}\n" for rid in ids for i, v in enumerate(labels[rid])))
        env = dict(os.environ, VIVACE_HOME=str(home))
        out = subprocess.run([sys.executable, "-m", "vivace.cli", "monitor", "feedback", str(csv), "--model", "churn",
                              "--prediction-log", str(tmp_path / "pred.jsonl"), "--registry-model", "churn@production"],
                             capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        offline = json.loads(out.stdout)
        assert offline["feedback"]["joined"] == 400 and offline["versions"][0]["metrics"] == pytest.approx(m)
        assert offline["versions"][0]["groups"]["region"]["demographic_parity_difference"] == pytest.approx(
            groups["demographic_parity_difference"])

        # the report shows importance (training and production) and group metrics as inline SVG
        data = tmp_path / "current.parquet"
        frame.to_parquet(data)
        out = subprocess.run([sys.executable, "-m", "vivace.cli", "monitor", "report", "--model", "churn@production",
                              "--current", str(data), "--performance", str(tmp_path / "perf.json"), "--out",
                              str(tmp_path / "report.html")], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        page = (tmp_path / "report.html").read_text()
        assert "<h2>Feature importance</h2>" in page and "tenure_months production" in page
        assert "Group metrics: region (training)" in page and "Group metrics: region (production)" in page
        assert "<script" not in page and page.count("<svg") >= 8
    finally:
        assert server.stop() == 0
    errors = server.proc.stderr.read().decode()
    assert "Traceback" not in errors, errors[-3000:]


def test_python_front_end_and_floods_lose_nothing(home, tmp_path):
    """Concurrent uploads: each is answered 200 (counted) or 503 with Retry-After (nothing
    recorded); the labels the server acknowledged are exactly those in the feedback log."""
    from vivace.registry.demo_data import churn_frame

    server = serve(home, tmp_path, "python", "--importance-interval", "0")
    try:
        port = server.port
        predictions = infer_rows(port, churn_frame(rows=60, seed=3), "b")
        status, answer, _ = request(port, "POST", "/v2/models/churn/feedback", b'{"labels": [{"id": 1}]}')
        assert status == 400 and "error" in answer
        acknowledged, refused = [], []

        def upload(k: int) -> None:
            body = json.dumps({"labels": [{"id": rid, "label": [float(k % 2)] * len(v)}
                                          for rid, v in predictions.items()] * 40}).encode()
            status, answer, headers = request(port, "POST", "/v2/models/churn/feedback", body)
            if status == 200:
                acknowledged.append(answer["received"])
            else:
                assert status == 503 and "error" in answer and "retry-after" in {h.lower() for h in headers}, answer
                refused.append(k)

        threads = [threading.Thread(target=upload, args=(k,)) for k in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(acknowledged) + len(refused) == 12 and acknowledged
        written = sum(1 for f in tmp_path.glob("pred-feedback*") for _ in f.read_text().splitlines())
        assert written == sum(acknowledged)
        perf = request(port, "GET", "/v2/models/churn/performance")[1]
        assert perf["labels"] == 60 and perf["feedback"]["received"] == sum(acknowledged)
        assert perf["feedback"]["joined"] + perf["feedback"]["duplicates"] == sum(acknowledged)
    finally:
        assert server.stop() == 0


def test_without_a_prediction_log_feedback_is_404_and_performance_says_off(home):
    server = ServerProcess(["churn@production"], env={"VIVACE_HOME": str(home)})
    try:
        status, answer, _ = request(server.port, "POST", "/v2/models/churn/feedback",
                                    b'{"labels": [{"id": "a", "label": 1}]}')
        assert status == 404 and "--prediction-log" in answer["error"]
        status, perf, _ = request(server.port, "GET", "/v2/models/churn/performance")
        assert status == 200 and perf["state"] == "off"
    finally:
        assert server.stop() == 0
    time.sleep(0)
