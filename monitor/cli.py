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
    report.set_defaults(func=_report)

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
    except (DriftInputError, ValueError) as exc:
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
