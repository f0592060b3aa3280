"""`vivace data|models|runs|train|audit`: the model lifecycle commands.

Heavy imports (pandas, torch) happen inside the handlers so that `vivace --help` and the
commands that do not need them stay fast.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
from typing import Any
from collections.abc import Callable

from .package import PackageError
from .store import Home, RegistryError


def _handler(func: Callable[[argparse.Namespace, Home], int | None]) -> Callable[[argparse.Namespace], int]:
    """Open the home, run the command, turn user errors into one line on stderr and exit 1."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            with Home(args.home) as home:
                return int(func(args, home) or 0)
        except (RegistryError, PackageError) as exc:
            print(f"vivace {args.command}: error: {exc}", file=sys.stderr)
            return 1

    return run


def _when(ts: float | None) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _key_values(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RegistryError(f"expected KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _metrics(args: argparse.Namespace) -> dict[str, float]:
    """--metrics FILE.json, then each --metric NAME=VALUE (which wins)."""
    metrics: dict[str, Any] = {}
    if args.metrics:
        try:
            with open(args.metrics, encoding="utf-8") as f:
                metrics = json.load(f)
        except (OSError, ValueError) as exc:
            raise RegistryError(f"cannot read metrics from {args.metrics}: {exc}") from None
        if not isinstance(metrics, dict):
            raise RegistryError(f"{args.metrics}: expected a JSON object of metric names to numbers")
    metrics.update(_key_values(args.metric or []))
    out = {}
    for name, value in metrics.items():
        try:
            out[str(name)] = float(value)
        except (TypeError, ValueError):
            raise RegistryError(f"metric {name!r}: {value!r} is not a number") from None
        if out[name] != out[name] or out[name] in (float("inf"), float("-inf")):
            raise RegistryError(f"metric {name!r} must be a finite number, got {value!r}")
    return out


def _json_or_text(value: str) -> Any:
    """A parameter value: JSON (numbers, booleans, lists) when it parses, else the text."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def _package(args: argparse.Namespace) -> int:
    from .packaging import package_onnx_model, package_python_model, package_sklearn_model, package_torch_model

    dynamic_batching: dict[str, Any] = {"max_queue_delay_microseconds": args.max_queue_delay_us}
    if args.preferred_batch_size:
        dynamic_batching["preferred_batch_size"] = args.preferred_batch_size
    common: dict[str, Any] = dict(
        name=args.name, version=args.version, inputs=args.input, outputs=args.output,
        max_batch_size=args.max_batch_size_given or 128, dynamic_batching=dynamic_batching,
        metadata={"description": args.description} if args.description else None,
        profile=args.profile, overwrite=args.force)
    if args.step:
        return _package_ensemble(args, dynamic_batching)
    if args.model is None:
        print("vivace package: error: give a MODEL file (or MODULE.py:CLASS), or --step NAME=PACKAGE for an "
              "ensemble", file=sys.stderr)
        return 1
    if args.map:
        print("vivace package: error: --map is for ensembles (--step)", file=sys.stderr)
        return 1
    model = str(args.model)
    platform = args.platform or ("onnxruntime" if model.endswith(".onnx") else
                                 "python" if model.endswith(".py") or ".py:" in model else
                                 "sklearn" if model.endswith((".pkl", ".pickle", ".joblib")) else None)
    if args.file and platform != "python":
        print("vivace package: error: --file is for Python models (MODULE.py:CLASS)", file=sys.stderr)
        return 1
    if args.example and platform != "sklearn":
        print("vivace package: error: --example is for scikit-learn estimators (.pkl, .joblib)", file=sys.stderr)
        return 1
    try:
        parameters = {k: _json_or_text(v) for k, v in _key_values(args.param or []).items()}
        if platform == "sklearn":
            if args.input or args.output:
                raise PackageError("a scikit-learn estimator's input and outputs are named by the conversion "
                                   "(input__0; label/probabilities or variable): drop --input/--output")
            del common["inputs"], common["outputs"]
            package = package_sklearn_model(_unpickle(args.model), args.out, parameters=parameters,
                                            example=_rows(args.example) if args.example else None, **common)
        elif platform == "onnxruntime":
            package = package_onnx_model(args.model, args.out, parameters=parameters, **common)
        elif platform == "python":
            package = package_python_model(args.model, args.out, parameters=parameters, files=args.file or (),
                                           **common)
        else:
            package = package_torch_model(args.model, args.out, platform=platform, parameters=parameters, **common)
    except (PackageError, RegistryError) as exc:
        print(f"vivace package: error: {exc}", file=sys.stderr)
        return 1
    signature = ", ".join(f"{s.name} {s.datatype} {list(s.shape)}" for s in package.inputs)
    print(f"wrote model package {package.name}/{package.version} ({package.platform}: {signature}) to {args.out}")
    return 0


def _unpickle(path: str) -> Any:
    """A fitted estimator saved with joblib.dump or pickle.dump (a pickle runs code when
    loaded: the user names their own file)."""
    import pickle

    try:
        try:
            import joblib
        except ImportError:
            with open(path, "rb") as f:
                return pickle.load(f)
        return joblib.load(path)
    except FileNotFoundError:
        raise PackageError(f"{path}: no such model file") from None
    except Exception as exc:  # unpickling raises whatever the pickled objects raise
        raise PackageError(f"{path}: cannot load the estimator ({type(exc).__name__}: {exc})") from None


def _rows(path: str) -> Any:
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise PackageError(f"{path}: cannot read example rows ({exc})") from None


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


# ---- data ----------------------------------------------------------------------------


@_handler
def _data_add(args: argparse.Namespace, home: Home) -> int:
    from .data import add_dataset

    version, created = add_dataset(home, args.name, args.path, args.schema)
    state = "created" if created else "unchanged (same content as an existing version)"
    print(f"{version.ref}  {state}  rows={version.row_count} size={version.size_bytes}B "
          f"sha256={version.content_hash[:12]}")
    return 0


@_handler
def _data_list(args: argparse.Namespace, home: Home) -> int:
    from .data import list_datasets

    versions = list_datasets(home, args.name)
    if not versions:
        print("no datasets yet: vivace data add NAME PATH")
        return 0
    rows = [["DATASET", "VERSION", "ROWS", "BYTES", "SHA256", "PARENT", "CREATED"]]
    rows += [[v.name, f"v{v.version}", str(v.row_count), str(v.size_bytes), v.content_hash[:12],
              f"v{v.parent}" if v.parent else "-", _when(v.created_at)] for v in versions]
    print(_table(rows))
    return 0


@_handler
def _data_show(args: argparse.Namespace, home: Home) -> int:
    from .data import get_dataset

    version = get_dataset(home, args.ref)
    if args.json:
        _print_json(version.to_json())
        return 0
    print(f"{version.ref}  sha256={version.content_hash}")
    print(f"source: {version.source}\nsize: {version.size_bytes} bytes, {version.row_count} rows, "
          f"created {_when(version.created_at)}, parent {f'v{version.parent}' if version.parent else '-'}")
    print(f"files: {', '.join(version.files)}")
    print(f"schema: {'declared' if version.schema else 'none declared'}")
    rows = [["COLUMN", "DTYPE", "NULLS", "SUMMARY"]]
    for col, s in version.stats.items():
        if "mean" in s:
            summary = f"min {s['min']:.4g} max {s['max']:.4g} mean {s['mean']:.4g} std {s['std']:.4g}"
        elif "distinct" in s:
            summary = f"{s['distinct']} distinct; top " + ", ".join(f"{k}={v}" for k, v in list(s["top"].items())[:3])
        else:
            summary = "-"
        rows.append([col, s["dtype"], str(s["nulls"]), summary])
    print(_table(rows))
    return 0


# ---- models --------------------------------------------------------------------------


@_handler
def _models_register(args: argparse.Namespace, home: Home) -> int:
    from .models import register_model
    from .runs import get_run

    package_dir = args.package
    if package_dir is None:
        if not args.run:
            raise RegistryError("give a PACKAGE directory, or --run RUN to register that run's package")
        run = get_run(home, args.run)
        if not run.package_sha:
            raise RegistryError(f"run {run.id} produced no package ({run.status})")
        package_dir = home.packages / run.package_sha
    mv = register_model(home, package_dir, args.name, run_id=args.run, description=args.description or "",
                        tags=_key_values(args.tag or []), metrics=_metrics(args))
    print(f"registered {mv.ref}  package sha256={mv.package_sha[:12]}" + (f"  run={mv.run_id}" if mv.run_id else ""))
    return 0


@_handler
def _models_alias(args: argparse.Namespace, home: Home) -> int:
    from .models import delete_alias, set_alias

    if args.delete:
        if args.version is not None:
            raise RegistryError("use either VERSION ALIAS or --delete ALIAS")
        version = delete_alias(home, args.name, args.delete, args.reason or "", force=args.force)
        print(f"deleted {args.name}@{args.delete} (was version {version})")
        return 0
    if args.version is None or args.alias is None or not args.version.isdigit():
        raise RegistryError("usage: vivace models alias NAME VERSION ALIAS  (or NAME --delete ALIAS)")
    previous = set_alias(home, args.name, int(args.version), args.alias, args.reason or "", force=args.force)
    moved = f" (was version {previous})" if previous is not None else ""
    print(f"{args.name}@{args.alias} -> version {args.version}{moved}")
    return 0


@_handler
def _models_list(args: argparse.Namespace, home: Home) -> int:
    from .models import list_models

    models = list_models(home)
    if args.json:
        _print_json(models)
        return 0
    if not models:
        print("no models yet: vivace models register PACKAGE --name NAME")
        return 0
    rows = [["MODEL", "VERSIONS", "LATEST", "ALIASES"]]
    rows += [[m["name"], str(m["versions"]), str(m["latest"]),
              ", ".join(f"@{a}->{v}" for a, v in m["aliases"].items()) or "-"] for m in models]
    print(_table(rows))
    return 0


@_handler
def _models_show(args: argparse.Namespace, home: Home) -> int:
    from .models import get_version, list_versions, parse_model_ref, resolve

    name, alias, version = parse_model_ref(args.ref)
    if alias is None and version is None and "@" not in args.ref:
        versions = list_versions(home, name)
        if args.json:
            _print_json([v.to_json() for v in versions])
            return 0
        rows = [["VERSION", "ALIASES", "RUN", "METRICS", "CREATED"]]
        rows += [[str(v.version), ", ".join("@" + a for a in v.aliases) or "-", v.run_id or "-",
                  " ".join(f"{k}={val:.4g}" for k, val in sorted(v.metrics.items())) or "-", _when(v.created_at)]
                 for v in versions]
        print(_table(rows))
        return 0
    mv = get_version(home, args.ref)
    if args.json:
        _print_json({**mv.to_json(), "path": str(resolve(home, mv.ref, verify=False))})
        return 0
    print(f"{mv.ref}" + (f"  ({', '.join('@' + a for a in mv.aliases)})" if mv.aliases else ""))
    print(f"package: {resolve(home, mv.ref, verify=False)}")
    print(f"created: {_when(mv.created_at)}  run: {mv.run_id or '-'}")
    if mv.description:
        print(f"description: {mv.description}")
    if mv.tags:
        print("tags: " + ", ".join(f"{k}={v}" for k, v in sorted(mv.tags.items())))
    if mv.metrics:
        print("metrics: " + ", ".join(f"{k}={v:.6g}" for k, v in sorted(mv.metrics.items())))
    for test in mv.behavioural:
        print(f"behavioural [{'pass' if test['passed'] else 'FAIL'}] {test['name']}: {test['detail']}")
    print("lineage: " + json.dumps(mv.lineage, sort_keys=True))
    return 0


@_handler
def _models_resolve(args: argparse.Namespace, home: Home) -> int:
    from .models import resolve

    print(resolve(home, args.ref))
    return 0


@_handler
def _models_tag(args: argparse.Namespace, home: Home) -> int:
    from .models import update_version

    mv = update_version(home, args.ref, tags=_key_values(args.tags), remove_tags=args.remove or [])
    print(f"{mv.ref} tags: " + (", ".join(f"{k}={v}" for k, v in sorted(mv.tags.items())) or "-"))
    return 0


@_handler
def _models_describe(args: argparse.Namespace, home: Home) -> int:
    from .models import update_version

    mv = update_version(home, args.ref, description=args.text)
    print(f"{mv.ref} description updated")
    return 0


def _gate_report(checks: list[tuple[str, bool, str]]) -> None:
    for check, ok, detail in checks:
        print(f"  [{'pass' if ok else 'FAIL'}] {check}: {detail}")


def _gate_refused(exc: Exception, what_stays: str) -> int:
    """A promotion the quality gate refused: its report, and how to override it."""
    print(str(exc), file=sys.stderr)
    print(f"{what_stays}; use --force --reason TEXT to override (recorded in the audit log)", file=sys.stderr)
    return 1


@_handler
def _models_promote(args: argparse.Namespace, home: Home) -> int:
    from .models import PromotionRefused, promote

    try:
        checks, previous = promote(home, args.name, args.version, args.alias, metric=args.metric,
                                   direction=args.direction, margin=args.margin, force=args.force,
                                   reason=args.reason or "", max_group_difference=args.max_group_difference)
    except PromotionRefused as exc:
        return _gate_refused(exc, "the alias stays")
    _gate_report(checks)
    overridden = " (gate overridden with --force)" if not all(ok for _, ok, _ in checks) else ""
    was = f", was version {previous}" if previous is not None else ""
    print(f"{args.name}@{args.alias} -> version {args.version}{was}{overridden}")
    return 0


@_handler
def _models_card(args: argparse.Namespace, home: Home) -> int:
    from .models import model_card

    card = model_card(home, args.ref)
    if args.output:
        with open(args.output, "w") as f:
            f.write(card)
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(card)
    return 0


# ---- runs, train, audit --------------------------------------------------------------


@_handler
def _runs_list(args: argparse.Namespace, home: Home) -> int:
    from .runs import list_runs

    runs = list_runs(home, args.name)
    if not runs:
        print("no runs yet: vivace train CONFIG.yaml")
        return 0
    rows = [["RUN", "NAME", "STATUS", "DATASET", "METRICS", "STARTED", "DURATION"]]
    rows += [[r.id, r.name, r.status, ",".join(r.datasets) or "-",
              " ".join(f"{k}={v:.4g}" for k, v in sorted(r.metrics.items())) or "-", _when(r.started_at),
              f"{r.duration_s:.1f}s" if r.duration_s else "-"] for r in runs]
    print(_table(rows))
    return 0


@_handler
def _runs_show(args: argparse.Namespace, home: Home) -> int:
    from .runs import get_run

    run = get_run(home, args.run)
    if args.json:
        _print_json(run.to_json())
        return 0
    print(f"run {run.id}  {run.name}  status={run.status}  started {_when(run.started_at)}"
          + (f"  {run.duration_s:.2f}s" if run.duration_s else ""))
    if run.error:
        print(f"error: {run.error}")
    print(f"datasets: {', '.join(run.datasets) or '-'}"
          + (f"; feature views: {', '.join(run.feature_views)}" if run.feature_views else ""))
    print("params: " + json.dumps(run.params, sort_keys=True))
    if run.metrics:
        print("metrics: " + ", ".join(f"{k}={v:.6g}" for k, v in sorted(run.metrics.items())))
    if run.epochs:
        keys = list(run.epochs[0])
        print(_table([keys] + [[f"{e[k]:.5g}" if isinstance(e[k], float) else str(e[k]) for k in keys]
                               for e in run.epochs]))
    for test in run.behavioural:
        print(f"behavioural [{'pass' if test['passed'] else 'FAIL'}] {test['name']}: {test['detail']}")
    env = run.environment
    packages = ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items())
    commit = env.get("git_commit")
    git = f", git {commit[:12]}{' (dirty)' if env.get('git_dirty') else ''}" if commit else ""
    print(f"environment: python {env.get('python')}, {packages}{git}")
    if run.weights_hash:
        print(f"weights sha256: {run.weights_hash}\npackage sha256: {run.package_sha}")
    return 0


@_handler
def _runs_compare(args: argparse.Namespace, home: Home) -> int:
    from .runs import compare_runs

    print(compare_runs(home, args.runs))
    return 0


@_handler
def _train(args: argparse.Namespace, home: Home) -> int:
    from .models import register_model
    from .train import train

    try:
        result = train(home, args.config, output=args.output)
    except RegistryError:
        raise
    except Exception as exc:  # recorded on the run already; report it as one line
        raise RegistryError(f"training failed: {type(exc).__name__}: {exc}") from None
    print(f"run {result.run_id} finished: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(result.metrics.items())))
    for test in result.behavioural:
        print(f"  behavioural [{'pass' if test['passed'] else 'FAIL'}] {test['name']}: {test['detail']}")
    print(f"weights sha256: {result.weights_hash}")
    print(f"package: {result.package_dir}")
    if args.register:
        mv = register_model(home, result.package_dir, args.register, run_id=result.run_id)
        print(f"registered {mv.ref}")
    return 0


@_handler
def _audit(args: argparse.Namespace, home: Home) -> int:
    records = home.audit_log(target=args.target, limit=args.limit)
    if args.json:
        _print_json(records)
        return 0
    if not records:
        print("audit log is empty")
        return 0
    rows = [["TIME", "USER", "ACTION", "TARGET", "REASON", "DETAILS"]]
    for r in records:
        d = r["details"]
        brief = " ".join(f"{k}={str(d[k])[:12]}" for k in ("alias", "previous", "metric", "package_sha256",
                                                             "content_hash") if d.get(k) is not None)
        rows.append([_when(r["time"]), r["user"], r["action"], r["target"], r["reason"] or "-", brief[:60] or "-"])
    print(_table(rows))
    return 0


def _print_rollout(rollout) -> None:
    canary = (f"canary version {rollout.canary} at {rollout.weight:g}%"
              + (f", sticky by {rollout.sticky}" if rollout.sticky else "")) if rollout.canary is not None else "no canary"
    shadow = (f"shadow version {rollout.shadow} on {rollout.shadow_sample:.0%} of requests"
              if rollout.shadow is not None else "no shadow")
    print(f"{rollout.ref}: stable version {rollout.stable}; {canary}; {shadow} (since {_when(rollout.started_at)})")
    if rollout.policy:
        print("  automatic: steps " + ",".join(f"{w:g}" for w in rollout.policy["steps"])
              + "; " + ", ".join(f"{k} {v}" for k, v in rollout.policy.items() if k != "steps"))


@_handler
def _rollout_start(args: argparse.Namespace, home: Home) -> int:
    from .rollouts import start_rollout

    policy: dict[str, Any] = {}
    if args.auto:
        try:
            policy["steps"] = [float(w) for w in args.auto.split(",")]
        except ValueError:
            raise RegistryError(f"--auto takes comma-separated weights such as 10,50,100, got {args.auto!r}") from None
        for key in ("min_requests", "step_seconds", "max_error_rate", "max_p99_ratio", "max_disagreement"):
            if getattr(args, key) is not None:
                policy[key] = getattr(args, key)
        if args.no_drift_check:
            policy["fail_on_drift"] = False
    _print_rollout(start_rollout(home, args.ref, canary=args.canary, weight=args.weight, sticky=args.sticky or "",
                                 shadow=args.shadow, shadow_sample=args.shadow_sample, reason=args.reason or "",
                                 policy=policy))
    return 0


@_handler
def _rollout_status(args: argparse.Namespace, home: Home) -> int:
    from .rollouts import get_rollout, list_rollouts

    rollouts = [r for r in [get_rollout(home, args.ref)] if r] if args.ref else list_rollouts(home)
    if args.json:
        print(json.dumps([r.to_json() for r in rollouts], indent=1))
        return 0
    for rollout in rollouts:
        _print_rollout(rollout)
    if not rollouts:
        print(f"no rollout on {args.ref}" if args.ref else "no rollouts")
    return 0


@_handler
def _rollout_promote(args: argparse.Namespace, home: Home) -> int:
    from .models import PromotionRefused
    from .rollouts import promote_rollout, step_rollout

    if args.weight is not None and args.weight < 100:
        _print_rollout(step_rollout(home, args.ref, args.weight, reason=args.reason or ""))
        return 0
    try:
        checks, previous = promote_rollout(home, args.ref, reason=args.reason or "", force=args.force,
                                           metric=args.metric)
    except PromotionRefused as exc:
        return _gate_refused(exc, "the rollout stays on")
    _gate_report(checks)
    print(f"{args.ref} promoted: the alias moved from version {previous}; the rollout is over")
    return 0


@_handler
def _rollout_abort(args: argparse.Namespace, home: Home) -> int:
    from .rollouts import abort_rollout

    rollout = abort_rollout(home, args.ref, reason=args.reason or "")
    print(f"{rollout.ref}: rollout aborted; every request goes to version {rollout.stable}")
    return 0


@_handler
def _models_protect(args: argparse.Namespace, home: Home) -> int:
    from .approvals import protect_alias

    protect_alias(home, args.name, args.alias, protected=not args.off, reason=args.reason or "")
    print(f"{args.name}@{args.alias} is {'no longer ' if args.off else ''}protected"
          + ("" if args.off else ": promotions need a request approved by another identity"))
    return 0


@_handler
def _models_request(args: argparse.Namespace, home: Home) -> int:
    from .approvals import request_promotion

    request = request_promotion(home, args.name, args.version, args.alias, reason=args.reason or "")
    print(f"promotion request {request.id}: {request.name}/{request.version} to @{request.alias}, by "
          f"{request.requester}; another identity approves it with: vivace models approve {request.id}")
    return 0


@_handler
def _models_requests(args: argparse.Namespace, home: Home) -> int:
    from .approvals import list_requests

    requests = list_requests(home, state=None if args.all else "pending")
    if args.json:
        print(json.dumps([r.to_json() for r in requests], indent=1))
        return 0
    if not requests:
        print("no pending promotion requests" if not args.all else "no promotion requests")
        return 0
    rows = [["id", "model", "alias", "requester", "state", "decider", "asked"]]
    rows += [[str(r.id), f"{r.name}/{r.version}", r.alias, r.requester, r.state, r.decider or "-",
              _when(r.created_at)] for r in requests]
    print(_table(rows))
    return 0


@_handler
def _models_approve(args: argparse.Namespace, home: Home) -> int:
    from .approvals import approve_promotion
    from .models import PromotionRefused

    try:
        checks, previous = approve_promotion(home, args.request, reason=args.reason or "", metric=args.metric,
                                             force=args.force)
    except PromotionRefused as exc:
        return _gate_refused(exc, "the request stays pending")
    _gate_report(checks)
    print(f"request {args.request} approved: the alias moved (was version {previous})")
    return 0


@_handler
def _models_reject(args: argparse.Namespace, home: Home) -> int:
    from .approvals import reject_promotion

    request = reject_promotion(home, args.request, reason=args.reason or "")
    print(f"request {request.id} rejected: {request.name}/{request.version} stays off @{request.alias}")
    return 0


def _package_ensemble(args: argparse.Namespace, dynamic_batching: dict[str, Any]) -> int:
    from .packaging import package_ensemble

    not_for_ensembles = [flag for flag, given in (("MODEL", args.model), ("--input", args.input), ("--file", args.file),
                                                  ("--example", args.example), ("--param", args.param),
                                                  ("--platform", args.platform)) if given]
    if not_for_ensembles:
        print(f"vivace package: error: {', '.join(not_for_ensembles)} cannot be given with --step: an ensemble's "
              f"inputs come from its steps' packages", file=sys.stderr)
        return 1
    try:
        steps = [(name, path) for name, _, path in (item.partition("=") for item in args.step)]
        if any(not name or not path for name, path in steps):
            raise RegistryError(f"--step takes NAME=PACKAGE, got {args.step}")
        package = package_ensemble(
            steps, args.out, name=args.name, version=args.version, tensor_map=_key_values(args.map or []),
            outputs=args.output, max_batch_size=args.max_batch_size_given, dynamic_batching=dynamic_batching,
            metadata={"description": args.description} if args.description else None,
            profile=args.profile, overwrite=args.force)
    except (PackageError, RegistryError) as exc:
        print(f"vivace package: error: {exc}", file=sys.stderr)
        return 1
    signature = ", ".join(f"{s.name} {s.datatype} {list(s.shape)}" for s in package.inputs)
    chain = " -> ".join(f"{step} ({package.metadata['steps'][k]['platform']})" for k, (step, _) in enumerate(steps))
    print(f"wrote ensemble {package.name}/{package.version} ({signature}): {chain}, to {args.out}")
    return 0


def register(subparsers: Any) -> None:
    """Add the lifecycle commands to the `vivace` parser."""
    p = subparsers.add_parser(
        "package", help="package your own TorchScript / torch.export / ONNX / scikit-learn / Python model for serving",
        description="Write a verified model package from a TorchScript (.pt), torch.export (.pt2) or ONNX "
        "(.onnx) file, a fitted scikit-learn estimator (.pkl/.joblib, converted to ONNX), or a Python class "
        "(MODULE.py:CLASS with load() and predict(batch)): the model is run "
        "on a batch of its declared inputs and must return its declared outputs.",
        epilog="examples:\n  vivace package model.pt --out models/mine --name mine --input x:FP32:32\n"
        "  vivace package model.onnx --out models/mine --name mine     # inputs and outputs from the graph\n"
        "  vivace package prep.py:Prep --out models/prep --name prep --input x:FP32:32 --file vocab.json\n"
        "  vivace package forest.joblib --out models/forest --name forest --example rows.npy   # scikit-learn\n"
        "  vivace models register models/mine --name mine --metric auc=0.91\n"
        "  vivace serve models/mine",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="TorchScript (.pt), torch.export (.pt2), ONNX (.onnx) or scikit-learn "
                   "(.pkl, .joblib) file, or MODULE.py:CLASS (none with --step)")
    p.add_argument("--step", action="append", metavar="NAME=PACKAGE",
                   help="an ensemble: a step and the package it runs, in order (repeat); tensors connect by name")
    p.add_argument("--map", action="append", metavar="STEP.TENSOR=NAME",
                   help="ensemble wiring where names differ: feed a step's input from NAME, or rename a step's output")
    p.add_argument("--out", required=True, help="package directory to create")
    p.add_argument("--name", required=True, help="model name clients use in /v2/models/NAME")
    p.add_argument("--version", default="1")
    p.add_argument("--input", action="append", metavar="NAME:DATATYPE:DIMS",
                   help="an input and its row shape, e.g. x:FP32:32 or image:FP32:3x224x224 (repeat per input; "
                   "torch and Python models need them, ONNX models only where the graph leaves a row dimension open)")
    p.add_argument("--output", action="append", metavar="NAME:DATATYPE:DIMS",
                   help="name the outputs (default output__0..., or the ONNX graph's; shapes are checked against the model)")
    p.add_argument("--platform", choices=["torchscript", "torch_export", "onnxruntime", "python", "sklearn"],
                   help="default: from the file suffix (sklearn: converted to ONNX, served by onnxruntime)")
    p.add_argument("--example", metavar="ROWS.npy",
                   help="rows a scikit-learn estimator and its ONNX conversion must agree on (default: 256 "
                   "standard-normal rows)")
    p.add_argument("--file", action="append", metavar="PATH",
                   help="a file a Python model reads (from self.package_dir), stored in the package (repeat)")
    p.add_argument("--max-batch-size", type=int, dest="max_batch_size_given", metavar="N",
                   help="largest batch (default 128; an ensemble's: its steps' smallest)")
    p.add_argument("--max-queue-delay-us", type=int, default=0)
    p.add_argument("--preferred-batch-size", type=int, action="append", metavar="N")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="a package parameter, e.g. torch_num_threads=2, or for ONNX intra_op_thread_count=2, "
                   "graph_optimization_level=extended, session_config='{\"session.intra_op.allow_spinning\": \"0\"}'")
    p.add_argument("--profile", metavar="PROFILE.json",
                   help="reference profile of the training data (vivace monitor profile): drift monitoring")
    p.add_argument("--description")
    p.add_argument("--force", action="store_true", help="replace an existing package")
    p.set_defaults(func=_package)

    data = subparsers.add_parser("data", help="versioned, validated datasets")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = dsub.add_parser("add", help="snapshot a file or folder (parquet, csv, npy) as a new version")
    p.add_argument("name")
    p.add_argument("path")
    p.add_argument("--schema", help="YAML schema to validate against before the version is created")
    p.set_defaults(func=_data_add)
    p = dsub.add_parser("list", help="list dataset versions")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=_data_list)
    p = dsub.add_parser("show", help="show one version: NAME[@vN|@latest]")
    p.add_argument("ref")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_data_show)

    models = subparsers.add_parser("models", help="model registry: versions, aliases, promotion, cards")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    p = msub.add_parser("register", help="register a package directory as the next version")
    p.add_argument("package", nargs="?", help="package directory (default with --run: that run's package)")
    p.add_argument("--name", required=True)
    p.add_argument("--run", help="training run that produced it (adds metrics, tests, lineage)")
    p.add_argument("--description")
    p.add_argument("--tag", action="append", metavar="KEY=VALUE")
    p.add_argument("--metric", action="append", metavar="NAME=VALUE",
                   help="a quality metric (repeatable), e.g. --metric auc=0.91: what promotion gates check")
    p.add_argument("--metrics", metavar="FILE.json", help='metrics as a JSON object, e.g. {"auc": 0.91}')
    p.set_defaults(func=_models_register)
    p = msub.add_parser("alias", help="set NAME VERSION ALIAS, or NAME --delete ALIAS")
    p.add_argument("name")
    p.add_argument("version", nargs="?")
    p.add_argument("alias", nargs="?")
    p.add_argument("--delete", metavar="ALIAS")
    p.add_argument("--force", action="store_true", help="move or delete a protected alias (needs --reason)")
    p.add_argument("--reason")
    p.set_defaults(func=_models_alias)
    p = msub.add_parser("list", help="list registered models")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_models_list)
    p = msub.add_parser("show", help="show NAME (all versions), NAME@ALIAS or NAME/VERSION")
    p.add_argument("ref")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_models_show)
    p = msub.add_parser("resolve", help="print the verified package directory of a reference")
    p.add_argument("ref")
    p.set_defaults(func=_models_resolve)
    p = msub.add_parser("tag", help="set tags KEY=VALUE on a version")
    p.add_argument("ref")
    p.add_argument("tags", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--remove", action="append", metavar="KEY")
    p.set_defaults(func=_models_tag)
    p = msub.add_parser("describe", help="set a version's description")
    p.add_argument("ref")
    p.add_argument("text")
    p.set_defaults(func=_models_describe)
    p = msub.add_parser("promote", help="move an alias to a version through the quality gate")
    p.add_argument("name")
    p.add_argument("version", type=int)
    p.add_argument("--alias", default="production")
    p.add_argument("--metric", default="auc", help="gate metric (default auc)")
    p.add_argument("--direction", choices=["max", "min"], help="default: min for loss/error metrics, else max")
    p.add_argument("--margin", type=float, default=0.0, help="required improvement over the holder (may be < 0)")
    p.add_argument("--max-group-difference", type=float, default=None, metavar="X",
                   help="bias check: refuse when a sensitive attribute's demographic parity or equal opportunity "
                   "difference (training group metrics) exceeds X")
    p.add_argument("--force", action="store_true", help="override a failed gate (needs --reason)")
    p.add_argument("--reason")
    p.set_defaults(func=_models_promote)
    p = msub.add_parser("protect", help="require an approved request (a second identity) to move NAME@ALIAS")
    p.add_argument("name")
    p.add_argument("alias")
    p.add_argument("--off", action="store_true", help="lift the protection")
    p.add_argument("--reason")
    p.set_defaults(func=_models_protect)
    p = msub.add_parser("request", help="ask for a promotion to a protected alias (another identity approves)")
    p.add_argument("name")
    p.add_argument("version", type=int)
    p.add_argument("--alias", default="production")
    p.add_argument("--reason")
    p.set_defaults(func=_models_request)
    p = msub.add_parser("requests", help="promotion requests (pending ones, or --all)")
    p.add_argument("--all", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_models_requests)
    p = msub.add_parser("approve", help="approve a promotion request (not your own): gate, then move the alias")
    p.add_argument("request", type=int)
    p.add_argument("--metric", default="auc", help="promotion gate metric (default auc)")
    p.add_argument("--force", action="store_true", help="override a failed gate (needs --reason)")
    p.add_argument("--reason")
    p.set_defaults(func=_models_approve)
    p = msub.add_parser("reject", help="reject a promotion request (not your own)")
    p.add_argument("request", type=int)
    p.add_argument("--reason")
    p.set_defaults(func=_models_reject)
    p = msub.add_parser("card", help="markdown model card for NAME/VERSION or NAME@ALIAS")
    p.add_argument("ref")
    p.add_argument("--output", "-o")
    p.set_defaults(func=_models_card)

    rollout = subparsers.add_parser(
        "rollout", help="progressive delivery on an alias: canary weights, shadow traffic",
        description="A rollout on NAME@ALIAS sends a canary version WEIGHT% of the alias's requests and/or "
        "copies a share of them to a shadow version (answers compared, never returned). Servers following "
        "the alias (vivace serve NAME@ALIAS) apply it live; every change is an audited registry event.")
    osub = rollout.add_subparsers(dest="rollout_command", metavar="{start,status,promote,abort}", required=True)
    p = osub.add_parser("start", help="start a canary and/or shadow rollout on NAME@ALIAS")
    p.add_argument("ref", metavar="NAME@ALIAS")
    p.add_argument("--canary", type=int, metavar="VERSION", help="version taking --weight %% of requests")
    p.add_argument("--weight", type=float, default=10.0, help="canary share of requests, percent (default 10)")
    p.add_argument("--sticky", metavar="WHERE",
                   help="route each key to one version: 'parameter' (request parameter routing_key) or "
                   "'input:NAME' (the first value of input NAME, e.g. an entity id)")
    p.add_argument("--shadow", type=int, metavar="VERSION", help="version receiving copies of requests")
    p.add_argument("--shadow-sample", type=float, default=0.1, help="share of requests copied (default 0.1)")
    p.add_argument("--auto", metavar="STEPS",
                   help="let the servers step the canary through these weights (e.g. 10,50,100: the last "
                   "promotes), judging each step against the stable version, and abort on a failed check")
    p.add_argument("--min-requests", type=int, help="canary answers needed at a step before judging it (200)")
    p.add_argument("--step-seconds", type=float, help="least time at each step (60)")
    p.add_argument("--max-error-rate", type=float, help="canary error rate above the stable one allowed (0.01)")
    p.add_argument("--max-p99-ratio", type=float, help="canary p99 / stable p99 allowed (1.5)")
    p.add_argument("--max-disagreement", type=float, help="share of shadow copies with other labels allowed (0.05)")
    p.add_argument("--no-drift-check", action="store_true", help="do not abort when the canary's data drifts")
    p.add_argument("--reason")
    p.set_defaults(func=_rollout_start)
    p = osub.add_parser("status", help="active rollouts (all, or NAME@ALIAS's)")
    p.add_argument("ref", nargs="?", metavar="NAME@ALIAS")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_rollout_status)
    p = osub.add_parser("promote", help="step the canary's weight, or (without --weight, or 100) move the "
                        "alias to it through the promotion gate and end the rollout")
    p.add_argument("ref", metavar="NAME@ALIAS")
    p.add_argument("--weight", type=float, help="new canary share, percent (a step; 100 promotes)")
    p.add_argument("--metric", default="auc", help="promotion gate metric (default auc)")
    p.add_argument("--force", action="store_true", help="override a failed gate (needs --reason)")
    p.add_argument("--reason")
    p.set_defaults(func=_rollout_promote)
    p = osub.add_parser("abort", help="end the rollout: every request goes to the alias's version")
    p.add_argument("ref", metavar="NAME@ALIAS")
    p.add_argument("--reason")
    p.set_defaults(func=_rollout_abort)

    runs = subparsers.add_parser("runs", help="training runs (experiment tracking)")
    rsub = runs.add_subparsers(dest="runs_command", metavar="{list,show,compare}", required=True)
    p = rsub.add_parser("list", help="runs, newest first")
    p.add_argument("--name", help="only runs of this training config name")
    p.set_defaults(func=_runs_list)
    p = rsub.add_parser("show", help="one run: parameters, metrics, data versions, artifacts")
    p.add_argument("run")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_runs_show)
    p = rsub.add_parser("compare", help="side-by-side table of runs")
    p.add_argument("runs", nargs="+")
    p.set_defaults(func=_runs_compare)

    p = subparsers.add_parser("train", help="train a model from a YAML config (reproducible)")
    p.add_argument("config")
    p.add_argument("--output", help="package directory (default <home>/runs/<run>/package)")
    p.add_argument("--register", metavar="NAME", help="register the result as the next version of NAME")
    p.set_defaults(func=_train)

    p = subparsers.add_parser("audit", help="the append-only audit log of registry mutations")
    p.add_argument("--target", help="only records for this model or dataset")
    p.add_argument("--limit", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_audit)
