"""`vivace bench scorer`: offline Scorer vs calling the torch module directly, same run.

For batch sizes 1, 32 and 4096 on the reference MLP: the eager torch module under
torch.inference_mode (what a user would write), and vivace.engine.Scorer on the package
made from that module, both with numpy input and output. Prints µs per call, rows/s and
the ratio (>1 means the Scorer is faster).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path


def _time_per_call(fn, min_seconds: float) -> float:
    fn()  # warm up
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and calls >= 5:
            return elapsed / calls


def benchmark(batches: list[int], seconds: float, threads: int) -> list[dict]:
    import numpy as np
    import torch

    from vivace.engine import Scorer

    from vivace.registry.reference_model import reference_module, write_reference_model

    torch.set_num_threads(threads)
    module = reference_module()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scorer = Scorer(write_reference_model(Path(tmp) / "mlp"), num_threads=threads)
        for batch in batches:
            x = np.random.default_rng(0).standard_normal((batch, 32)).astype(np.float32)

            def direct():
                with torch.inference_mode():
                    return module(torch.from_numpy(x)).numpy()

            def vivace():
                return scorer.predict(x)

            np.testing.assert_allclose(direct(), vivace(), atol=1e-5)
            t_torch = _time_per_call(direct, seconds)
            t_vivace = _time_per_call(vivace, seconds)
            rows.append({"batch": batch, "torch_us": t_torch * 1e6, "scorer_us": t_vivace * 1e6,
                         "ratio": t_torch / t_vivace})
    return rows


def register(subparsers) -> None:
    parser = subparsers.add_parser("scorer", help="offline Scorer vs the torch module called directly")
    parser.add_argument("--batches", default="1,32,4096")
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum timing per point")
    parser.add_argument("--threads", type=int, default=1)
    parser.set_defaults(func=_run)


def _run(args) -> int:
    batches = [int(b) for b in args.batches.split(",")]
    print(f"{'batch':>6} {'torch eager':>14} {'vivace Scorer':>14} {'rows/s (Scorer)':>16} {'speed-up':>9}")
    for r in benchmark(batches, args.seconds, args.threads):
        print(f"{r['batch']:6d} {r['torch_us']:11.1f} us {r['scorer_us']:11.1f} us "
              f"{r['batch'] / r['scorer_us'] * 1e6:16,.0f} {r['ratio']:8.2f}x")
    return 0
