"""`vivace monitor ...`: offline drift reports and reference profiles."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("monitor", help="drift reports and reference profiles")
    sub = parser.add_subparsers(dest="monitor_command", metavar="MONITOR_COMMAND")

    report = sub.add_parser(
        "report", help="compare current data with reference data or a model's training profile",
        description="Drift report: PSI, Jensen-Shannon, KS and Wasserstein per feature, as one "
                    "self-contained HTML file (--out) and/or JSON (--json). DATA is a .parquet, "
                    ".csv or .npy file.")
    ref = report.add_mutually_exclusive_group(required=True)
    ref.add_argument("--reference", metavar="DATA", help="reference data file")
    ref.add_argument("--model", metavar="NAME@ALIAS", help="use this registered model's training profile")
    ref.add_argument("--profile", metavar="PATH", help="a profile.json (or a model package directory)")
    report.add_argument("--current", metavar="DATA", required=True, help="current data file")
    report.add_argument("--out", metavar="HTML", help="write the HTML report here")
    report.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help="write the JSON report to PATH (default: stdout)")
    report.add_argument("--categorical", default="", metavar="COLS",
                        help="comma-separated numeric columns to treat as categorical")
    report.add_argument("--bins", type=int, default=10, help="quantile bins for PSI/JS (default 10)")
    report.add_argument("--threshold", action="append", default=[], metavar="STAT=VALUE",
                        help="override a threshold: psi, js, wasserstein, ks, ks_pvalue, dataset_share")
    report.add_argument("--fail-on-drift", action="store_true", help="exit 3 when the dataset drifts")
    report.add_argument("--performance", metavar="JSON",
                        help="a server's GET /v2/models/NAME/performance answer: its production feature importance "
                        "and group metrics join the report (with --model: the training ones too)")
    report.set_defaults(func=_report)

    feedback = sub.add_parser(
        "feedback", help="labels (ground truth) for logged predictions: send them to a server, or join them offline",
        description="FILE holds labels, as JSON lines ({\"id\": REQUEST_ID, \"label\": 1, \"groups\": {...}}, "
                    "or {\"entity\": {KEY: VALUE}, \"time\": T, \"label\": ...}) or CSV (columns id, label, and "
                    "any others as group attributes). With --url they are POSTed to NAME's feedback route in chunks; "
                    "with --prediction-log they are joined to that log here and the quality per version is printed "
                    "as JSON (the server's GET .../performance document).")
    feedback.add_argument("file", metavar="FILE")
    feedback.add_argument("--model", required=True, metavar="NAME", help="the served model the labels are for")
    feedback.add_argument("--version", default=None, help="join only predictions of this version")
    where = feedback.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--prediction-log", metavar="PATH", help="the server's --prediction-log file (its rotated "
                       "and per-worker files are read too)")
    feedback.add_argument("--registry-model", metavar="NAME@ALIAS",
                          help="with --prediction-log: the registered model (task, columns, sensitive attributes)")
    feedback.add_argument("--token", default=os.environ.get("VIVACE_TOKEN"), help="bearer token for --url")
    feedback.add_argument("--chunk", type=int, default=1000, help="labels per request with --url")
    feedback.set_defaults(func=_feedback)

    profile = sub.add_parser("profile", help="write the reference profile (profile.json) of a data file")
    profile.add_argument("data", metavar="DATA")
    profile.add_argument("--out", required=True, metavar="PATH")
    profile.add_argument("--categorical", default="", metavar="COLS")
    profile.add_argument("--bins", type=int, default=10)
    profile.set_defaults(func=_profile)

    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _fail(message: str) -> int:
    print(f"vivace monitor: error: {message}", file=sys.stderr)
    return 1


def _report(args: argparse.Namespace) -> int:
    from .drift import (
        DriftInputError,
        DriftThresholds,
        drift_report,
        load_profile,
        load_table,
    )

    if not args.out and args.json is None:
        return _fail("nothing to write: give --out HTML and/or --json")
    try:
        thresholds = DriftThresholds.from_dict(_parse_thresholds(args.threshold))
        if args.model:
            reference: Any = load_profile(_model_package(args.home, args.model))
        elif args.profile:
            reference = load_profile(args.profile)
        else:
            reference = load_table(args.reference)
        current = load_table(args.current)
        categorical = [c for c in args.categorical.split(",") if c]
        report = drift_report(reference, current, thresholds=thresholds, categorical=categorical or None,
                              bins=args.bins)
        report.model = _model_insights(args.home if args.model else None, args.model, args.performance)
    except (DriftInputError, ValueError, OSError) as exc:
        return _fail(str(exc))
    if args.out:
        _write_atomic(Path(args.out), report.to_html())
    if args.json == "-":
        print(report.to_json())
    elif args.json:
        _write_atomic(Path(args.json), report.to_json())
    drifted = report.drifted_features
    print(f"{len(drifted)} of {len(report.features)} features drifted"
          + (f": {', '.join(drifted)}" if drifted else "")
          + ("; dataset drift" if report.dataset_drift else ""), file=sys.stderr)
    return 3 if args.fail_on_drift and report.dataset_drift else 0


def _model_insights(home: str | None, ref: str | None, performance: str | None) -> dict[str, Any] | None:
    """Training (the package's metadata) and production (a /performance answer) importance
    and group metrics, for the report."""
    import json

    training: dict[str, Any] = {}
    if ref:
        from vivace.registry.package import load_package

        training = load_package(_model_package(home, ref), verify=False).metadata
    production = json.loads(Path(performance).read_text()) if performance else {}
    if not training.get("importance") and not training.get("fairness") and not production:
        return None
    return {"importance": {"training": training.get("importance"), "production": production.get("importance")},
            "groups": {"training": training.get("fairness"), "production": production.get("groups")}}


def _feedback(args: argparse.Namespace) -> int:
    import json

    from .quality import FeedbackError, FeedbackItem, parse_feedback

    try:
        items = _read_labels(Path(args.file))
        parse_feedback(json.dumps({"labels": [{k: v for k, v in i.items() if v is not None} for i in items]}).encode(),
                       max_labels=len(items) or 1)
    except (OSError, ValueError, FeedbackError) as exc:
        return _fail(f"{args.file}: {exc}")
    if args.url:
        return _send_labels(args, items)
    from .quality import LogJoin, ModelInfo, QualityConfig, performance

    info = None
    if args.registry_model:
        from vivace.registry.models import get_version
        from vivace.registry.package import load_package

        try:
            version = get_version(args.home, args.registry_model)
            package = load_package(_model_package(args.home, args.registry_model), verify=False)
        except (LookupError, ValueError) as exc:
            return _fail(str(exc))
        info = ModelInfo.from_package(args.model, str(version.version), package)
    config = QualityConfig(min_labels=1, importance_interval=0)
    join = LogJoin(args.prediction_log, config=config, read_feedback=False,
                   models=lambda name, version: info if info is not None and version == info.version else None)
    join.refresh()
    decoded = [msgspec_item(FeedbackItem, i) for i in items]
    result = join.ingest(args.model, args.version, decoded)
    versions = [v for m, v in join.versions() if m == args.model]
    print(json.dumps({"feedback": result, "versions": [performance(join, args.model, v, config) for v in versions]},
                     indent=1))
    print(f"{result['joined']} labels joined, {result['duplicates']} duplicates, {result['unknown']} unknown ids, "
          f"{result['mismatched']} mismatched", file=sys.stderr)
    return 0


def msgspec_item(kind: Any, item: dict[str, Any]) -> Any:
    import msgspec

    return msgspec.convert({k: v for k, v in item.items() if v is not None}, kind)


def _read_labels(path: Path) -> list[dict[str, Any]]:
    """Label items of a JSON-lines or CSV file."""
    import json

    if path.suffix == ".csv":
        import csv

        items = []
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if "id" not in row or "label" not in row:
                    raise ValueError("a CSV of labels needs the columns id and label")
                groups = {k: v for k, v in row.items() if k not in ("id", "label", "row") and v not in ("", None)}
                items.append({"id": row["id"], "label": float(row["label"]),
                              "row": int(row["row"]) if row.get("row") else None, "groups": groups or None})
        return items
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"line {n}: {exc}") from None
            if not isinstance(item, dict):
                raise ValueError(f"line {n}: expected an object")
            items.append(item)
    return items


def _send_labels(args: argparse.Namespace, items: list[dict[str, Any]]) -> int:
    """POST the labels in chunks; a 503 (busy) is retried after its Retry-After."""
    import json
    import time
    import urllib.error
    import urllib.request

    route = f"/v2/models/{args.model}" + (f"/versions/{args.version}" if args.version else "") + "/feedback"
    totals: dict[str, int] = {}
    for start in range(0, len(items), max(1, args.chunk)):
        body = json.dumps({"labels": [{k: v for k, v in i.items() if v is not None}
                                      for i in items[start:start + args.chunk]]}).encode()
        headers = {"Content-Type": "application/json"}
        if args.token:
            headers["Authorization"] = f"Bearer {args.token}"
        for attempt in range(10):
            request = urllib.request.Request(args.url.rstrip("/") + route, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    answer = json.loads(response.read())
                break
            except urllib.error.HTTPError as exc:
                text = exc.read().decode(errors="replace")
                if exc.code == 503 and attempt < 9:
                    time.sleep(float(exc.headers.get("Retry-After") or 1))
                    continue
                return _fail(f"{route}: HTTP {exc.code}: {text}")
            except OSError as exc:
                return _fail(f"{args.url}: {exc}")
        for key in ("received", "joined", "duplicates", "unknown", "mismatched"):
            totals[key] = totals.get(key, 0) + int(answer.get(key, 0))
    print(json.dumps(totals))
    return 0


def _profile(args: argparse.Namespace) -> int:
    from .drift import DriftInputError, build_profile, load_table

    try:
        categorical = [c for c in args.categorical.split(",") if c]
        profile = build_profile(load_table(args.data), bins=args.bins, categorical=categorical or None)
    except DriftInputError as exc:
        return _fail(str(exc))
    from vivace.profile import dumps

    _write_atomic(Path(args.out), dumps(profile))
    return 0


def _parse_thresholds(items: list[str]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--threshold expects STAT=VALUE, got {item!r}")
        try:
            out[key.strip()] = None if value.strip().lower() in ("", "none", "off") else float(value)
        except ValueError:
            raise ValueError(f"--threshold {key}: {value!r} is not a number") from None
    return out


def _model_package(home: str, ref: str) -> Path:
    from vivace.registry.models import resolve

    try:
        return resolve(home, ref)
    except LookupError as exc:
        raise ValueError(str(exc)) from None


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a failed run leaves no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
