"""`vivace bench ray`: offline scoring on a local two-node Ray cluster, 1 actor against 2,
and `vivace score`'s in-process Scorer on one core as the baseline, in the same run.

The reference MLP (TorchScript) scores `--rows` rows of 32 features read from a parquet
folder; each node of the cluster offers two logical CPUs (one for reading, one for an actor)
on this 2-core machine. Printed: the CPU and ISA, rows/s of each,
and the scaling ratio of 2 actors over 1 (ideal 2.0 on two idle cores; the machine's
other load and Ray's scheduling take their share). Outputs are checked identical first.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("ray", help="offline scoring on a local 2-node Ray cluster: 1 vs 2 actors")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows to score (default 1,000,000)")
    parser.add_argument("--batch-size", type=int, default=16384)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, alternating; the best is kept")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    try:
        import ray
        from ray.cluster_utils import Cluster
    except ImportError:  # the subject is missing: say so, never measure less
        print("vivace bench ray: needs Ray (pip install 'vivace[ray]')", file=sys.stderr)
        return 1
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vivace.engine import Scorer
    from vivace.engine.distributed import score_dataset
    from vivace.registry.reference_model import write_reference_model

    from .drift import cpu_description

    print(f"vivace bench ray: {args.rows:,} rows x 32 features, batch {args.batch_size}; {cpu_description()}")
    with tempfile.TemporaryDirectory(prefix="vivace-bench-ray-") as tmp:
        package = Path(tmp) / "mlp"
        write_reference_model(package)
        folder = Path(tmp) / "rows"
        folder.mkdir()
        values = np.random.default_rng(0).standard_normal((args.rows, 32)).astype(np.float32)
        parts = 8
        for k, chunk in enumerate(np.array_split(values, parts)):
            pq.write_table(pa.table({f"f{j}": chunk[:, j] for j in range(32)}), folder / f"part-{k}.parquet")
        nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 300 << 20,
                                                              "include_dashboard": False})
        nodes.add_node(num_cpus=2, object_store_memory=300 << 20)
        ray.init(address=nodes.address, logging_level="ERROR", log_to_driver=False)
        nodes.wait_for_nodes()
        try:
            scorer = Scorer(package, num_threads=1)

            def local() -> np.ndarray:
                table = pa.concat_tables(pq.read_table(p) for p in sorted(folder.glob("*.parquet")))
                x = np.column_stack([table.column(f"f{j}").to_numpy() for j in range(32)])
                return scorer.predict(x)

            def on_ray(actors: int) -> np.ndarray:
                dataset = ray.data.read_parquet(str(folder), file_extensions=["parquet"])
                scored = score_dataset(dataset, package, actors=actors, batch_size=args.batch_size, num_threads=1)
                return pa.concat_tables(ray.get(scored.to_arrow_refs())).column("output__0").to_numpy()

            expected = local().reshape(-1)
            if not np.array_equal(on_ray(2), expected):
                raise RuntimeError("Ray's output differs from the in-process Scorer's: not measuring")
            best = {"local Scorer (1 core)": float("inf"), "ray, 1 actor": float("inf"), "ray, 2 actors": float("inf")}
            runs = {"local Scorer (1 core)": local, "ray, 1 actor": lambda: on_ray(1), "ray, 2 actors": lambda: on_ray(2)}
            for _ in range(args.repeat):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run()
                    best[name] = min(best[name], time.perf_counter() - start)
        finally:
            ray.shutdown()
            nodes.shutdown()
    for name, seconds in best.items():
        print(f"  {name:22s} {args.rows / seconds:12,.0f} rows/s  ({seconds:.2f} s)")
    print(f"scaling 1 -> 2 actors: x{best['ray, 1 actor'] / best['ray, 2 actors']:.2f}; "
          f"2 actors / local Scorer: x{best['local Scorer (1 core)'] / best['ray, 2 actors']:.2f}")
    return 0
