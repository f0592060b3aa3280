"""`vivace features ...`: apply, list, show, historical, materialize, get."""
from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from .errors import FeatureStoreError


def register(subparsers) -> None:
    parser = subparsers.add_parser("features", help="feature store: definitions, training sets, online store")
    sub = parser.add_subparsers(dest="features_command", metavar="ACTION")

    p = sub.add_parser("apply", help="register entities, feature views and services from a YAML file")
    p.add_argument("file", nargs="?", default="features.yaml", help="definition file (default: features.yaml)")
    p.set_defaults(func=_apply)

    p = sub.add_parser("list", help="list registered entities, feature views and feature services")
    p.set_defaults(func=_list)

    p = sub.add_parser("show", help="show one entity, feature view or feature service in full")
    p.add_argument("name")
    p.set_defaults(func=_show)

    p = sub.add_parser("historical", help="point-in-time correct training set for an entity file")
    p.add_argument("entity_file", help="parquet or CSV with the join key(s) and a timestamp column")
    p.add_argument("--features", nargs="+", required=True,
                   help="feature service name, or view:feature references (view:* for all)")
    p.add_argument("--out", required=True, help="output file (.parquet or .csv)")
    p.add_argument("--timestamp-column", default="event_timestamp")
    p.add_argument("--full-feature-names", action="store_true", help="name columns view__feature")
    p.set_defaults(func=_historical)

    p = sub.add_parser("materialize", help="write the latest feature values to the LMDB online store")
    p.add_argument("--start", type=_when, help="ISO time (naive = UTC); default: end - TTL")
    p.add_argument("--end", type=_when, help="ISO time (naive = UTC); default: now")
    p.add_argument("--incremental", action="store_true", help="start where the last materialization ended")
    p.add_argument("--rebuild", action="store_true", help="wipe the online store first (after a schema change)")
    p.add_argument("--views", nargs="+", help="only these feature views")
    p.set_defaults(func=_materialize)

    p = sub.add_parser(
        "get", help="read online features for entity ids",
        description="Read the latest materialized features of entity ids from the online store.",
        epilog="examples:\n  vivace features get --features customer_stats:age,customer_stats:spend 1 2 3\n"
        "  vivace features get 1 2 3 --features churn_service --now 2026-01-31T00:00:00",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", nargs="+", required=True, metavar="REF",
                   help="VIEW:FEATURE references (space- or comma-separated) or a feature service name")
    p.add_argument("entity_ids", nargs="*", type=int, metavar="ENTITY_ID")
    p.add_argument("--now", type=_when, default=None,
                   help="ISO date/time at which the views' TTLs are checked (default: the clock)")
    p.set_defaults(func=_get)

    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _when(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date/time: {text!r}") from None


def _store(args):
    from .store import FeatureStore

    return FeatureStore(args.home)


def _features_arg(values: list[str]) -> str | list[str]:
    refs = [r for v in values for r in v.split(",") if r]
    return refs[0] if len(refs) == 1 and ":" not in refs[0] else refs


def _run(fn) -> int:
    try:
        return fn() or 0
    except FeatureStoreError as exc:
        print(f"vivace features: error: {exc}", file=sys.stderr)
        return 1


def _apply(args) -> int:
    def go() -> int:
        for line in _store(args).apply(Path(args.file)):
            print(f"applied {line}")
        return 0
    return _run(go)


def _list(args) -> int:
    def go() -> int:
        store = _store(args)
        print("ENTITIES")
        for e in store.list_entities():
            print(f"  {e.name:<24} join key {e.join_key} ({e.dtype})")
        print("FEATURE VIEWS")
        for v in store.list_feature_views():
            print(f"  {v.name:<24} entity {v.entity}, {len(v.schema)} features, ttl {v.ttl}, source {v.source}")
        print("FEATURE SERVICES")
        for s in store.list_feature_services():
            print(f"  {s.name:<24} {', '.join(s.features)}")
        return 0
    return _run(go)


def _show(args) -> int:
    def go() -> int:
        store = _store(args)
        cat = store.catalog
        if args.name in cat.views:
            v = cat.views[args.name]
            ent = cat.entity(v.entity)
            print(f"feature view {v.name}: {v.description}".rstrip(": "))
            print(f"  entity     {v.entity} (join key {ent.join_key}, {ent.dtype})")
            print(f"  source     {v.source}")
            print(f"  timestamps event {v.timestamp_field}, created {v.created_timestamp_field or '-'}")
            print(f"  ttl        {v.ttl} ({'never expires' if not v.ttl_seconds else 'rows older are ignored'})")
            print(f"  tags       {v.tags or '-'}")
            for f in v.schema:
                online = "online" if f.dtype != "string" else "offline only"
                print(f"  feature {v.name}:{f.name:<20} {f.dtype:<8} {online:<13} "
                      f"transformation: none (column {f.name!r} of the source)  {f.description}".rstrip())
        elif args.name in cat.entities:
            e = cat.entities[args.name]
            print(f"entity {e.name}: join key {e.join_key} ({e.dtype}) {e.description}".rstrip())
            for v in cat.views.values():
                if v.entity == e.name:
                    print(f"  feature view {v.name}")
        elif args.name in cat.services:
            s = cat.services[args.name]
            print(f"feature service {s.name}: {s.description}".rstrip(": "))
            for view, feature in cat.resolve(s):
                print(f"  {view.name}:{feature:<20} {view.field(feature).dtype:<8} from {view.source}")
        else:
            raise FeatureStoreError(f"no entity, feature view or feature service named {args.name!r}")
        return 0
    return _run(go)


def _historical(args) -> int:
    def go() -> int:
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq

        src, out = Path(args.entity_file), Path(args.out)
        if not src.is_file():
            raise FeatureStoreError(f"entity file {src} not found")
        if src.suffix == ".csv":
            entity_df = pd.read_csv(src)
            if args.timestamp_column in entity_df:
                entity_df[args.timestamp_column] = pd.to_datetime(entity_df[args.timestamp_column], utc=True)
            table = None
        else:
            table = pq.read_table(src)
        result = _store(args).get_historical_features(
            table if table is not None else entity_df, _features_arg(args.features),
            timestamp_column=args.timestamp_column, full_feature_names=args.full_feature_names)
        if isinstance(result, pd.DataFrame):
            result = pa.Table.from_pandas(result, preserve_index=False)
        if out.suffix == ".csv":
            result.to_pandas().to_csv(out, index=False)
        else:
            pq.write_table(result, out)
        print(f"wrote {result.num_rows} rows to {out}")
        return 0
    return _run(go)


def _materialize(args) -> int:
    def go() -> int:
        results = _store(args).materialize(start=args.start, end=args.end, views=args.views,
                                           incremental=args.incremental, rebuild=args.rebuild)
        for r in results:
            note = r.skipped or f"{r.rows_written} rows written ({r.entities_in_window} entities in window)"
            print(f"{r.view}: {note}")
        return 0
    return _run(go)


def _get(args) -> int:
    def go() -> int:
        import numpy as np

        # `--features a:f 1 2 3`: argparse hands the ids to --features; they are ids.
        features, trailing = list(args.features), []
        while features and features[-1].lstrip("-").isdigit():
            trailing.insert(0, int(features.pop()))
        entity_ids = trailing + args.entity_ids
        if not features or not entity_ids:
            raise FeatureStoreError("give feature references (--features VIEW:FEATURE ...) and at least one "
                                    "entity id, e.g. vivace features get --features view:feature 1 2 3")
        refs = _features_arg(features)
        store = _store(args)
        values, found = store.get_online_features(refs, np.asarray(entity_ids, dtype=np.int64), now=args.now)
        names = [f"{v.name}:{f}" for v, f in store.catalog.resolve(refs)]
        print("entity_id\tfound\t" + "\t".join(names))
        for eid, row, ok in zip(entity_ids, values, found, strict=True):
            print(f"{eid}\t{bool(ok)}\t" + "\t".join(f"{x:g}" for x in row))
        return 0
    return _run(go)
