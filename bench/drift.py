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
  * evidently: Report([DataDriftPreset()]).run(reference, current) on pandas frames of the
              same data, in a separate interpreter given by --evidently-python (Evidently
              needs pandas<3, which the project's pins may not allow: install it into its
              own venv, e.g. `python -m venv /work/venvs/evidently && /work/venvs/evidently/
              bin/pip install "pandas<3" evidently`). Timed there, best of --repeat, after
              a warm-up run. Without that flag the bench fails unless --skip-evidently.
Then the online sketch: ns per row to count batches of 32 features (the reference MLP's
input width) into a DriftSketch from Python, per batch size, against the 500 ns/row
budget (0.5 us per row per 32 features). The CPU model and the kernels' ISA level are
printed first: figures are only comparable on the same CPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

N_NUMERIC, N_CATEGORICAL = 20, 2
SKETCH_BUDGET_NS = 500.0  # the online sketch's budget: 0.5 us per row of 32 features
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


_EVIDENTLY_SCRIPT = """
import json, sys, time
import numpy as np, pandas as pd
import evidently
from evidently import Report
from evidently.presets import DataDriftPreset
data = np.load(sys.argv[1])
names = json.loads(sys.argv[2])
r = pd.DataFrame({n: data["ref_" + n] for n in names})
c = pd.DataFrame({n: data["cur_" + n] for n in names})
Report([DataDriftPreset()]).run(r, c)  # warm-up: imports, first run
best = float("inf")
for _ in range(int(sys.argv[3])):
    t0 = time.perf_counter()
    Report([DataDriftPreset()]).run(r, c)
    best = min(best, time.perf_counter() - t0)
print(json.dumps({"seconds": best, "version": evidently.__version__, "pandas": pd.__version__}))
"""


def evidently_seconds(python: str, ref: dict[str, np.ndarray], cur: dict[str, np.ndarray],
                      repeat: int) -> dict[str, Any]:
    """Best wall time of Evidently's DataDriftPreset on the same data, run by `python`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data.npz")
        np.savez(path, **{f"ref_{k}": v for k, v in ref.items()}, **{f"cur_{k}": v for k, v in cur.items()})
        try:
            done = subprocess.run([python, "-c", _EVIDENTLY_SCRIPT, path, json.dumps(list(ref)), str(repeat)],
                                  capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SystemExit(f"vivace bench drift: cannot run Evidently with {python}: {exc}") from None
    if done.returncode != 0:
        raise SystemExit(f"vivace bench drift: Evidently failed under {python}:\n{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_description() -> str:
    """The CPU model (from /proc/cpuinfo) and the ISA level the native kernels use."""
    from vivace import _core

    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}; ISA level {_core.cpu_level()} (of {', '.join(_core.cpu_levels())}); {os.cpu_count()} CPUs"


def sketch_ns_per_row(batch_sizes: list[int], seconds: float = 0.5) -> dict[int, dict[str, float]]:
    """Per batch size: wall and process-CPU ns per row of DriftSketch.update (32 features,
    counts and per-bin sums), and of the numpy baseline (searchsorted + bincount per
    column, counts only) on the same batches."""
    from vivace.monitor.drift import build_profile
    from vivace.monitor.sketch import Window, input_sketch

    rng = np.random.default_rng(1)
    profile = build_profile(rng.normal(size=(20_000, 32)).astype(np.float32))
    sketch = input_sketch(profile, window=Window("time", 60.0, 6))
    edges = [np.asarray(profile["features"][f"f{j}"]["edges"], dtype=np.float32) for j in range(32)]

    def numpy_counts(batch: np.ndarray) -> None:
        for j in range(32):
            np.bincount(np.searchsorted(edges[j], batch[:, j], side="left"), minlength=len(edges[j]) + 1)

    def clock(update: Callable[[np.ndarray], None], batch: np.ndarray) -> tuple[float, float]:
        rows, c0, t0 = 0, time.process_time(), time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(max(1, 4096 // len(batch))):
                update(batch)
            rows += max(1, 4096 // len(batch)) * len(batch)
        return (time.perf_counter() - t0) / rows * 1e9, (time.process_time() - c0) / rows * 1e9

    out = {}
    for size in batch_sizes:
        batch = rng.normal(0.1, 1.0, size=(size, 32)).astype(np.float32)
        wall, cpu = clock(sketch.update, batch)
        numpy_wall, numpy_cpu = clock(numpy_counts, batch)
        out[size] = {"wall_ns": wall, "cpu_ns": cpu, "numpy_wall_ns": numpy_wall, "numpy_cpu_ns": numpy_cpu}
    return out


ACCURACY_FAMILIES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "lognormal s=1.25": lambda rng, n: rng.lognormal(3.0, 1.25, n),
    "lognormal s=1.5": lambda rng, n: rng.lognormal(3.0, 1.5, n),
    "student t(3)": lambda rng, n: rng.standard_t(3, n),
    "pareto(3)": lambda rng, n: rng.pareto(3.0, n) + 1.0,
    "normal": lambda rng, n: rng.normal(size=n),
    "uniform": lambda rng, n: rng.uniform(size=n),
    "exponential": lambda rng, n: rng.exponential(size=n),
}


def sketch_accuracy(windows: int) -> dict[str, dict[str, float]]:
    """Issue 21's recipe: a profile of 16,000 rows, `windows` sketch windows of 12,000
    fresh rows of the same distribution; share flagged, and the sketch's Wasserstein/std
    against scipy's exact one on the same rows; then 1-std shifts. Profiles with per-bin
    means ("profile") and without, as written before them ("old profile")."""
    from scipy.stats import wasserstein_distance

    from vivace.monitor.drift import build_profile
    from vivace.monitor.sketch import Window, input_sketch

    def window(profile: dict[str, Any], rows: np.ndarray) -> Any:
        sketch = input_sketch(profile, window=Window("rows", len(rows), 1))
        sketch.update(rows.reshape(-1, 1))
        return sketch.drift()[0]

    out = {}
    for name, gen in ACCURACY_FAMILIES.items():
        rng = np.random.default_rng(21)
        ref = gen(rng, 16_000)
        std = ref.std()
        new = build_profile({"x": ref})
        old = {**new, "features": {"x": {k: v for k, v in new["features"]["x"].items() if k != "means"}}}
        flagged = {"profile": 0, "old profile": 0}
        est, exact = [], []
        for _ in range(windows):
            cur = gen(rng, 12_000)
            for label, prof in (("profile", new), ("old profile", old)):
                f = window(prof, cur)
                flagged[label] += f.drifted
                if label == "profile":
                    est.append(f.stats["wasserstein"])
            exact.append(wasserstein_distance(ref, cur) / std)
        shifted = gen(rng, 12_000) + std
        true_shift = wasserstein_distance(ref, shifted) / std
        out[name] = {"flagged": flagged["profile"] / windows, "flagged_old_profile": flagged["old profile"] / windows,
                     "median": float(np.median(est)), "max": float(np.max(est)),
                     "exact_median": float(np.median(exact)), "exact_max": float(np.max(exact)),
                     "shift_1std": window(new, shifted).stats["wasserstein"] / true_shift,
                     "shift_1std_old_profile": window(old, shifted).stats["wasserstein"] / true_shift}
    return out


def register(subparsers) -> None:
    parser = subparsers.add_parser("drift", help="drift report computation vs numpy/scipy; sketch ns/row")
    parser.add_argument("--rows", type=int, default=100_000, help="rows in reference and in current")
    parser.add_argument("--repeat", type=int, default=5, help="best of this many runs (baseline: 1/2 as many)")
    parser.add_argument("--batch-sizes", default="1,64,4096", help="sketch batch sizes")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--accuracy", type=int, default=0, metavar="WINDOWS",
                        help="also run issue 21's false-alarm recipe over WINDOWS windows per distribution")
    peer = parser.add_mutually_exclusive_group()
    peer.add_argument("--evidently-python", metavar="PATH",
                      help="python of a venv with evidently and pandas<3 installed (the peer)")
    peer.add_argument("--skip-evidently", action="store_true", help="run without the Evidently peer")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from vivace.monitor.drift import drift_report

    if not args.evidently_python and not args.skip_evidently:
        print("vivace bench drift: the Evidently peer needs --evidently-python PATH "
              "(or --skip-evidently to run without it)", file=sys.stderr)
        return 2
    cpu = cpu_description()
    ref, cur = make_data(args.rows)
    drift_report(ref, cur)  # warm-up: imports, first-touch of buffers
    vivace_s, vivace_cpu, report = _best(lambda: drift_report(ref, cur), args.repeat)
    html_s, _, page = _best(report.to_html, args.repeat)
    baseline_s, baseline_cpu, base = _best(lambda: baseline_report(ref, cur), max(1, args.repeat // 2))
    evidently = evidently_seconds(args.evidently_python, ref, cur, args.repeat) if args.evidently_python else None
    evidently_s = evidently["seconds"] if evidently else None
    sketch = sketch_ns_per_row([int(s) for s in args.batch_sizes.split(",")])
    accuracy = sketch_accuracy(args.accuracy) if args.accuracy else None
    agree = all(abs(report.feature(n).stats["ks"] - base[n]["ks"]) < 1e-12 for n in base if "ks" in base[n])
    figures = {
        "cpu": cpu, "rows": args.rows, "columns": f"{N_NUMERIC} numeric + {N_CATEGORICAL} categorical",
        "vivace_report_s": vivace_s, "vivace_report_cpu_s": vivace_cpu,
        "html_render_s": html_s, "html_bytes": len(page),
        "baseline_numpy_scipy_s": baseline_s, "baseline_numpy_scipy_cpu_s": baseline_cpu,
        "speedup_vs_baseline": baseline_s / vivace_s, "cpu_ratio_vs_baseline": baseline_cpu / vivace_cpu,
        "evidently_s": evidently_s, "evidently_version": evidently["version"] if evidently else None,
        "speedup_vs_evidently": evidently_s / vivace_s if evidently_s else None,
        "ks_statistics_identical": agree, "drifted": report.drifted_features,
        "sketch_ns_per_row_32_features": sketch,
        "sketch_accuracy": accuracy,
        "sketch_budget_ratio_cpu": {size: SKETCH_BUDGET_NS / v["cpu_ns"] for size, v in sketch.items()},
    }
    if args.json:
        print(json.dumps(figures, indent=1))
        return 0
    print(f"CPU: {cpu}")
    print(f"drift report, {args.rows:,} rows x ({figures['columns']}), best of {args.repeat}")
    print(f"  vivace drift_report         {vivace_s * 1e3:8.1f} ms wall {vivace_cpu * 1e3:8.1f} ms CPU"
          f"   (drifted: {', '.join(report.drifted_features)})")
    print(f"  numpy/scipy PSI+KS+JS       {baseline_s * 1e3:8.1f} ms wall {baseline_cpu * 1e3:8.1f} ms CPU"
          f"   ratio {baseline_s / vivace_s:5.1f}x wall, {baseline_cpu / vivace_cpu:5.1f}x CPU"
          f" (KS statistics identical: {agree})")
    if evidently:
        print(f"  evidently {evidently['version']:8s} preset {evidently_s * 1e3:8.1f} ms wall"
              f"                 ratio {evidently_s / vivace_s:5.1f}x wall (pandas {evidently['pandas']})")
    else:
        print("  evidently                   skipped (--skip-evidently)")
    print(f"  HTML rendering (separate)   {html_s * 1e3:8.1f} ms   {len(page):,} bytes")
    print("online sketch, 32 features (counts + per-bin sums), DriftSketch.update from Python:")
    for size, v in sketch.items():
        print(f"  batch {size:5d}: {v['wall_ns']:8.1f} ns/row wall {v['cpu_ns']:8.1f} ns/row CPU"
              f"   numpy searchsorted+bincount {v['numpy_cpu_ns']:8.1f} ns/row CPU"
              f" ({v['numpy_cpu_ns'] / v['cpu_ns']:5.1f}x)"
              f"   {'within' if v['cpu_ns'] <= SKETCH_BUDGET_NS else 'over'} the {SKETCH_BUDGET_NS:.0f} ns/row budget"
              f" ({SKETCH_BUDGET_NS / v['cpu_ns']:.1f}x)")
    if accuracy:
        print(f"sketch on unchanged data, {args.accuracy} windows of 12,000 rows vs a 16,000-row profile"
              " (Wasserstein/std: sketch vs exact on the same rows; 1-std shift: sketch / exact):")
        for name, a in accuracy.items():
            print(f"  {name:17s} flagged {a['flagged']:6.1%} (old profile {a['flagged_old_profile']:6.1%})"
                  f"   W median {a['median']:.4f} max {a['max']:.4f}, exact median {a['exact_median']:.4f}"
                  f" max {a['exact_max']:.4f}   1-std shift {a['shift_1std']:.3f}"
                  f" (old profile {a['shift_1std_old_profile']:.3f})")
    return 0
