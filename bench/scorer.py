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


def native_overhead(batches: list[int], reps: int, calls: int, threads: int) -> tuple[str, list[dict]]:
    """Scorer.predict on an int8 native package vs its bare kernel call, interleaved.

    Each repetition times `calls` calls of each in turn; best-of and spread (max/min) over
    `reps` repetitions, so that a busy shared machine shows as spread, not as a bias.
    """
    import numpy as np

    from vivace.engine import Scorer
    from vivace.engine.native.convert import quantize_package

    from .model import write_reference_model

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        calibration = np.random.default_rng(3).standard_normal((1024, 32)).astype(np.float32)
        out = Path(tmp) / "mlp-int8"
        quantize_package(write_reference_model(Path(tmp) / "mlp"), out, calibration, precision="int8")
        scorer = Scorer(out, num_threads=threads)
        forward = scorer.backend.model.forward
        for batch in batches:
            x = np.random.default_rng(0).standard_normal((batch, 32)).astype(np.float32)
            np.testing.assert_array_equal(scorer.predict(x), forward(x))
            times: dict[str, list[float]] = {"kernel": [], "scorer": []}
            for _ in range(reps):
                for name, fn in (("kernel", forward), ("scorer", scorer.predict)):
                    start = time.perf_counter()
                    for _ in range(calls):
                        fn(x)
                    times[name].append((time.perf_counter() - start) / calls * 1e6)
            best = {k: min(v) for k, v in times.items()}
            spread = {k: max(v) / min(v) for k, v in times.items()}
            results.append({"batch": batch, **{f"{k}_us": v for k, v in best.items()},
                            **{f"{k}_spread": v for k, v in spread.items()}})
        return scorer.backend.level, results


def register(subparsers) -> None:
    parser = subparsers.add_parser("scorer", help="offline Scorer vs the torch module called directly")
    parser.add_argument("--batches", default="1,32,4096")
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum timing per point")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--native", action="store_true",
                        help="Scorer.predict on an int8 native package vs its bare kernel (overhead)")
    parser.add_argument("--reps", type=int, default=21, help="interleaved repetitions (--native)")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    batches = [int(b) for b in args.batches.split(",")]
    if args.native:
        level, rows = native_overhead(batches, args.reps, max(1, int(args.seconds * 2000)), args.threads)
        print(f"native int8, kernel level {level}, {args.threads} thread(s), best of {args.reps} interleaved reps")
        print(f"{'batch':>6} {'bare kernel':>14} {'Scorer.predict':>15} {'overhead':>10} {'spread k/s':>11}")
        for r in rows:
            print(f"{r['batch']:6d} {r['kernel_us']:11.2f} us {r['scorer_us']:12.2f} us "
                  f"{r['scorer_us'] - r['kernel_us']:7.2f} us {r['kernel_spread']:5.2f}/{r['scorer_spread']:.2f}")
        return 0
    print(f"{'batch':>6} {'torch eager':>14} {'vivace Scorer':>14} {'rows/s (Scorer)':>16} {'speed-up':>9}")
    for r in benchmark(batches, args.seconds, args.threads):
        print(f"{r['batch']:6d} {r['torch_us']:11.1f} us {r['scorer_us']:11.1f} us "
              f"{r['batch'] / r['scorer_us'] * 1e6:16,.0f} {r['ratio']:8.2f}x")
    return 0
