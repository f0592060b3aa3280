"""An infer call without a transport: App.infer answers in-process through the same
batcher, decoder and refusals as both HTTP front ends (engine/infer.py)."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch

from vivace.engine.config import ServerConfig
from vivace.engine.runtime import ModelRunner
from vivace.engine.server import App
from vivace.registry.package import load_package


def run(coroutine_function):
    return asyncio.run(coroutine_function())


def body(rows: np.ndarray, **extra) -> bytes:
    return json.dumps({"inputs": [{"name": "input__0", "datatype": "FP32", "shape": list(rows.shape),
                                   "data": rows.ravel().tolist()}], **extra}).encode()


@pytest.fixture(scope="module")
def reference(mlp_package):
    model = torch.jit.load(str(mlp_package / "model.pt"))
    rows = np.random.default_rng(3).standard_normal((5, 32)).astype(np.float32)
    with torch.no_grad():
        return rows, model(torch.from_numpy(rows)).numpy()


def with_app(mlp_package, scenario, **config):
    async def main():
        runner = ModelRunner(load_package(mlp_package))
        app = App([runner], ServerConfig(**config))
        runner.attach(asyncio.get_running_loop())
        try:
            return await scenario(app)
        finally:
            runner.close(drain=False)
    return run(main)


def test_json_and_binary_requests_answer_in_process(mlp_package, reference):
    rows, expected = reference

    async def scenario(app):
        plain = await app.infer("mlp", body(rows, id="r1"))
        pinned = await app.infer("mlp", body(rows), version="1")
        header = json.dumps({"inputs": [{"name": "input__0", "datatype": "FP32", "shape": [5, 32],
                                         "parameters": {"binary_data_size": rows.nbytes}}],
                             "parameters": {"binary_data_output": True}}).encode()
        binary = await app.infer("mlp", header + rows.tobytes(), header_length=len(header))
        return plain, pinned, binary

    plain, pinned, binary = with_app(mlp_package, scenario)
    assert plain.status == 200 and plain.header_length is None
    answer = json.loads(plain.body)
    assert answer["id"] == "r1" and answer["model_name"] == "mlp"
    np.testing.assert_allclose(np.array(answer["outputs"][0]["data"]).reshape(expected.shape), expected,
                               rtol=1e-5, atol=1e-5)
    assert pinned.status == 200 and json.loads(pinned.body)["outputs"] == answer["outputs"]
    assert binary.status == 200 and binary.header_length is not None
    tail = np.frombuffer(binary.body[binary.header_length:], np.float32).reshape(expected.shape)
    np.testing.assert_allclose(tail, expected, rtol=1e-5, atol=1e-5)


def test_refusals_are_outcomes_with_the_http_status(mlp_package, reference):
    rows, _ = reference

    async def scenario(app):
        unknown = await app.infer("nope", body(rows))
        version = await app.infer("mlp", body(rows), version="9")
        malformed = await app.infer("mlp", b'{"inputs": [')
        shape = await app.infer("mlp", body(rows[:, :31]))
        app.begin_drain()
        draining = await app.infer("mlp", body(rows))
        return unknown, version, malformed, shape, draining

    unknown, version, malformed, shape, draining = with_app(mlp_package, scenario)
    for outcome, status, words in ((unknown, 404, "unknown model 'nope'"), (version, 404, "unknown version '9'"),
                                   (malformed, 400, "malformed JSON"), (shape, 400, "shape"),
                                   (draining, 503, "draining")):
        assert outcome.status == status and words in json.loads(outcome.body)["error"], outcome
