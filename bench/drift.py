"""`vivace bench drift`: drift report computation against a plain numpy/scipy baseline.

Data: 100,000 rows x (20 numeric + 2 categorical) columns for reference and current, five
numeric columns shifted (seeded). Timed in the same run, best of --repeat, as wall time
and as process CPU time (all threads; the steadier figure on a shared machine):
  * vivace:   vivace.monitor.drift_report(reference, current) - profile, PSI, JS, exact KS
              (+ p-value) and Wasserstein per column, plot histograms; HTML rendering
              (report.to_html) is timed on its own.
  * baseline: what one writes with numpy/scipy: per numeric column decile bins by
              numpy.quantile, numpy.histogram counts, PSI, scipy.spatial.distance.jensenshannon
              and scipy.stats.ks_2samp; np.unique counts + PSI/JS per categorical column.
  * evidently: DataDriftPreset, only when evidently is importable (never installed here).
Then the online sketch: ns per row to count batches of 32 features (the reference MLP's
input width) into a DriftSketch from Python, per batch size.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

N_NUMERIC, N_CATEGORICAL = 20, 2
SHIFTS = {3: 0.05, 7: 0.1, 11: 0.25, 15: 0.5, 19: 1.0}  # column -> mean shift in std


def make_data(rows: int, seed: int = 2026) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    labels = np.array(["alpha", "beta", "gamma", "delta", "epsilon", "zeta"])
    ref: dict[str, np.ndarray] = {}
    cur: dict[str, np.ndarray] = {}
    for j in range(N_NUMERIC):
        ref[f"x{j:02d}"] = rng.normal(size=rows)
        cur[f"x{j:02d}"] = rng.normal(SHIFTS.get(j, 0.0), 1.0, size=rows)
    for j in range(N_CATEGORICAL):
        ref[f"c{j}"] = rng.choice(labels, rows)
        p = [0.3, 0.3, 0.1, 0.1, 0.1, 0.1] if j == 1 else None
        cur[f"c{j}"] = rng.choice(labels, rows, p=p)
    return ref, cur


def baseline_report(ref: dict[str, np.ndarray], cur: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import ks_2samp

    def psi(r: np.ndarray, c: np.ndarray) -> float:
        r = np.clip(r / r.sum(), 1e-4, None)
        c = np.clip(c / c.sum(), 1e-4, None)
        return float(np.sum((c - r) * np.log(c / r)))

    out = {}
    for name, r in ref.items():
        c = cur[name]
        if r.dtype.kind == "f":
            edges = np.quantile(r, np.linspace(0, 1, 11))
            edges[0], edges[-1] = -np.inf, np.inf
            rc, _ = np.histogram(r, edges)
            cc, _ = np.histogram(c, edges)
            ks = ks_2samp(r, c)
            out[name] = {"psi": psi(rc, cc), "js": float(jensenshannon(rc, cc)),
                         "ks": float(ks.statistic), "ks_pvalue": float(ks.pvalue)}
        else:
            cats = np.union1d(np.unique(r), np.unique(c))
            rc = np.array([np.count_nonzero(r == k) for k in cats], dtype=float)
            cc = np.array([np.count_nonzero(c == k) for k in cats], dtype=float)
            out[name] = {"psi": psi(rc, cc), "js": float(jensenshannon(rc, cc))}
    return out


def _best(fn: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    """Best wall time, best process CPU time (all threads; steadier on a shared machine), result."""
    best, best_cpu, result = float("inf"), float("inf"), None
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return best, best_cpu, result


def _evidently(ref: dict[str, np.ndarray], cur: dict[str, np.ndarray]) -> float | None:
    try:
        import pandas as pd
        from evidently import Report
        from evidently.presets import DataDriftPreset
    except ImportError:  # not installed (or an incompatible version): skipped, as documented
        return None
    r, c = pd.DataFrame(ref), pd.DataFrame(cur)
    t0 = time.perf_counter()
    Report([DataDriftPreset()]).run(r, c)
    return time.perf_counter() - t0


def sketch_ns_per_row(batch_sizes: list[int], seconds: float = 0.5) -> dict[int, float]:
    from vivace.monitor.drift import build_profile
    from vivace.monitor.sketch import Window, input_sketch

    rng = np.random.default_rng(1)
    profile = build_profile(rng.normal(size=(20_000, 32)).astype(np.float32))
    sketch = input_sketch(profile, window=Window("time", 60.0, 6))
    out = {}
    for size in batch_sizes:
        batch = rng.normal(0.1, 1.0, size=(size, 32)).astype(np.float32)
        rows, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(max(1, 4096 // size)):
                sketch.update(batch)
            rows += max(1, 4096 // size) * size
        out[size] = (time.perf_counter() - t0) / rows * 1e9
    return out


def register(subparsers) -> None:
    parser = subparsers.add_parser("drift", help="drift report computation vs numpy/scipy; sketch ns/row")
    parser.add_argument("--rows", type=int, default=100_000, help="rows in reference and in current")
    parser.add_argument("--repeat", type=int, default=5, help="best of this many runs (baseline: 1/2 as many)")
    parser.add_argument("--batch-sizes", default="1,64,4096", help="sketch batch sizes")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from vivace.monitor.drift import drift_report

    ref, cur = make_data(args.rows)
    drift_report(ref, cur)  # warm-up: imports, first-touch of buffers
    vivace_s, vivace_cpu, report = _best(lambda: drift_report(ref, cur), args.repeat)
    html_s, _, page = _best(report.to_html, args.repeat)
    baseline_s, baseline_cpu, base = _best(lambda: baseline_report(ref, cur), max(1, args.repeat // 2))
    evidently_s = _evidently(ref, cur)
    sketch = sketch_ns_per_row([int(s) for s in args.batch_sizes.split(",")])
    agree = all(abs(report.feature(n).stats["ks"] - base[n]["ks"]) < 1e-12 for n in base if "ks" in base[n])
    figures = {
        "rows": args.rows, "columns": f"{N_NUMERIC} numeric + {N_CATEGORICAL} categorical",
        "vivace_report_s": vivace_s, "vivace_report_cpu_s": vivace_cpu,
        "html_render_s": html_s, "html_bytes": len(page),
        "baseline_numpy_scipy_s": baseline_s, "baseline_numpy_scipy_cpu_s": baseline_cpu,
        "speedup_vs_baseline": baseline_s / vivace_s, "cpu_ratio_vs_baseline": baseline_cpu / vivace_cpu,
        "evidently_s": evidently_s,
        "speedup_vs_evidently": evidently_s / vivace_s if evidently_s else None,
        "ks_statistics_identical": agree, "drifted": report.drifted_features,
        "sketch_ns_per_row_32_features": sketch,
    }
    if args.json:
        print(json.dumps(figures, indent=1))
        return 0
    print(f"drift report, {args.rows:,} rows x ({figures['columns']}), best of {args.repeat}")
    print(f"  vivace drift_report         {vivace_s * 1e3:8.1f} ms wall {vivace_cpu * 1e3:8.1f} ms CPU"
          f"   (drifted: {', '.join(report.drifted_features)})")
    print(f"  numpy/scipy PSI+KS+JS       {baseline_s * 1e3:8.1f} ms wall {baseline_cpu * 1e3:8.1f} ms CPU"
          f"   ratio {baseline_s / vivace_s:5.1f}x wall, {baseline_cpu / vivace_cpu:5.1f}x CPU"
          f" (KS statistics identical: {agree})")
    if evidently_s:
        print(f"  evidently DataDriftPreset   {evidently_s * 1e3:8.1f} ms   ratio {evidently_s / vivace_s:5.1f}x")
    else:
        print("  evidently                   not installed, skipped")
    print(f"  HTML rendering (separate)   {html_s * 1e3:8.1f} ms   {len(page):,} bytes")
    print("online sketch, 32 features, DriftSketch.update from Python:")
    for size, ns in sketch.items():
        print(f"  batch {size:5d}: {ns:8.1f} ns/row")
    return 0
