"""`vivace bench quality`: the cost of ground truth (monitor/quality.py), off the request path.

Three numbers, on the churn demo model (`vivace demo`'s training, in a temporary home):
- the join: labels per second joined to a prediction log of `--requests` logged requests
  (tail both files, index, window), as the server's feedback route does it;
- the quality document (metrics, reliability bins, group metrics) over a full window;
- one production permutation-importance run: `--rows` sampled rows x F features x
  `--repeats`, scored in one call on a model copy of its own, one torch thread.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from .drift import cpu_description


def register(subparsers) -> None:
    parser = subparsers.add_parser("quality", help="cost of the label join, quality metrics and production importance")
    parser.add_argument("--requests", type=int, default=20_000, help="logged requests to join labels to")
    parser.add_argument("--rows", type=int, default=1000, help="rows per importance run (--importance-rows)")
    parser.add_argument("--repeats", type=int, default=3, help="permutations per feature")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    import numpy as np

    from vivace.engine import Scorer
    from vivace.monitor.predlog import PredictionLogger
    from vivace.monitor.quality import LogJoin, ModelInfo, QualityConfig, parse_feedback, performance
    from vivace.registry.demo_data import churn_frame, run_lifecycle
    from vivace.registry.models import resolve
    from vivace.registry.package import load_package
    from vivace.registry.train import encode

    print(f"machine: {cpu_description()}")
    with tempfile.TemporaryDirectory(prefix="vivace-bench-quality-") as tmp:
        root = Path(tmp)
        ref = run_lifecycle(root / "home", root / "work", log=lambda line: None)
        path = resolve(root / "home", ref)
        package = load_package(path)
        frame = churn_frame(rows=args.requests, seed=1)
        x = encode(frame, package.metadata["features"])
        scorer = Scorer(path, num_threads=1)
        p = np.asarray(scorer.predict(x)).reshape(-1)
        log = PredictionLogger(root / "pred.jsonl", max_bytes=1 << 30)
        for i in range(args.requests):
            log.append(f"r{i}", "churn", "1", 0.001,
                       [{"name": "input__0", "shape": [1, x.shape[1]], "datatype": "FP32", "data": x[i].tolist()}],
                       [{"name": "output__0", "shape": [1, 1], "datatype": "FP32", "data": [float(p[i])]}])
        log.close()
        info = ModelInfo.from_package("churn", "1", package,
                                      lambda a: np.asarray(scorer.predict(a.astype(np.float32))))
        config = QualityConfig(window=args.requests, max_predictions=args.requests)
        join = LogJoin(root / "pred.jsonl", root / "pred-feedback.jsonl", config, models=lambda m, v: info)
        started = time.perf_counter()
        join.refresh()
        index_s = time.perf_counter() - started
        labels = frame["churned"].tolist()
        items = parse_feedback(json.dumps({"labels": [{"id": f"r{i}", "label": labels[i]}
                                                      for i in range(args.requests)]}).encode(),
                               max_labels=args.requests)
        started = time.perf_counter()
        for start in range(0, len(items), 1000):  # the route's chunks: write, then join
            join.write("churn", None, items[start:start + 1000])
            join.refresh()
        join_s = time.perf_counter() - started
        started = time.perf_counter()
        doc = performance(join, "churn", "1", config)
        perf_s = time.perf_counter() - started
        from vivace.monitor.quality import QualityMonitor

        monitor = QualityMonitor(join, QualityConfig(importance_rows=args.rows, importance_repeats=args.repeats,
                                                     importance_min_labels=min(200, args.rows)))
        info.predict(x[:2])  # load the model copy first: its one-off cost is not per run
        started = time.perf_counter()
        result = monitor.compute_importance(info)
        importance_s = time.perf_counter() - started
        join.close()
    print(f"prediction log: {args.requests:,} requests indexed in {index_s:.2f} s "
          f"({args.requests / index_s:,.0f} records/s)")
    print(f"join: {args.requests:,} labels written and joined in {join_s:.2f} s ({args.requests / join_s:,.0f} labels/s)")
    print(f"quality document over {doc['labels']:,} labelled rows (metrics, reliability, groups): {perf_s * 1e3:.1f} ms")
    features = len(result["features"]) if result else 0
    print(f"production importance: {result['rows'] if result else 0} rows x {features} features x {args.repeats} "
          f"repeats ({result['method'] if result else 'n/a'} of {result['metric'] if result else 'n/a'}) in "
          f"{importance_s:.3f} s on one thread")
    return 0
