"""Native MLP packages over HTTP: the batcher calls the kernel directly from its batch
buffers (no Python, no GIL per batch), inline on the loop or on executor threads."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import ServerProcess
from test_http import reference_scores, request


@pytest.fixture(scope="module")
def native_packages(tmp_path_factory, mlp_package):
    from vivace.engine.native.convert import quantize_package

    root = tmp_path_factory.mktemp("native")
    return {precision: quantize_package(mlp_package, root / precision, precision=precision)[0].path
            for precision in ("fp32", "int8")}


@pytest.mark.parametrize("execution", ["inline", "threads"])
@pytest.mark.parametrize("precision,tolerance", [("fp32", 1e-5), ("int8", 5e-3)])
def test_native_package_served_over_http(native_packages, execution, precision, tolerance):
    server = ServerProcess([native_packages[precision]], "--execution", execution)
    try:
        x = np.random.default_rng(5).standard_normal((300, 32)).astype(np.float32)
        body = {"id": "n", "inputs": [{"name": "input__0", "shape": [300, 32], "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}
        status, data, _ = request(server, "POST", "/v2/models/mlp/infer", json.dumps(body))
        assert status == 200, data
        out = np.array(json.loads(data)["outputs"][0]["data"], np.float32).reshape(300, 1)
        np.testing.assert_allclose(out, reference_scores(x), atol=tolerance)
        stats = json.loads(request(server, "GET", "/v2/models/mlp/stats")[1])["model_stats"][0]
        assert stats["inference_count"] == 300 and stats["execution_count"] >= 3  # max batch 128
    finally:
        assert server.stop() == 0
