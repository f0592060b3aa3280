"""Serving a model `vivace train` made with its raw, named feature columns: numbers for a
numeric feature and strings for a categorical one, encoded as training encoded them. Real
training, a real `vivace serve` on both front ends, real HTTP."""
from __future__ import annotations

import http.client
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import ServerProcess

from vivace.registry import Home
from vivace.registry.data import add_dataset
from vivace.registry.demo_data import TRAIN_CONFIG, churn_frame
from vivace.registry.models import model_card, register_model
from vivace.registry.package import load_package
from vivace.registry.train import encode, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    frame = churn_frame(rows=600)
    frame.to_parquet(root / "churn.parquet")
    config = yaml.safe_load(TRAIN_CONFIG.read_text())
    config["train"]["epochs"] = 2
    with Home(root / "home") as home:
        add_dataset(home, "churn", root / "churn.parquet")
        result = train(home, config)
        register_model(home, result.package_dir, "churn", run_id=result.run_id)
        card = model_card(home, "churn/1")
    package = load_package(result.package_dir)
    return package, frame.head(7).reset_index(drop=True), card


@pytest.fixture(scope="module", params=["native", "python"])
def served(trained, request):
    package = trained[0]
    srv = ServerProcess([package.path], "--http-frontend", request.param)
    yield srv
    assert srv.stop() == 0


def call(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, json.dumps(body) if body is not None else None)
    response = conn.getresponse()
    status, payload = response.status, json.loads(response.read())
    conn.close()
    return status, payload


def feature_inputs(specs: list[dict], rows: pd.DataFrame) -> list[dict]:
    inputs = []
    for spec in specs:
        column = rows[spec["name"]]
        if spec["kind"] == "numeric":
            values = [None if pd.isna(v) else float(v) for v in column]
            inputs.append({"name": spec["name"], "datatype": "FP64", "shape": [len(values)], "data": values})
        else:
            values = [None if pd.isna(v) else str(v) for v in column]
            inputs.append({"name": spec["name"], "datatype": "BYTES", "shape": [len(values), 1],
                           "data": [[v] for v in values]})
    return inputs


def test_named_raw_columns_score_as_the_encoded_tensor(trained, served):
    package, rows, _ = trained
    specs = package.metadata["features"]
    assert any(s["kind"] == "categorical" for s in specs), "the demo data has a categorical column"
    encoded = encode(rows, specs)
    tensor = {"inputs": [{"name": "input__0", "datatype": "FP32", "shape": list(encoded.shape),
                          "data": encoded.ravel().tolist()}]}
    status, expected = call(served.port, "POST", f"/v2/models/{package.name}/infer", tensor)
    assert status == 200, expected
    # Features in another order than the model's, one categorical value never seen in training.
    named = feature_inputs(specs, rows)[::-1]
    status, got = call(served.port, "POST", f"/v2/models/{package.name}/infer", {"inputs": named})
    assert status == 200, got
    assert got["outputs"][0]["data"] == pytest.approx(expected["outputs"][0]["data"], abs=1e-6)

    unseen = rows.copy()
    categorical = next(s for s in specs if s["kind"] == "categorical")
    unseen.loc[0, categorical["name"]] = "a-value-training-never-saw"
    status, got = call(served.port, "POST", f"/v2/models/{package.name}/infer", {"inputs": feature_inputs(specs, unseen)})
    assert status == 200, got
    as_tensor = encode(unseen, specs)
    assert as_tensor[0, specs.index(categorical)] == -1
    status, want = call(served.port, "POST", f"/v2/models/{package.name}/infer", {"inputs": [
        {"name": "input__0", "datatype": "FP32", "shape": list(as_tensor.shape), "data": as_tensor.ravel().tolist()}]})
    assert got["outputs"][0]["data"] == pytest.approx(want["outputs"][0]["data"], abs=1e-6)


def test_bad_raw_columns_are_refused_by_name(trained, served):
    package, rows, _ = trained
    specs = package.metadata["features"]
    good = feature_inputs(specs, rows)
    numeric = next(i for i, s in enumerate(specs) if s["kind"] == "numeric")
    categorical = next(i for i, s in enumerate(specs) if s["kind"] == "categorical")

    def refused(inputs, fragment, extra=None):
        status, body = call(served.port, "POST", f"/v2/models/{package.name}/infer", {"inputs": inputs, **(extra or {})})
        assert status == 400 and fragment in body["error"], (status, body)

    refused(good[1:], f"missing features ['{specs[0]['name']}']")
    refused([*good, {**good[0]}], "given more than once")
    refused([*good, {"name": "nope", "datatype": "FP32", "shape": [7], "data": [0] * 7}], "unknown input 'nope'")
    as_numbers = dict(good[categorical], datatype="FP32", data=[[1.0]] * 7)
    refused([*good[:categorical], as_numbers, *good[categorical + 1:]], "is categorical: send it as BYTES")
    wrong_values = dict(good[categorical], data=[[3]] * 7)
    refused([*good[:categorical], wrong_values, *good[categorical + 1:]], "must be strings or null")
    text_number = dict(good[numeric], data=["12"] * 7)
    refused([*good[:numeric], text_number, *good[numeric + 1:]], "must be numbers or null")
    short = dict(good[numeric], data=good[numeric]["data"][:3])
    refused([*good[:numeric], short, *good[numeric + 1:]], "declares 7 rows and holds 3 values")
    other_rows = dict(good[numeric], shape=[3], data=good[numeric]["data"][:3])
    refused([*good[:numeric], other_rows, *good[numeric + 1:]], "rows, other features have")
    matrix = dict(good[numeric], shape=[7, 2])
    refused([*good[:numeric], matrix, *good[numeric + 1:]], "a feature column is [rows] or [rows, 1]")
    # The server is unharmed: a good request still answers.
    status, _ = call(served.port, "POST", f"/v2/models/{package.name}/infer", {"inputs": good})
    assert status == 200


def test_metadata_config_and_card_show_features_and_codes(trained, served):
    package, _, card = trained
    specs = package.metadata["features"]
    status, metadata = call(served.port, "GET", f"/v2/models/{package.name}")
    assert status == 200 and metadata["parameters"]["features"] == specs
    status, config = call(served.port, "GET", f"/v2/models/{package.name}/config")
    assert status == 200 and json.loads(config["parameters"]["features"]["string_value"]) == specs
    categorical = next(s for s in specs if s["kind"] == "categorical")
    codes = ", ".join(f"{k}={c}" for k, c in enumerate(categorical["categories"]))
    assert "## Features" in card and f"| {categorical['name']} | categorical | {codes} |" in card
    assert np.all([f"| {s['name']} | numeric |" in card for s in specs if s["kind"] == "numeric"])


def test_openapi_request_schema_allows_named_features(trained, served):
    from jsonschema_rs import Draft202012Validator  # schemathesis depends on it

    package, rows, _ = trained
    specs = package.metadata["features"]
    status, document = call(served.port, "GET", "/v2/openapi.json")
    assert status == 200
    schema = {"components": document["components"],
              **document["components"]["schemas"][f"InferRequest.{package.name}"]}
    valid = Draft202012Validator(schema).is_valid
    good = feature_inputs(specs, rows)
    assert valid({"inputs": good}) and valid({"inputs": good[::-1]})
    categorical = next(i for i, s in enumerate(specs) if s["kind"] == "categorical")
    assert not valid({"inputs": good[1:]})                                               # one missing
    assert not valid({"inputs": [*good, good[0]]})                                       # one twice
    assert not valid({"inputs": [*good[:categorical], dict(good[categorical], datatype="FP32"),
                                 *good[categorical + 1:]]})                              # category as a number
    encoded = encode(rows, specs)
    assert valid({"inputs": [{"name": "input__0", "datatype": "FP32", "shape": list(encoded.shape),
                              "data": encoded.ravel().tolist()}]})                       # the tensor still
