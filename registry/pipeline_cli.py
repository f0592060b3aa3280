"""`vivace pipeline run|status|ci|runs|show`: pipelines as code (registry/pipeline.py).

Exit status of `run`: 0 when every step ran or was cached, 1 when a step failed (or the
file is invalid: nothing runs then), 3 when a gated promotion waits for an approval.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

WAITING = 3


def _common(p: argparse.ArgumentParser, what: str = "") -> None:
    p.add_argument("file", nargs="?", metavar="PIPELINE.yaml", help="the pipeline file")
    p.add_argument("--demo", action="store_true", help="the bundled churn pipeline (registry/data/churn-pipeline.yaml)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a declared parameter, typed as declared (e.g. -p train.epochs=3; repeat)")
    p.add_argument("--workdir", help="folder relative paths resolve against (default: the file's workdir, or "
                   "its folder)")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "pipeline", help="pipelines as code: validate, train, evaluate, test, register, promote (cached, gated)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="pipeline_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("run", help="run the steps whose inputs, parameters or code changed; skip the rest",
                       epilog="examples:\n  vivace pipeline run pipeline.yaml -p train.epochs=3\n"
                       "  vivace pipeline run --demo\n  vivace pipeline run pipeline.yaml --force train",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--force", action="append", default=[], metavar="STEP", help="run STEP even if cached (repeat)")
    p.add_argument("--until", metavar="STEP", help="run only STEP and the steps it depends on")
    p.set_defaults(func=_run)

    p = sub.add_parser("status", help="what `run` would run, and why")
    _common(p)
    p.add_argument("--force", action="append", default=[], metavar="STEP", help=argparse.SUPPRESS)
    p.add_argument("--until", metavar="STEP")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_status)

    p = sub.add_parser("ci", help="write a GitHub Actions or GitLab CI configuration mirroring the pipeline")
    _common(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--github", action="store_const", dest="system", const="github")
    which.add_argument("--gitlab", action="store_const", dest="system", const="gitlab")
    p.add_argument("--out", help="file to write (default: stdout)")
    p.add_argument("--install", default="pip install vivace", help="the command that installs Vivace in a CI job")
    p.add_argument("--python", default="3.11", help="Python version of the CI jobs")
    p.add_argument("--environment", default="production", help="deployment environment of the gated promote job")
    p.add_argument("--branch", default="main", help="branch that triggers the workflow (GitHub)")
    p.set_defaults(func=_ci)

    p = sub.add_parser("runs", help="pipeline runs recorded in the registry")
    p.add_argument("name", nargs="?", help="only this pipeline's runs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_runs)

    p = sub.add_parser("show", help="one run's lineage: each step's inputs, parameters, code version and outputs")
    p.add_argument("run", help="run id (a unique prefix is enough)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_show)


def _load(args: argparse.Namespace, home: Any) -> Any:
    from .pipeline import load_pipeline, pipeline_source

    return load_pipeline(pipeline_source(args.demo, args.file), home, args.param, args.workdir)


def _fail(args: argparse.Namespace, exc: Exception) -> int:
    print(f"vivace pipeline {args.pipeline_command}: error: {exc}", file=sys.stderr)
    return 1


def _run(args: argparse.Namespace) -> int:
    from .pipeline import Runner
    from .store import Home, RegistryError

    try:
        pipeline = _load(args, Path(args.home).absolute())  # checked before the home is opened
        with Home(args.home) as home:
            report = Runner(pipeline, home, log=lambda line: print(line, flush=True)).run(set(args.force), args.until)
    except RegistryError as exc:
        return _fail(args, exc)
    print(report.text())
    return 1 if report.failure else WAITING if report.waiting else 0


def _status(args: argparse.Namespace) -> int:
    from .pipeline import Runner
    from .store import Home, RegistryError

    try:
        pipeline = _load(args, Path(args.home).absolute())
        with Home(args.home) as home:
            decisions = Runner(pipeline, home).plan(set(args.force), args.until)
    except RegistryError as exc:
        return _fail(args, exc)
    if args.json:
        print(json.dumps([{"step": d.step, "type": pipeline.steps[d.step].type, "run": d.run, "reasons": d.reasons}
                          for d in decisions], indent=1))
        return 0
    rows = [["STEP", "TYPE", "STATE", "WHY"]]
    for d in decisions:
        state = "will run" if d.run else "up to date"
        record = d.record or {"details": {}, "run_id": "-"}
        why = "; ".join(d.reasons) if d.run else f"cached from run {record['details'].get('from_run', record['run_id'])}"
        rows.append([d.step, pipeline.steps[d.step].type, state, why])
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    todo = sum(d.run for d in decisions)
    print(f"\n{todo} of {len(decisions)} steps would run" if todo else f"\npipeline {pipeline.name} is up to date")
    return 0


def _ci(args: argparse.Namespace) -> int:
    from .pipeline_ci import render
    from .store import RegistryError

    try:
        pipeline = _load(args, Path(".vivace").absolute())
    except RegistryError as exc:
        return _fail(args, exc)
    source = "--demo" if args.demo else args.file
    text = render(pipeline, args.system, source, install=args.install, python=args.python,
                  environment=args.environment, branch=args.branch)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out} ({len(pipeline.steps)} jobs; commit it)")
    else:
        sys.stdout.write(text)
    return 0


def _when(ts: float | None) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _runs(args: argparse.Namespace) -> int:
    from .pipeline import list_pipeline_runs
    from .store import Home

    with Home(args.home) as home:
        runs = list_pipeline_runs(home, args.name)
    if args.json:
        print(json.dumps(runs, indent=1))
        return 0
    if not runs:
        print("no pipeline runs yet: vivace pipeline run PIPELINE.yaml")
        return 0
    for r in runs:
        params = " ".join(f"{k}={v}" for k, v in sorted(r["params"].items()))
        print(f"{r['id']}  {r['pipeline']:<16} {r['status']:<11} {_when(r['started_at'])}  {params}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from .pipeline import list_pipeline_runs, run_steps
    from .store import Home

    with Home(args.home) as home:
        steps = run_steps(home, args.run)
    if not steps:
        print(f"vivace pipeline show: error: no steps recorded for run {args.run!r}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(steps, indent=1))
        return 0
    run = next((r for r in list_pipeline_runs(args.home) if r["id"] == steps[0]["run_id"]), None)
    if run is not None:
        env = run["environment"]
        commit = env.get("git_commit", "no git commit") + (" (dirty)" if env.get("git_dirty") else "")
        print(f"run {run['id']} of pipeline {run['pipeline']}: {run['status']}, {_when(run['started_at'])}, "
              f"by {run['user']}, code {commit}")
    for s in steps:
        origin = f" (from run {s['details']['from_run']})" if s["status"] == "cached" else ""
        print(f"{s['step']} ({s['type']}): {s['status']}{origin}"
              + (f" — {s['error'].splitlines()[0]}" if s["error"] else ""))
        print(f"  code     {s['code'].get('sha256', '-')[:12]} (vivace {s['code'].get('vivace', '-')})")
        for name, digest in s["inputs"].items():
            print(f"  input    {name} {str(digest)[:80]}")
        for key, value in s["params"].items():
            print(f"  param    {key} = {value!r}")
        for key, value in s["outputs"].items():
            print(f"  output   {key} = {value}")
    return 0
