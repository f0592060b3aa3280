"""CUDA backend: CUDA graphs per batch-size bucket and pinned staging. Skipped without a GPU."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from vivace.registry.package import load_package

pytestmark = pytest.mark.gpu


def cpu_scores(package, x):
    from vivace.engine import Scorer

    return Scorer(package, device="cpu").predict(x)


def test_scorer_on_cuda_matches_cpu(mlp_package):
    from vivace.engine import Scorer

    x = np.random.default_rng(0).standard_normal((1000, 32)).astype(np.float32)
    np.testing.assert_allclose(Scorer(mlp_package, device="cuda").predict(x), cpu_scores(mlp_package, x), atol=1e-4)


def test_runner_with_cuda_graphs_answers_every_bucket(mlp_package):
    from vivace.engine.runtime import STATUS_OK, ModelRunner

    package = load_package(mlp_package)
    runner = ModelRunner(package, device="cuda")
    assert runner.execution == "threads"
    rng = np.random.default_rng(1)

    async def main():
        runner.attach(asyncio.get_running_loop())
        sizes = [1, 2, 3, 7, 64, 100, 128, 300]
        inputs = [rng.standard_normal((n, 32)).astype(np.float32) for n in sizes]
        results = await asyncio.gather(*(runner.infer([x], len(x)) for x in inputs))
        for x, (status, payload) in zip(inputs, results):
            assert status == STATUS_OK
            out = np.frombuffer(payload, np.float32).reshape(len(x), 1)
            np.testing.assert_allclose(out, cpu_scores(package, x), atol=1e-4)

    asyncio.run(main())
    runner.close()
