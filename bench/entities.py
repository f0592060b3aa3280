"""`vivace bench entities`: serving by entity id vs the same model called with raw features.

One server (pinned to a core) serves the reference MLP twice: `mlp` takes the 32 raw
features in the request; `mlp_by_id` takes only a customer id and reads the 32 features
from the LMDB online store inside the batch path. wrk (pinned to the other core) drives
each with one row per request over random ids; the ratio of req/s is the cost of the
lookup (issue 4's target: entity-id throughput >= 80% of raw features).
"""
from __future__ import annotations

import sys
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

from .http import _start, _stop, add_load_options, pinned_cpus, print_result, run_wrk

ENTITIES = 100_000
FEATURES = 32

ID_SCRIPT = """-- wrk: one entity-id infer request per call, random ids
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local id = math.random(1, %d)
  return wrk.format(nil, nil, nil,
    '{"inputs":[{"name":"customer_id","shape":[1,1],"datatype":"INT64","data":[' .. id .. ']}]}')
end
"""


def customer_store(root: Path, values) -> Path:
    """A materialized feature store under root/home: customers 1..N (INT64 `customer_id`),
    float32 features f0..f{F-1} from `values` [N, F], fresh (a minute old, TTL one day),
    served through the feature service "scoring". Returns the home."""
    import numpy as np
    import pandas as pd

    from vivace.features import Entity, FeatureService, FeatureStore, FeatureView, Field

    rows, width = values.shape
    frame = pd.DataFrame({"customer_id": np.arange(1, rows + 1, dtype=np.int64),
                          "event_timestamp": pd.Timestamp(datetime.now(timezone.utc)) - pd.Timedelta(minutes=1)})
    for j in range(width):
        frame[f"f{j}"] = values[:, j]
    frame.to_parquet(root / "customers.parquet")
    home = root / "home"
    store = FeatureStore(home)
    store.apply([
        Entity("customer", "customer_id"),
        FeatureView("customers", "customer", str(root / "customers.parquet"),
                    tuple(Field(f"f{j}", "float32") for j in range(width)), ttl=timedelta(days=1)),
        FeatureService("scoring", tuple(f"customers:f{j}" for j in range(width))),
    ])
    store.materialize(end=datetime.now(timezone.utc) + timedelta(minutes=1))
    return home


def build(root: Path) -> tuple[Path, Path, Path]:
    """A feature store with ENTITIES customers x FEATURES features, and the two packages."""
    import numpy as np

    from vivace.registry.package import load_package, write_package

    from vivace.registry.reference_model import write_reference_model

    raw = write_reference_model(root / "mlp")
    values = np.random.default_rng(0).standard_normal((ENTITIES, FEATURES)).astype(np.float32)
    home = customer_store(root, values)
    manifest = load_package(raw.path).manifest()
    manifest.update(name="mlp_by_id", metadata={"feature_service": "scoring", "unknown_entity": "default"})
    by_id = root / "mlp_by_id"
    write_package(by_id, manifest, {"model.pt": (raw.path / "model.pt").read_bytes()})
    return home, raw.path, by_id


def register(subparsers) -> None:
    parser = subparsers.add_parser("entities", help="serving by entity id vs raw features, same model and run")
    add_load_options(parser, duration=8.0)
    parser.set_defaults(func=_run)


def _run(args) -> int:
    server_cpu, client_cpu = pinned_cpus(args)
    with tempfile.TemporaryDirectory(prefix="vivace-bench-entities-") as tmp:
        root = Path(tmp)
        home, raw, by_id = build(root)
        script = root / "ids.lua"
        script.write_text(ID_SCRIPT % ENTITIES)
        port = 18100
        cmd = [sys.executable, "-m", "vivace.cli", "--home", str(home), "serve", str(raw), str(by_id),
               "--port", str(port), "--log-level", "WARNING"]
        proc = _start(cmd, server_cpu, port)
        try:
            run_wrk(port, 16, 1.0, client_cpu, proc.pid, "warm-up")
            print(f"{ENTITIES} entities x {FEATURES} features; server cpu {server_cpu}, client cpu {client_cpu}")
            for c in (int(x) for x in args.concurrency.split(",")):
                raw_result = run_wrk(port, c, args.duration, client_cpu, proc.pid, "raw features")
                id_result = run_wrk(port, c, args.duration, client_cpu, proc.pid, "entity id",
                                    path="/v2/models/mlp_by_id/infer", lua=script)
                for r in (raw_result, id_result):
                    print_result(r)
                print(f"  c={c}: entity-id throughput = {id_result.requests_per_s / raw_result.requests_per_s:.0%} "
                      "of raw features")
        finally:
            _stop(proc)
    return 0

