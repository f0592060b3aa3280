"""The OpenAPI document of the HTTP API (engine/openapi.py): it is valid OpenAPI 3.1, it
covers every route the server answers, and schemathesis run against a live `vivace serve`
on loopback finds no 5xx and no response outside the document."""
from __future__ import annotations

import io
import json
import re
import resource
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import ServerProcess

MAX_BODY_BYTES = 1 << 16
# The server under fuzzing may not grow its address space by more than this: a request
# that makes it allocate gigabytes must fail as a 5xx the test sees, not swap the machine.
ADDRESS_SPACE_HEADROOM = 2 << 30
MAX_EXAMPLES = 8


def not_a_server_error_but_missed_deadlines(ctx, response, case):
    """not_a_server_error, except the 503 that answers a request whose own `timeout`
    parameter (microseconds, fuzzed down to 1) expired in the queue: that is the protocol."""
    if response.status_code == 503 and "timed out in the queue" in response.text:
        return None
    return not_a_server_error(ctx, response, case)


CHECKS = [not_a_server_error_but_missed_deadlines, status_code_conformance, content_type_conformance,
          response_schema_conformance]


def _pair_model_bytes() -> bytes:
    import torch

    class Pair(torch.nn.Module):
        def forward(self, x: torch.Tensor, k: torch.Tensor):
            total = x.sum(dim=(1, 2)).unsqueeze(1).double() + k.double()
            return total, total > 0

    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(Pair()), buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def packages(tmp_path_factory, mlp_package) -> list[Path]:
    """The reference MLP with a drift profile, and `pair`: two inputs of other ranks and
    datatypes, two outputs (FP64 and BOOL), two priority levels, version 7."""
    from vivace.monitor.drift import build_profile
    from vivace.registry.package import load_package, write_package

    root = tmp_path_factory.mktemp("openapi")
    reference = np.random.default_rng(0).standard_normal((1000, 32)).astype(np.float32)
    manifest = load_package(mlp_package).manifest()
    manifest["metadata"] = {"profile": "profile.json"}
    profile = json.dumps(build_profile({f"f{i}": reference[:, i] for i in range(32)})).encode()
    write_package(root / "mlp", manifest, {"model.pt": (mlp_package / "model.pt").read_bytes(),
                                           "profile.json": profile})
    write_package(root / "pair", {
        "name": "pair", "version": "7", "platform": "torchscript", "model_file": "model.pt",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2, 3]},
                   {"name": "k", "datatype": "INT32", "shape": [-1, 1]}],
        "outputs": [{"name": "total", "datatype": "FP64", "shape": [-1, 1]},
                    {"name": "positive", "datatype": "BOOL", "shape": [-1, 1]}],
        "max_batch_size": 16,
        "dynamic_batching": {"priority_levels": 2, "default_priority_level": 2},
        "parameters": {"torch_num_threads": 1},
    }, {"model.pt": _pair_model_bytes()})
    return [root / "mlp", root / "pair"]


@pytest.fixture(scope="module")
def app(packages):
    """The App the server builds for these packages and limits, in this process."""
    from vivace.engine.config import ServerConfig
    from vivace.engine.runtime import ModelRunner
    from vivace.engine.server import App
    from vivace.registry.package import load_package

    runners = [ModelRunner(load_package(p)) for p in packages]
    yield App(runners, ServerConfig(max_body_bytes=MAX_BODY_BYTES, repository_control=True))
    for runner in runners:
        runner.close(drain=False)


@pytest.fixture(scope="module")
def document(app) -> dict:
    from vivace.engine import openapi

    return openapi.document(app)


@pytest.fixture(scope="module")
def live(packages, tmp_path_factory):
    # An empty registry of its own: fuzzed load and alias requests must not touch ./.vivace.
    home = tmp_path_factory.mktemp("home")
    server = ServerProcess(packages, "--max-body-bytes", str(MAX_BODY_BYTES), "--drift-interval", "0.2",
                           "--repository-control", env={"VIVACE_HOME": str(home)})
    size_kib = int(re.search(r"VmSize:\s+(\d+)", Path(f"/proc/{server.proc.pid}/status").read_text()).group(1))
    cap = size_kib * 1024 + ADDRESS_SPACE_HEADROOM
    resource.prlimit(server.proc.pid, resource.RLIMIT_AS, (cap, cap))
    yield server
    assert server.stop() == 0


# -- the document ------------------------------------------------------------------------

def test_document_is_valid_openapi_and_loads_in_schemathesis(document):
    loaded = schemathesis.openapi.from_dict(document)
    loaded.validate()  # against the OpenAPI 3.1 meta-schema
    errors = [str(result.err()) for result in loaded.get_all_operations() if hasattr(result, "err")]
    assert not errors
    assert json.loads(json.dumps(document)) == document  # plain JSON: what the route encodes


def test_path_parameters_enumerate_the_served_models_and_versions(document):
    parameters = document["components"]["parameters"]
    assert parameters["ModelName"]["schema"]["enum"] == ["mlp", "pair"]
    assert parameters["ModelVersion"]["schema"]["enum"] == ["1", "7"]
    infer = document["paths"]["/v2/models/pair/versions/{model_version}/infer"]
    assert infer["parameters"][0]["schema"]["enum"] == ["7"]


def test_infer_request_schema_follows_the_signature(document):
    from jsonschema_rs import Draft202012Validator  # schemathesis depends on it

    # The request schema as a root schema, its $refs resolving within the document.
    request_schema = {"components": document["components"], **document["components"]["schemas"]["InferRequest.pair"]}
    valid = Draft202012Validator(request_schema).is_valid

    x = {"name": "x", "shape": [1, 2, 3], "datatype": "FP32", "data": [0.5] * 6}
    k = {"name": "k", "shape": [1, 1], "datatype": "INT32", "data": [3]}
    assert valid({"inputs": [x, k]}) and valid({"inputs": [k, x], "id": "a"})
    nested = dict(x, shape=[2, 2, 3], data=[[[0, 1, 2], [3, 4, 5]], [[0, 1, 2], [3, 4, 5]]])
    assert valid({"inputs": [nested, dict(k, shape=[2, 1], data=[1, 2])]})
    for bad in (
        {"inputs": [x]},                                            # missing input
        {"inputs": [x, x]},                                         # duplicate input
        {"inputs": [dict(x, datatype="FP64"), k]},                  # wrong datatype
        {"inputs": [dict(x, shape=[1, 3, 2]), k]},                  # wrong row shape
        {"inputs": [x, dict(k, data=[2**31])]},                     # out of INT32 range
        {"inputs": [x, dict(k, name="K")]},                         # unknown name
        {"inputs": [x, k], "outputs": [{"name": "nope"}]},          # unknown output
        {"inputs": [x, k], "parameters": {"priority": 3}},          # beyond 2 priority levels
        {"inputs": [dict(x, data=[0.5] * 5), k]},                   # one row, too few values
    ):
        assert not valid(bad), bad


def _concrete_routes() -> list[tuple[str, str]]:
    """One URL per route App._resolve answers, for the models of `packages`."""
    routes = [("GET", "/v2/health/live"), ("GET", "/v2/health/ready"), ("GET", "/v2"),
              ("GET", "/v2/models/stats"), ("GET", "/metrics"), ("GET", "/v2/openapi.json"),
              ("POST", "/v2/repository/index"), ("POST", "/v2/repository/models/mlp/load"),
              ("POST", "/v2/repository/models/mlp/unload"), ("POST", "/v2/repository/models/mlp/alias"),
              ("POST", "/v2/repository/models/mlp/rollout"), ("POST", "/v2/repository/models/mlp/request"),
              ("POST", "/v2/repository/models/mlp/approve")]
    for name, version in (("mlp", "1"), ("pair", "7")):
        for base in (f"/v2/models/{name}", f"/v2/models/{name}/versions/{version}"):
            routes += [("GET", base), ("GET", base + "/ready"), ("GET", base + "/config"),
                       ("GET", base + "/stats"), ("GET", base + "/drift"), ("GET", base + "/rollout"),
                       ("POST", base + "/feedback"), ("GET", base + "/performance"), ("POST", base + "/infer")]
    return routes


def _matches(template: str, item: dict, document: dict, url: str) -> bool:
    """Whether `url` is an instance of the path `template`, with path values the document allows."""
    parameters = {}
    for param in item.get("parameters", []):
        if "$ref" in param:
            param = document["components"]["parameters"][param["$ref"].rsplit("/", 1)[1]]
        parameters[param["name"]] = param["schema"]
    pattern = re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(template))
    match = re.fullmatch(pattern, url)
    if match is None:
        return False
    for name, value in match.groupdict().items():
        schema = parameters[name]
        if "enum" in schema and value not in schema["enum"]:
            return False
        if "pattern" in schema and not re.search(schema["pattern"], value):
            return False
    return True


def test_every_route_the_server_answers_is_documented(app, document):
    for method, url in _concrete_routes():
        app._resolve(method.encode(), url.encode())  # raises ProtocolError for a non-route
        documented = [t for t, item in document["paths"].items()
                      if method.lower() in item and _matches(t, item, document, url)]
        assert len(documented) == 1, (method, url, documented)


def test_every_documented_operation_is_a_route(app, document):
    from vivace.engine import oip

    concrete = set(_concrete_routes())
    for template, item in document["paths"].items():
        for method in ("get", "post"):
            if method in item:
                assert any(m == method.upper() and _matches(template, item, document, url)
                           for m, url in concrete), (method, template)
    # A wrong method is 405, as the document's description says.
    with pytest.raises(oip.ProtocolError) as excinfo:
        app._resolve(b"GET", b"/v2/models/mlp/infer")
    assert excinfo.value.status == 405


def test_live_server_serves_this_document(live, document):
    with urllib.request.urlopen(live.url + "/v2/openapi.json", timeout=10) as response:
        assert json.loads(response.read()) == document


def _one_case(operation):
    """A request for `operation` with the first allowed path values and its example body."""
    path_parameters = {}
    for param in operation.path_parameters:
        schema = param.definition["schema"]
        path_parameters[param.name] = schema["enum"][0] if "enum" in schema else "mlp"
    example = operation.definition.raw.get("requestBody", {}).get("content", {}).get("application/json", {})
    body = next(iter(example.get("examples", {}).values()), {}).get("value")
    if body is None:
        return operation.Case(path_parameters=path_parameters)
    return operation.Case(path_parameters=path_parameters, body=body, media_type="application/json")


def test_with_auth_every_route_but_health_answers_the_documented_401_and_403(packages, document, tmp_path):
    from vivace.engine.auth import TokenStore

    tokens = tmp_path / "tokens.json"
    reader = TokenStore(tokens).create("reader", ["read"])
    server = ServerProcess(packages, "--auth", "--auth-tokens", str(tokens),
                           env={"VIVACE_HOME": str(tmp_path / "home")})
    try:
        loaded = schemathesis.openapi.from_dict(document)
        loaded.config.update(base_url=server.url)
        for result in loaded.get_all_operations():
            operation = result.ok()
            scopes = [s for requirement in operation.definition.raw["security"] for s in requirement.values()]
            anonymous = _one_case(operation).call_and_validate(checks=CHECKS)
            if not scopes:  # health: open
                assert anonymous.status_code == 200, operation.label
                continue
            assert anonymous.status_code == 401, operation.label
            assert anonymous.headers["www-authenticate"][0].startswith("Bearer")
            with_reader = _one_case(operation).call_and_validate(
                checks=CHECKS, headers={"Authorization": f"Bearer {reader}"})
            expected = 200 if scopes == [["read"]] else 403
            assert with_reader.status_code == expected, (operation.label, with_reader.text)
    finally:
        assert server.stop() == 0


# -- schemathesis against the live server ---------------------------------------------------

@pytest.fixture(scope="module")
def api_schema(live, document):
    loaded = schemathesis.openapi.from_dict(document)
    loaded.config.update(base_url=live.url)
    loaded.config.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=MAX_EXAMPLES, deterministic=True,
    )
    return loaded


# Unloading a model mid-run would turn every later request for it into a 404: unload is
# checked once, at the end (test_unload_conforms_and_the_model_is_gone).
schema = schemathesis.pytest.from_fixture("api_schema").exclude(path_regex=r"/unload$")


@schema.parametrize()
def test_live_server_conforms_to_its_document(case):
    case.call_and_validate(checks=CHECKS, timeout=30)


def test_a_huge_claimed_batch_is_refused_without_allocating_it(live):
    """shape[0] = 2**36 with one row of data: the batcher must check the data before
    allocating 2**36 rows of buffers (8 TiB), not answer 500 std::bad_alloc."""
    for rows, extra in [(1 << 36, {}), (68810422, {"parameters": {"priority": 1}})]:  # native and general path
        body = json.dumps({"inputs": [{"name": "input__0", "shape": [rows, 32], "datatype": "FP32",
                                       "data": [0.0] * 32}], **extra}).encode()
        request = urllib.request.Request(live.url + "/v2/models/mlp/infer", data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as excinfo:
            urllib.request.urlopen(request, timeout=30)
        assert excinfo.value.code == 400, excinfo.value.read()


def test_unload_conforms_and_the_model_is_gone(live, api_schema):
    unload = api_schema["/v2/repository/models/{model_name}/unload"]["POST"]
    response = unload.Case(path_parameters={"model_name": "pair"}).call_and_validate(checks=CHECKS)
    assert response.json() == {"name": "pair", "unloaded": ["7"]}
    infer = api_schema["/v2/models/pair/infer"]["POST"]
    body = {"inputs": [{"name": "x", "shape": [1, 2, 3], "datatype": "FP32", "data": [0] * 6},
                       {"name": "k", "shape": [1, 1], "datatype": "INT32", "data": [1]}]}
    gone = infer.Case(body=body, media_type="application/json").call_and_validate(checks=CHECKS)
    assert gone.status_code == 404
