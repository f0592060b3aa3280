"""`vivace serve` and `vivace score`."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from vivace.errors import VivaceCLIError

from .config import ServerConfig
from .options import OptionsError, ServeOptions
from .serving import resolve_package


def register(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve model packages over KServe v2 HTTP",
        description="Serve one or more model packages (directories, or NAME@ALIAS from the registry).",
        formatter_class=_ShowDefaults,
    )
    serve.add_argument("models", nargs="+", metavar="PACKAGE", help="package directory or NAME@ALIAS")
    _add_serve_options(serve)
    serve.set_defaults(func=_serve)

    demo = subparsers.add_parser(
        "demo",
        help="the whole loop on synthetic churn data: version, train, register, promote, serve",
        description="Versions bundled synthetic customer-churn data, trains a model, registers and "
        "promotes it, then serves churn@production next to churn_action (a pipeline: the churn model, then a "
        "Python step choosing an action) and the benchmark reference model `mlp`.",
        formatter_class=_ShowDefaults,
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
    score.add_argument("--ray", action="store_true",
                       help="score on a Ray cluster (RAY_ADDRESS or --ray-address; default a local one): the input "
                       "may be a folder of parquet files, the output a folder (no suffix)")
    score.add_argument("--ray-address", default=None, help="the Ray cluster to join (default: $RAY_ADDRESS or local)")
    score.add_argument("--ray-actors", type=int, default=1, help="Scorer actors on the cluster")
    score.set_defaults(func=_score)


class _ShowDefaults(argparse.HelpFormatter):
    """Appends "(default: X)" to options that have a default worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _add_serve_options(serve: argparse.ArgumentParser) -> None:
    defaults = ServerConfig()
    serve.add_argument("--host", default=defaults.host, help="address to listen on")
    serve.add_argument("--port", type=int, default=defaults.port, help="port to listen on (0: any free port)")
    serve.add_argument("--device", default=None, help="cpu or cuda[:N] (default: from the package)")
    serve.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    serve.add_argument(
        "--execution",
        choices=["inline", "threads"],
        default=None,
        help="run batches on the event loop (inline: fastest for small CPU models) or on executor "
        "threads (keeps the loop responsive for slow models); default: per backend",
    )
    serve.add_argument("--http-frontend", choices=("auto", "native", "python"), default=defaults.http_frontend,
                       help="native: the C++ front end answers JSON infer requests without Python; python: "
                       "uvloop + httptools; auto (default): native unless --tls-cert or --auth is set")
    serve.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes,
                       help="largest request body (413 beyond)")
    serve.add_argument("--max-header-bytes", type=int, default=defaults.max_header_bytes,
                       help="request line and headers together")
    serve.add_argument("--max-headers", type=int, default=defaults.max_headers, help="most header lines (431 beyond)")
    serve.add_argument("--max-connections", type=int, default=defaults.max_connections,
                       help="open connections at once; more are refused")
    serve.add_argument("--header-timeout", type=float, default=defaults.header_timeout,
                       help="seconds from a request's first byte to the end of its headers (408 beyond)")
    serve.add_argument("--body-timeout", type=float, default=defaults.body_timeout,
                       help="seconds from the end of the headers to the end of the body (408 beyond)")
    serve.add_argument("--idle-timeout", type=float, default=defaults.idle_timeout,
                       help="seconds a keep-alive connection may wait with nothing in flight")
    serve.add_argument("--drain-timeout", type=float, default=defaults.drain_timeout,
                       help="on SIGTERM, the longest wait for accepted requests to be answered")
    serve.add_argument("--execution-timeout", dest="execution_timeout_s", type=float,
                       default=defaults.execution_timeout_s,
                       help="seconds a batch may run before its requests fail (500) and the model is "
                       "taken out of service until it returns (execution threads only)")
    serve.add_argument("--shed-queue-wait-ms", type=float, default=defaults.shed_queue_wait_ms,
                       help="refuse new requests (503, Retry-After) while a model's queue holds more than "
                       "this much work (queued batches x recent batch time), or its oldest request has "
                       "waited longer; 0 disables load shedding")
    serve.add_argument("--log-level", default=os.environ.get("VIVACE_LOG_LEVEL", "INFO"))
    serve.add_argument("--log-format", choices=["text", "json"], default=os.environ.get("VIVACE_LOG_FORMAT", "text"),
                       help="text lines, or JSON lines (ts, level, logger, message, role, model, version) "
                       "for a log pipeline")
    serve.add_argument("--workers", type=int, default=1,
                       help="worker processes sharing the port (SO_REUSEPORT) under a supervisor that restarts "
                       "them; /metrics shows all of them merged (1: no supervisor)")
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
                       help="share of requests logged")
    serve.add_argument("--prediction-log-max-mb", type=float, default=64.0,
                       help="size at which the log rotates (6 files are kept)")
    tracing = serve.add_argument_group(
        "tracing", "OpenTelemetry spans (receive, queue wait, batch with its size, feature lookup, response) "
        "sent over OTLP/HTTP; needs the otel extra (pip install 'vivace[otel]')")
    tracing.add_argument("--trace-endpoint", default=defaults.trace_endpoint, metavar="URL",
                         help="OTLP/HTTP collector (http://host:4318; /v1/traces is added): tracing is off "
                         "without it")
    tracing.add_argument("--trace-sample-ratio", type=float, default=defaults.trace_sample_ratio, metavar="R",
                         help="share of requests without a traceparent that are traced (a request's "
                         "traceparent decides for itself: sampled flag set, always; clear, never)")
    tracing.add_argument("--trace-service-name", default=defaults.trace_service_name,
                         help="service.name of the spans")
    truth = serve.add_argument_group("ground truth", "labels POSTed to /v2/models/NAME/feedback are joined to the "
                                     "--prediction-log; quality, group metrics and importance per version at "
                                     "/v2/models/NAME/performance and /metrics; alerts go where drift alerts go")
    truth.add_argument("--quality-window", type=int, default=10_000, help="labelled rows per version in the metrics")
    truth.add_argument("--quality-min-labels", type=int, default=100, help="labels before thresholds are judged")
    truth.add_argument("--quality-threshold", action="append", default=[], metavar="METRIC>=X|METRIC<=X",
                       help="alert when a metric crosses it, e.g. auc>=0.7, logloss<=0.6, ece<=0.1, "
                       "demographic_parity_difference<=0.1 (repeatable)")
    truth.add_argument("--feedback-index", type=int, default=100_000,
                       help="logged requests kept for the join: a label later than this many requests is unknown")
    truth.add_argument("--importance-interval", type=float, default=60.0,
                       help="seconds between production permutation-importance runs (0: off)")
    truth.add_argument("--importance-rows", type=int, default=1000, help="rows sampled per importance run")
    serve.add_argument("--follow-interval", type=float, default=1.0,
                       help="seconds between checks that a served NAME@ALIAS still points to the same version")
    release = serve.add_argument_group("deployed release", "what `vivace deploy render` passes to a pod serving "
                                       "the package in /mnt/models")
    release.add_argument("--model-name", default=None, help="serve the package under this name (the registry's)")
    release.add_argument("--model-version", default=None, help="serve the package as this version (the registry's)")
    release.add_argument("--expect-sha256", default=None, metavar="HEX",
                         help="refuse to start unless the package's package.json has this SHA-256 (the registry's "
                         "package id); its files are then checked against package.json")
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


def _demo(args: argparse.Namespace) -> int:
    from vivace.registry.reference_model import write_reference_model
    from vivace.registry.demo_data import run_lifecycle, write_action_pipeline

    workdir = Path(args.home) / "demo"
    workdir.mkdir(parents=True, exist_ok=True)
    ref = run_lifecycle(args.home, workdir)
    pipeline = write_action_pipeline(resolve_package(ref, args.home).path, workdir)
    reference = workdir / "mlp"
    write_reference_model(reference, overwrite=True)
    print(f"$ vivace bench model --out {reference}")
    if args.no_serve:
        return 0
    args.models = [ref, str(pipeline), str(reference)]
    print(f"$ vivace serve {ref} {pipeline} {reference} --port {args.port}\n"
          f"  try: curl -s localhost:{args.port}/v2/models/churn   and   curl -s localhost:{args.port}/metrics",
          flush=True)
    return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    options = ServeOptions.from_args(args)
    try:
        options.check()
    except OptionsError as exc:
        raise VivaceCLIError(str(exc)) from None
    if options.workers > 1:
        from .workers import supervise

        return supervise(options)
    from .serving import run

    return run(options)


def _read_table(path: Path, columns: str | None, package) -> tuple[Any, dict[str, Any]]:
    """The model's input rows of a .npy or .parquet file, and the columns carried through."""
    import numpy as np

    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False), {}
    if path.suffix != ".parquet":
        raise VivaceCLIError(f"{path}: expected a .npy or .parquet file")
    import pyarrow.parquet as pq

    return table_inputs(pq.read_table(path), columns, package, str(path))


def table_inputs(table: Any, columns: str | None, package, source: str = "the input") -> tuple[Any, dict[str, Any]]:
    """The model's input rows of an Arrow table, and the columns carried through to the output.

    A package trained by `vivace train` names its raw feature columns (metadata.features):
    a table holding them is encoded as training encoded it (categories as indexes), and
    its other columns (ids, timestamps) are carried through to the output. Otherwise the
    `columns` given (comma-separated; default: all) are the features, in order. Shared by
    `vivace score` and its Ray path (engine/distributed.py), so both read rows alike.
    """
    import numpy as np

    specs = package.metadata.get("features")
    names = table.column_names
    if specs and columns is None and any(s["name"] in names for s in specs):
        missing = [s["name"] for s in specs if s["name"] not in names]
        if missing:
            raise VivaceCLIError(f"{source} lacks the model's feature columns {missing} "
                                 f"(it takes {[s['name'] for s in specs]})")
        from vivace.registry.train import encode

        frame = table.to_pandas()
        features = {s["name"] for s in specs}
        carried = {c: frame[c].to_numpy() for c in frame.columns if c not in features}
        return encode(frame, specs), carried
    wanted = columns.split(",") if columns else names
    unknown = [c for c in wanted if c not in names]
    if unknown:
        raise VivaceCLIError(f"{source} has no columns {unknown} (it has {names[:20]})")
    return np.column_stack([table.column(c).to_numpy(zero_copy_only=False) for c in wanted]), {}


def output_columns(outputs: dict[str, Any], carried: dict[str, Any]) -> dict[str, Any]:
    """The output table's columns: the carried ones, then each output (NAME, or NAME_k for
    each of several values per row)."""
    columns = dict(carried)
    for name, values in outputs.items():
        flat = values.reshape(values.shape[0], -1)
        for k in range(flat.shape[1]):
            columns[name if flat.shape[1] == 1 else f"{name}_{k}"] = flat[:, k]
    return columns


def _score_on_ray(args: argparse.Namespace, source: Path, dest: Path) -> int:
    """`vivace score --ray`: the rows of a parquet file or folder scored by Scorer actors on
    a Ray cluster (RAY_ADDRESS / --ray-address, or a local one), written to one .parquet
    file (gathered here, in order: what `vivace score` writes) or, for an output without a
    suffix, a folder of parquet files written by the cluster."""
    remote_in, remote_out = "://" in args.input, "://" in args.output  # s3://, gs://: read by the cluster
    if source.suffix == ".npy" or not (remote_in or source.is_dir() or source.suffix == ".parquet"):
        raise VivaceCLIError(f"{args.input}: --ray reads a .parquet file or a folder of them")
    if not remote_in and not source.exists():
        raise VivaceCLIError(f"{args.input}: no such file or folder")
    if dest.suffix not in ("", ".parquet") or (remote_out and dest.suffix):
        raise VivaceCLIError(f"{args.output}: with --ray the output is a local .parquet file or a folder")
    if not remote_out and dest.exists() and dest.suffix == "":
        raise VivaceCLIError(f"{args.output}: already exists")
    package = resolve_package(args.model, args.home)
    try:
        import ray
    except ImportError:
        raise VivaceCLIError("--ray needs Ray: pip install 'vivace[ray]'") from None
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .distributed import score_dataset

    ray.init(address=args.ray_address, logging_level="ERROR", log_to_driver=False)
    try:
        dataset = ray.data.read_parquet(args.input, file_extensions=["parquet"])
        scored = score_dataset(dataset, package, columns=args.columns, actors=args.ray_actors,
                               batch_size=args.batch_size, num_threads=args.threads)
        if dest.suffix == "":
            scored.write_parquet(args.output)
            rows = scored.count()
        else:
            table = pa.concat_tables(ray.get(scored.to_arrow_refs()))
            rows = table.num_rows
            tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
            try:
                pq.write_table(table, tmp)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
    except ray.exceptions.RayError as exc:
        raise VivaceCLIError(f"scoring on Ray failed: {str(exc).strip().splitlines()[-1]}") from None
    finally:
        ray.shutdown()
    print(f"scored {rows} rows with {package.name}/{package.version} on Ray ({args.ray_actors} actors) -> {args.output}",
          file=sys.stderr)
    return 0


def _score(args: argparse.Namespace) -> int:
    import numpy as np

    from .scorer import Scorer

    source, dest = Path(args.input), Path(args.output)
    if args.ray:
        return _score_on_ray(args, source, dest)
    if not source.is_file():
        raise VivaceCLIError(f"{source}: no such file")
    if dest.suffix not in (".npy", ".parquet"):
        raise VivaceCLIError(f"{dest}: output must be a .npy or .parquet file")
    package = resolve_package(args.model, args.home)
    data, carried = _read_table(source, args.columns, package)
    scorer = Scorer(package, device=args.device, num_threads=args.threads, batch_size=args.batch_size)
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

            pq.write_table(pa.table(output_columns(outputs, carried)), tmp)
        os.replace(tmp, dest)  # readers never see a half-written output file
    finally:
        tmp.unlink(missing_ok=True)
    print(f"scored {len(data)} rows with {scorer.package.name}/{scorer.package.version} -> {dest}", file=sys.stderr)
    return 0
