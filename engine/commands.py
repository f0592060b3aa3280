"""`vivace serve` and `vivace score`."""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from .cli import VivaceCLIError
from .config import ServerConfig


def register(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve model packages over KServe v2 HTTP",
        description="Serve one or more model packages (directories, or NAME@ALIAS from the registry).",
    )
    serve.add_argument("models", nargs="+", metavar="PACKAGE", help="package directory or NAME@ALIAS")
    _add_serve_options(serve)
    serve.set_defaults(func=_serve)

    demo = subparsers.add_parser(
        "demo",
        help="the whole loop on synthetic churn data: version, train, register, promote, serve",
        description="Versions bundled synthetic customer-churn data, trains a model, registers and "
        "promotes it, then serves churn@production next to the benchmark reference model `mlp`.",
    )
    demo.add_argument("--no-serve", action="store_true", help="stop after promoting")
    _add_serve_options(demo)
    demo.set_defaults(func=_demo, models=None)

    score = subparsers.add_parser(
        "score",
        help="score a .npy or .parquet file offline",
        description="Score a .npy (rows x features) or .parquet file with a model package, without HTTP.",
    )
    score.add_argument("model", metavar="PACKAGE", help="package directory or NAME@ALIAS")
    score.add_argument("--input", required=True, help=".npy or .parquet file")
    score.add_argument("--output", required=True, help=".npy or .parquet file to write")
    score.add_argument("--columns", default=None, help="comma-separated parquet feature columns (default: all)")
    score.add_argument("--device", default=None)
    score.add_argument("--threads", type=int, default=None)
    score.add_argument("--batch-size", type=int, default=65536)
    score.set_defaults(func=_score)


def _add_serve_options(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", default=None, help="cpu or cuda[:N] (default: from the package)")
    serve.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    serve.add_argument(
        "--execution",
        choices=["inline", "threads"],
        default=None,
        help="run batches on the event loop (inline: fastest for small CPU models) or on executor "
        "threads (keeps the loop responsive for slow models); default: per backend",
    )
    defaults = ServerConfig()
    serve.add_argument("--http-frontend", choices=("auto", "native", "python"), default=defaults.http_frontend,
                       help="native: the C++ front end answers JSON infer requests without Python; python: "
                       "uvloop + httptools; auto (default): native unless --tls-cert or --auth is set")
    serve.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes)
    serve.add_argument("--max-header-bytes", type=int, default=defaults.max_header_bytes,
                       help="request line and headers together")
    serve.add_argument("--max-headers", type=int, default=defaults.max_headers)
    serve.add_argument("--max-connections", type=int, default=defaults.max_connections)
    serve.add_argument("--header-timeout", type=float, default=defaults.header_timeout)
    serve.add_argument("--body-timeout", type=float, default=defaults.body_timeout)
    serve.add_argument("--idle-timeout", type=float, default=defaults.idle_timeout)
    serve.add_argument("--drain-timeout", type=float, default=defaults.drain_timeout)
    serve.add_argument("--execution-timeout", type=float, default=defaults.execution_timeout_s,
                       help="seconds a batch may run before its requests fail (500) and the model is "
                       "taken out of service until it returns (execution threads only)")
    serve.add_argument("--shed-queue-wait-ms", type=float, default=defaults.shed_queue_wait_ms,
                       help="refuse new requests (503, Retry-After) while a model's queue holds more than "
                       "this much work (queued batches x recent batch time), or its oldest request has "
                       "waited longer; 0 disables load shedding")
    serve.add_argument("--log-level", default=os.environ.get("VIVACE_LOG_LEVEL", "INFO"))
    serve.add_argument("--workers", type=int, default=1,
                       help="worker processes sharing the port (SO_REUSEPORT) under a supervisor that restarts "
                       "them; /metrics shows all of them merged (default: 1, no supervisor)")
    serve.add_argument("--drift-interval", type=float, default=10.0,
                       help="seconds between drift checks of models whose package has a reference profile")
    serve.add_argument("--drift-window", type=int, default=10_000, help="rows in the sliding drift window "
                       "(at most N; kept in 6 buckets, so at least 5/6 of N once full)")
    serve.add_argument("--drift-webhook", default=None, help="POST drift alerts to this URL")
    serve.add_argument("--drift-command", default=None, help="command run on a drift alert (retraining trigger)")
    serve.add_argument("--no-drift", action="store_true", help="do not sketch inputs and predictions")
    serve.add_argument("--prediction-log", default=None, metavar="FILE",
                       help="append sampled requests and responses (JSON lines: request id, model, version, "
                       "latency) to FILE, size-capped with rotation; with --workers, one file per worker")
    serve.add_argument("--prediction-log-sample", type=float, default=0.01,
                       help="share of requests logged (default 0.01)")
    serve.add_argument("--prediction-log-max-mb", type=float, default=64.0,
                       help="size at which the log rotates (6 files are kept)")
    serve.add_argument("--follow-interval", type=float, default=1.0,
                       help="seconds between checks that a served NAME@ALIAS still points to the same version")
    security = serve.add_argument_group("security")
    security.add_argument("--auth", action="store_true",
                          help="require bearer tokens (see `vivace auth create-token`); health checks stay open")
    security.add_argument("--auth-tokens", default=None, metavar="FILE",
                          help="token file (default with --auth: HOME/auth/tokens.json)")
    security.add_argument("--audit-log", default=None, metavar="FILE",
                          help="JSON lines of authentication failures and admin actions "
                          "(default: HOME/audit/server.jsonl)")
    security.add_argument("--repository-control", action="store_true",
                          help="allow POST /v2/repository/models/{m}/load|unload|alias (off by default, as "
                          "Triton's explicit model control; with --auth they also need the admin scope)")
    security.add_argument("--tls-cert", default=None, metavar="PEM", help="serve HTTPS with this certificate chain")
    security.add_argument("--tls-key", default=None, metavar="PEM", help="private key of --tls-cert")


def is_registry_ref(ref: str) -> bool:
    """NAME@ALIAS or NAME/VERSION (and not an existing directory)."""
    if Path(ref).is_dir():
        return False
    name, _, version = ref.partition("/")
    return "@" in ref or (version.isdigit() and bool(name) and not name.startswith("."))


def resolve_package(ref: str, home: str):
    """Load a package directory, or NAME@ALIAS / NAME/VERSION through the registry.

    Registry packages are served under their registered name and version number.
    """
    from vivace.registry.package import load_package

    if not is_registry_ref(ref):
        if not Path(ref).is_dir():
            raise VivaceCLIError(f"{ref}: not a package directory (and not NAME@ALIAS)")
        return load_package(ref)
    return registered_package(ref, home)


def registered_package(ref: str, home: str):
    """NAME@ALIAS or NAME/VERSION from the registry only (never a directory: what HTTP
    clients and alias followers load)."""
    from vivace.registry.data import check_name
    from vivace.registry.models import get_version, package_path
    from vivace.registry.package import load_package
    from vivace.registry.store import open_home

    check_name(ref.partition("@")[0] if "@" in ref else ref.partition("/")[0], "model name")
    registry = open_home(home)
    version = get_version(registry, ref)
    package = load_package(package_path(registry, version.package_sha), verify=False)  # package_path verified it
    package.name = version.name
    package.version = str(version.version)
    return package


def _demo(args: argparse.Namespace) -> int:
    from vivace.bench.model import write_reference_model
    from vivace.registry.demo_data import run_lifecycle

    workdir = Path(args.home) / "demo"
    workdir.mkdir(parents=True, exist_ok=True)
    ref = run_lifecycle(args.home, workdir)
    reference = workdir / "mlp"
    write_reference_model(reference, overwrite=True)
    print(f"$ vivace bench model --out {reference}")
    if args.no_serve:
        return 0
    args.models = [ref, str(reference)]
    print(f"$ vivace serve {ref} {reference} --port {args.port}\n"
          f"  try: curl -s localhost:{args.port}/v2/models/churn   and   curl -s localhost:{args.port}/metrics",
          flush=True)
    return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise VivaceCLIError(f"--workers must be at least 1, got {args.workers}")
    if args.workers > 1 and args.repository_control:
        raise VivaceCLIError("--repository-control needs a single process: a load or unload would change one "
                             "worker only; move aliases in the registry (vivace models alias) instead")
    if args.execution_timeout <= 0:
        raise VivaceCLIError(f"--execution-timeout must be positive, got {args.execution_timeout:g}")
    if args.http_frontend == "native" and (args.tls_cert or args.auth or args.auth_tokens):
        raise VivaceCLIError("the native HTTP front end does not implement TLS or --auth; "
                             "use --http-frontend auto or python with them")
    if args.workers > 1 and getattr(args, "worker_index", None) is None:
        from .workers import supervise

        return supervise(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvloop

    from .auth import tokens_path
    from .runtime import ModelRunner
    from .server import registry_follower, serve

    def build(ref: str, package=None) -> ModelRunner:
        package = package or resolve_package(ref, args.home)
        runner = ModelRunner(package, device=args.device, num_threads=args.threads, execution=args.execution,
                             home=args.home, shed_queue_wait_ms=args.shed_queue_wait_ms,
                             execution_timeout_s=args.execution_timeout)
        if runner.has_profile and not args.no_drift:
            from vivace.monitor.alerts import AlertConfig

            # With --workers, each worker sketches its share of the traffic (a random sample
            # of it) but only worker 0 acts on alerts: one event, one webhook, one trigger.
            acts = getattr(args, "worker_index", None) in (None, 0)
            alerts = AlertConfig(webhook_url=args.drift_webhook if acts else None,
                                 command=shlex.split(args.drift_command) if args.drift_command and acts else None,
                                 registry_home=args.home if is_registry_ref(ref) and acts else None)
            runner.enable_drift(args.drift_interval, args.drift_window, alerts)
        runner.prediction_log = prediction_log
        return runner

    prediction_log = None
    if args.prediction_log:
        from vivace.monitor.predlog import PredictionLogger

        prediction_log = PredictionLogger(_own_file(args.prediction_log, args), sample_rate=args.prediction_log_sample,
                                          max_bytes=int(args.prediction_log_max_mb * (1 << 20)))
    def build_registered(ref: str) -> ModelRunner:
        return build(ref, registered_package(ref, args.home))

    runners, followers = [], []
    for ref in args.models:
        runner = build(ref)
        runners.append(runner)
        if is_registry_ref(ref) and "@" in ref:
            followers.append(registry_follower(ref, runner, args.home, build_registered, args.follow_interval))
    config = ServerConfig(
        host=args.host,
        port=args.port,
        max_body_bytes=args.max_body_bytes,
        max_header_bytes=args.max_header_bytes,
        max_headers=args.max_headers,
        max_connections=args.max_connections,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        idle_timeout=args.idle_timeout,
        drain_timeout=args.drain_timeout,
        shed_queue_wait_ms=args.shed_queue_wait_ms,
        execution_timeout_s=args.execution_timeout,
        auth_tokens=args.auth_tokens or (str(tokens_path(args.home)) if args.auth else None),
        audit_log=str(_own_file(args.audit_log or Path(args.home) / "audit" / "server.jsonl", args)),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        repository_control=args.repository_control,
        http_frontend=args.http_frontend,
    )
    return uvloop.run(serve(runners, config, followers=followers, loader=build_registered, home=args.home))


def _own_file(path: str | Path, args: argparse.Namespace) -> Path:
    """A log file of this process: with --workers, one per worker (rotation renames files,
    so a file must have a single writer)."""
    path, worker = Path(path), getattr(args, "worker_index", None)
    return path if worker is None else path.with_name(f"{path.stem}.worker{worker}{path.suffix}")


def _read_table(path: Path, columns: str | None):
    import numpy as np

    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=columns.split(",") if columns else None)
        return np.column_stack([table.column(i).to_numpy(zero_copy_only=False) for i in range(table.num_columns)])
    raise VivaceCLIError(f"{path}: expected a .npy or .parquet file")


def _score(args: argparse.Namespace) -> int:
    import numpy as np

    from .scorer import Scorer

    source, dest = Path(args.input), Path(args.output)
    if not source.is_file():
        raise VivaceCLIError(f"{source}: no such file")
    if dest.suffix not in (".npy", ".parquet"):
        raise VivaceCLIError(f"{dest}: output must be a .npy or .parquet file")
    scorer = Scorer(resolve_package(args.model, args.home), device=args.device, num_threads=args.threads,
                    batch_size=args.batch_size)
    data = _read_table(source, args.columns)
    result = scorer.predict(data)
    outputs = result if isinstance(result, dict) else {scorer.package.outputs[0].name: result}
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    try:
        if dest.suffix == ".npy":
            if len(outputs) != 1:
                raise VivaceCLIError("a model with several outputs needs a .parquet output file")
            with open(tmp, "wb") as f:
                np.save(f, next(iter(outputs.values())))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            columns = {}
            for name, values in outputs.items():
                flat = values.reshape(values.shape[0], -1)
                for k in range(flat.shape[1]):
                    columns[name if flat.shape[1] == 1 else f"{name}_{k}"] = flat[:, k]
            pq.write_table(pa.table(columns), tmp)
        os.replace(tmp, dest)  # readers never see a half-written output file
    finally:
        tmp.unlink(missing_ok=True)
    print(f"scored {len(data)} rows with {scorer.package.name}/{scorer.package.version} -> {dest}", file=sys.stderr)
    return 0
