"""Run a server from `ServeOptions`: resolve the packages (directories or registry
references), build their runners (drift monitoring, prediction log), follow aliases, and
serve until a signal. The same function serves a single process and each worker of
`--workers` (engine/workers.py)."""
from __future__ import annotations

import hashlib
import shlex
from pathlib import Path

from vivace.errors import VivaceCLIError
from vivace.monitor.logs import configure_logging

from .options import ServeOptions

def is_registry_ref(ref: str) -> bool:
    """NAME@ALIAS or NAME/VERSION (and not an existing directory)."""
    if Path(ref).is_dir():
        return False
    name, _, version = ref.partition("/")
    return "@" in ref or (version.isdigit() and bool(name) and not name.startswith("."))


def resolve_package(ref: str, home: str, name: str | None = None, version: str | None = None,
                    sha256: str | None = None):
    """Load a package directory, or NAME@ALIAS / NAME/VERSION through the registry.

    Registry packages are served under their registered name and version number. A
    directory may be given the registry's `name` and `version` (a deployed release), and
    with `sha256` it is refused unless its package.json is exactly the pinned one.
    """
    from vivace.registry.package import MANIFEST, load_package

    if not is_registry_ref(ref):
        if not Path(ref).is_dir():
            raise VivaceCLIError(f"{ref}: not a package directory (and not NAME@ALIAS)")
        if sha256 is not None:
            manifest = Path(ref) / MANIFEST
            actual = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
            if actual != sha256:
                raise VivaceCLIError(f"{ref}: package.json has sha256 {actual or 'none (missing)'}, "
                                     f"the release pins {sha256}: refusing to serve another package")
        package = load_package(ref)  # checks every file against package.json
        package.name = name or package.name
        package.version = version or package.version
        return package
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


def run(options: ServeOptions) -> int:
    """Serve `options.models` in this process until SIGTERM/SIGINT (then drain)."""
    configure_logging(options.log_level, options.log_format)
    import uvloop

    from .runtime import ModelRunner
    from .server import registry_follower, serve

    prediction_log = None
    if options.prediction_log:
        from vivace.monitor.predlog import PredictionLogger

        prediction_log = PredictionLogger(options.own_file(options.prediction_log),
                                          sample_rate=options.prediction_log_sample,
                                          max_bytes=int(options.prediction_log_max_mb * (1 << 20)))
    quality = None
    if prediction_log is not None:
        quality = _quality_monitor(options)
    # With --workers, each worker sketches its share of the traffic (a random sample of it)
    # but only worker 0 acts on alerts: one event, one webhook, one trigger.
    acts_on_alerts = options.worker_index in (None, 0)

    def build(ref: str, package=None) -> ModelRunner:
        package = package or resolve_package(ref, options.home, options.model_name, options.model_version,
                                             options.expect_sha256)
        runner = ModelRunner(package, device=options.device, num_threads=options.threads,
                             execution=options.execution, home=options.home,
                             shed_queue_wait_ms=options.server.shed_queue_wait_ms,
                             execution_timeout_s=options.server.execution_timeout_s)
        if runner.has_profile and not options.no_drift:
            from vivace.monitor.alerts import AlertConfig

            alerts = AlertConfig(
                webhook_url=options.drift_webhook if acts_on_alerts else None,
                command=shlex.split(options.drift_command) if options.drift_command and acts_on_alerts else None,
                registry_home=options.home if is_registry_ref(ref) and acts_on_alerts else None)
            runner.enable_drift(options.drift_interval, options.drift_window, alerts)
        runner.prediction_log = prediction_log
        return runner

    def build_registered(ref: str) -> ModelRunner:
        return build(ref, registered_package(ref, options.home))

    runners, followers = [], []
    for ref in options.models:
        runner = build(ref)
        runners.append(runner)
        if is_registry_ref(ref) and "@" in ref:
            followers.append(registry_follower(ref, runner, options.home, build_registered, options.follow_interval))
    broken = [r for r in runners if r.unavailable_reason]
    if len(broken) == len(runners):
        for runner in runners:
            runner.close(drain=False)
        raise VivaceCLIError("; ".join(f"model {r.name!r} version {r.version} {r.unavailable_reason}" for r in broken))
    return uvloop.run(serve(runners, options.server_config(), followers=followers, loader=build_registered,
                            home=options.home, reuse_port=options.worker_index is not None,
                            leader=acts_on_alerts, quality=quality))


def _quality_monitor(options: ServeOptions):
    """Labels joined to the prediction log (monitor/quality.py): this process writes its own
    feedback file and reads every worker's logs; only worker 0 acts on quality alerts."""
    import os

    from vivace.monitor.alerts import AlertConfig
    from vivace.monitor.quality import LogJoin, QualityConfig, QualityMonitor, feedback_log_path, parse_threshold

    leader = options.worker_index in (None, 0)
    alerts = AlertConfig(
        webhook_url=options.drift_webhook if leader else None,
        command=shlex.split(options.drift_command) if options.drift_command and leader else None,
        registry_home=options.home if leader and any(is_registry_ref(m) for m in options.models) else None)
    config = QualityConfig(window=options.quality_window, max_predictions=options.feedback_index,
                           min_labels=options.quality_min_labels,
                           thresholds=[parse_threshold(t) for t in options.quality_threshold],
                           importance_interval=options.importance_interval, importance_rows=options.importance_rows,
                           alerts=alerts)
    base = Path(options.prediction_log)
    join = LogJoin(base, options.own_file(feedback_log_path(base)), config, own_pid=os.getpid())
    return QualityMonitor(join, config)
