"""`vivace bench trees`: a tree ensemble served as Vivace packages it (scikit-learn →
skl2onnx → onnxruntime) against the other ways to run it, in process, same run.

A RandomForestClassifier (100 trees, depth 10, 32 features) is fitted on synthetic data
and run at batch 1 and batch 4096, single-threaded, by: Vivace's `Scorer` on the package
`vivace package` writes (onnxruntime underneath), onnxruntime called directly on the same
graph, scikit-learn's own predict_proba, and Treelite: the model compiled to native code
by TL2cgen, and Treelite's interpreter (GTIL). Printed: microseconds per call (best of
`--repeat` interleaved rounds) and each peer's time over Vivace's.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

BATCHES = (1, 4096)


def _time(fn: Callable[[], object], seconds: float) -> float:
    """Microseconds per call: calls repeated for about `seconds` after one warm-up call."""
    fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return elapsed / calls * 1e6


def runners(tmp: Path, treelite: bool) -> dict[int, dict[str, Callable[[], object]]]:
    import numpy as np
    from sklearn.datasets import make_classification
    from sklearn.ensemble import RandomForestClassifier

    from vivace.engine import Scorer
    from vivace.registry.packaging import package_sklearn_model

    X, y = make_classification(8192, 32, n_informative=12, random_state=0)
    X = X.astype(np.float32)
    forest = RandomForestClassifier(100, max_depth=10, random_state=0, n_jobs=1).fit(X, y)
    package = package_sklearn_model(forest, tmp / "forest", name="forest", example=X[:512])
    scorer = Scorer(package)
    session = scorer.backend.session
    out: dict[int, dict[str, Callable[[], object]]] = {}
    predictor = None
    if treelite:
        import tl2cgen
        import treelite as tl

        model = tl.sklearn.import_model(forest)
        tl2cgen.export_lib(model, toolchain="gcc", libpath=str(tmp / "forest.so"), params={"parallel_comp": 8},
                           nthread=os.cpu_count() or 1)
        predictor = tl2cgen.Predictor(str(tmp / "forest.so"), nthread=1)
    for batch in BATCHES:
        rows = np.ascontiguousarray(X[:batch])
        expected = forest.predict_proba(rows)
        if not np.allclose(scorer.predict(rows)["probabilities"], expected, atol=1e-5):
            raise RuntimeError("Vivace's answers differ from scikit-learn's: not measuring")
        out[batch] = {
            "vivace Scorer": lambda rows=rows: scorer.predict(rows),
            "onnxruntime": lambda rows=rows: session.run(None, {"input__0": rows}),
            "scikit-learn": lambda rows=rows: forest.predict_proba(rows),
        }
        if predictor is not None:
            import tl2cgen
            import treelite as tl

            compiled = predictor.predict(tl2cgen.DMatrix(rows)).reshape(batch, -1)[:, -1]
            if not np.allclose(compiled, expected[:, 1], atol=1e-5):
                raise RuntimeError("TL2cgen's answers differ from scikit-learn's: not measuring")
            out[batch]["treelite compiled (TL2cgen)"] = lambda rows=rows: predictor.predict(tl2cgen.DMatrix(rows))
            out[batch]["treelite GTIL"] = lambda rows=rows, model=model: tl.gtil.predict(model, rows, nthread=1)
    return out


def register(subparsers) -> None:
    parser = subparsers.add_parser("trees", help="a random forest: Vivace's ONNX path vs onnxruntime, "
                                   "scikit-learn and Treelite, in process")
    parser.add_argument("--seconds", type=float, default=0.5, help="time per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (the best is kept)")
    parser.add_argument("--no-treelite", action="store_true", help="measure without the Treelite peers")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    try:
        import onnxruntime  # noqa: F401
        import skl2onnx  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as exc:
        print(f"vivace bench trees: needs {exc.name} (pip install 'vivace[sklearn]')", file=sys.stderr)
        return 1
    if not args.no_treelite:
        try:
            import tl2cgen  # noqa: F401
            import treelite  # noqa: F401
        except ImportError as exc:  # a missing peer fails loudly
            print(f"vivace bench trees: the Treelite peers need {exc.name} (pip install treelite tl2cgen, and gcc), "
                  "or --no-treelite", file=sys.stderr)
            return 1
    from .drift import cpu_description

    print(f"vivace bench trees: RandomForestClassifier 100 trees depth 10, 32 features, 1 thread; {cpu_description()}")
    with tempfile.TemporaryDirectory(prefix="vivace-bench-trees-") as tmp:
        table = runners(Path(tmp), not args.no_treelite)
        best: dict[tuple[int, str], float] = {}
        for _ in range(args.repeat):
            for batch, fns in table.items():
                for name, fn in fns.items():
                    us = _time(fn, args.seconds)
                    best[batch, name] = min(best.get((batch, name), us), us)
    for batch, fns in table.items():
        mine = best[batch, "vivace Scorer"]
        for name in fns:
            us = best[batch, name]
            ratio = "" if name == "vivace Scorer" else f"  {us / mine:6.2f}x Vivace's time"
            print(f"  batch {batch:5d}  {name:28s} {us:12.1f} us/call  {us / batch:9.3f} us/row{ratio}")
    return 0
