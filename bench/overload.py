"""`vivace bench overload`: load shedding at 2x capacity, zero-downtime alias moves, SIGTERM drain.

Scenarios (all by default; `--scenario` picks some), each against a real `vivace serve`
subprocess on 127.0.0.1, driven by the native open-loop generator (vivace._core.http_load:
requests sent on a fixed schedule whatever the responses, over as many keep-alive
connections as needed; latency counted from the scheduled send time, so a slow generator
cannot hide queueing):

  shed    measure capacity closed-loop, then offer 2x capacity open-loop, once with shedding
          on (--shed-queue-wait-ms) and once with it off (each on a fresh server, capacity
          measured right before); prints admitted rate, 503 share, Retry-After coverage,
          p50/p99 of admitted requests and of rejections, server RSS, unanswered requests,
          and the ratio "admitted p99 with shedding / without".
  switch  serves NAME@production from a temporary registry and moves the alias between two
          versions several times under load at 40% of capacity: sent / failed / per version.
  drain   SIGTERM under load at 40% of capacity: requests sent before the signal must all
          be answered 200; afterwards new connections are refused.

The model is deliberately compute-bound (one Linear(W, W) applied DEPTH times, max batch 8,
executed on an executor thread) so that capacity is a few hundred requests per second.
"""
from __future__ import annotations

import io
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .drift import cpu_description
from .http import _stop, _wait_ready, pinned_cpus

MODEL = "overload"
MAX_BATCH = 8
RATIO_OFFERED = 2.0


# -- the compute-bound model --------------------------------------------------------------

def write_compute_bound_model(out: Path, width: int = 1024, depth: int = 48, seed: int = 0,
                              name: str = MODEL) -> None:
    """A package computing relu(x @ W) `depth` times: tens of ms per batch of 8 on one core."""
    import torch

    from vivace.registry.package import write_package

    class Repeated(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(width, width)
            self.head = torch.nn.Linear(width, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(depth):
                x = torch.relu(self.layer(x)) / 4.0  # keep activations bounded across layers
            return torch.sigmoid(self.head(x))

    torch.manual_seed(seed)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is what packages carry
        torch.jit.save(torch.jit.trace(Repeated().eval(), torch.zeros(1, width)), buffer)
    manifest = {
        "name": name,
        "version": "1",
        "platform": "torchscript",
        "model_file": "model.pt",
        "inputs": [{"name": "input__0", "datatype": "FP32", "shape": [-1, width]}],
        "outputs": [{"name": "output__0", "datatype": "FP32", "shape": [-1, 1]}],
        "max_batch_size": MAX_BATCH,
        # Executor thread: the loop keeps answering (and refusing) while a batch computes.
        "parameters": {"torch_num_threads": 1, "execution": "threads"},
        "metadata": {"description": f"vivace bench overload: Linear({width},{width}) x{depth}, seed {seed}"},
    }
    write_package(out, manifest, {"model.pt": buffer.getvalue()}, overwrite=True)


def infer_payload(port: int, width: int, model: str = MODEL, rows: int = 1) -> bytes:
    body = b'{"inputs":[{"name":"input__0","shape":[%d,%d],"datatype":"FP32","data":[%s]}]}' % (
        rows, width, b",".join([b"0.5"] * (width * rows)))
    return (b"POST /v2/models/%s/infer HTTP/1.1\r\nHost: 127.0.0.1:%d\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (model.encode(), port, len(body), body))


# -- the load generator ---------------------------------------------------------------------

# vivace._core.http_load's error codes: answered, connect refused, connection lost, no answer in time
_LOAD_ERRORS = ("", "refused", "lost", "unanswered")


@dataclass(slots=True)
class Outcome:
    """One request: when it was due, and how (and whether) it was answered."""

    scheduled: float        # time.monotonic() seconds
    sent: float = 0.0
    status: int = 0         # 0: no HTTP response
    latency: float = 0.0    # response time minus scheduled time
    retry_after: bool = False
    version: str = ""
    error: str = ""         # "refused": connect failed; "lost": connection closed before a response
    body: bytes = b""

    @property
    def finished(self) -> bool:
        return self.status != 0 or bool(self.error)


def run_load(port: int, payload: bytes, *, duration: float, rate: float = 0.0, concurrency: int = 0,
             warmup: float = 0.0, max_connections: int = 6000, answer_timeout: float = 30.0,
             at: dict[float, Callable[[], None]] | None = None) -> list[Outcome]:
    """Send `payload` to 127.0.0.1:`port` from the native generator (vivace._core.http_load, a
    thread of its own, GIL released): open loop at `rate` per second for `duration` s, or
    closed loop with `concurrency` clients. `at` maps seconds into the run to actions (alias
    moves, signals) run from this thread when that time comes."""
    from vivace._core import http_load

    raw: list = []

    def drive() -> None:
        raw.extend(http_load(port, payload, rate=rate, concurrency=concurrency, duration_s=duration,
                             warmup_s=warmup, max_connections=max_connections, answer_timeout_s=answer_timeout))

    if not at:
        drive()
    else:
        generator = threading.Thread(target=drive, name="vivace-load")
        begun = time.monotonic()
        generator.start()
        for offset, action in sorted(at.items()):
            time.sleep(max(0.0, begun + offset - time.monotonic()))
            action()
        generator.join()
    return [Outcome(scheduled, sent, status, answered - scheduled if answered else 0.0, retry_after, version,
                    _LOAD_ERRORS[error], body)
            for scheduled, sent, answered, status, retry_after, error, version, body in raw]


# -- figures --------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


@dataclass
class OverloadResult:
    label: str
    offered_rate: float      # requests actually written per second
    admitted_rate: float     # 200s answered during the schedule, per second
    sent: int
    admitted: int
    rejected: int            # 503
    other: dict[int, int]    # other statuses
    unanswered: int
    rejected_with_retry_after: int
    admitted_ms: tuple[float, float]
    admitted_p99_halves_ms: tuple[float, float]  # first vs second half of the schedule: bounded or growing
    rejected_ms: tuple[float, float]
    generator_lag_p99_ms: float
    rss_mib: tuple[float, float, float]  # before, after, peak
    sample_error: str = ""
    capacity: float = 0.0    # closed-loop req/s of the same server just before


def summarize(label: str, outcomes: list[Outcome], duration: float, rss_before: int, pid: int) -> OverloadResult:
    rss_after, peak = rss_kib(pid)
    admitted = [o for o in outcomes if o.status == 200]
    rejected = [o for o in outcomes if o.status == 503]
    other: dict[int, int] = {}
    for o in outcomes:
        if o.status not in (0, 200, 503):
            other[o.status] = other.get(o.status, 0) + 1
    sent = [o.sent for o in outcomes if o.sent]
    span = (max(sent) - min(sent)) if len(sent) > 1 else duration
    window_end = outcomes[0].scheduled + duration if outcomes else 0.0
    return OverloadResult(
        label=label,
        offered_rate=len(sent) / max(span, 1e-9),
        # Throughput while the load lasted; what an unbounded queue answers later does not count.
        admitted_rate=sum(1 for o in admitted if o.scheduled + o.latency <= window_end) / duration,
        sent=len(outcomes),
        admitted=len(admitted),
        rejected=len(rejected),
        other=other,
        unanswered=sum(1 for o in outcomes if not o.finished or o.error),
        rejected_with_retry_after=sum(1 for o in rejected if o.retry_after),
        admitted_ms=(percentile([o.latency * 1e3 for o in admitted], 50),
                     percentile([o.latency * 1e3 for o in admitted], 99)),
        admitted_p99_halves_ms=(
            percentile([o.latency * 1e3 for o in admitted if o.scheduled < window_end - duration / 2], 99),
            percentile([o.latency * 1e3 for o in admitted if o.scheduled >= window_end - duration / 2], 99)),
        rejected_ms=(percentile([o.latency * 1e3 for o in rejected], 50),
                     percentile([o.latency * 1e3 for o in rejected], 99)),
        generator_lag_p99_ms=percentile([(o.sent - o.scheduled) * 1e3 for o in outcomes if o.sent], 99),
        rss_mib=(rss_before / 1024, rss_after / 1024, peak / 1024),
        sample_error=rejected[0].body.decode(errors="replace") if rejected else "",
    )


def print_overload(r: OverloadResult) -> None:
    # offered / admitted: the overload the server really saw (its capacity drifts on a shared machine).
    print(f"  [{r.label}] capacity {r.capacity:.0f} req/s, offered {r.offered_rate:.0f} req/s "
          f"(generator lag p99 {r.generator_lag_p99_ms:.1f} ms), admitted {r.admitted_rate:.0f} req/s "
          f"(offered/admitted x{r.offered_rate / max(r.admitted_rate, 1e-9):.1f}); "
          f"sent {r.sent}: 200 {r.admitted}, 503 {r.rejected} "
          f"({100 * r.rejected / max(r.sent, 1):.1f}%), other {r.other or 0}, unanswered {r.unanswered}", flush=True)
    print(f"  [{r.label}] admitted p50 {r.admitted_ms[0]:.1f} ms p99 {r.admitted_ms[1]:.1f} ms "
          f"(p99 first half {r.admitted_p99_halves_ms[0]:.0f} ms, second half {r.admitted_p99_halves_ms[1]:.0f} ms); "
          f"503 p50 {r.rejected_ms[0]:.1f} ms p99 {r.rejected_ms[1]:.1f} ms; "
          f"503 with retry-after {r.rejected_with_retry_after}/{r.rejected}; "
          f"server RSS {r.rss_mib[0]:.0f} -> {r.rss_mib[1]:.0f} MiB (peak {r.rss_mib[2]:.0f})", flush=True)
    if r.sample_error:
        print(f"  [{r.label}] a 503 body: {r.sample_error[:160]}", flush=True)


# -- scenarios ------------------------------------------------------------------------------

def _serve_cmd(models: list[str], port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vivace.cli", "serve", *models, "--port", str(port),
            "--log-level", "WARNING", "--no-drift", *extra]


def _start(cmd: list[str], cpu: int | None, port: int, log: Path,
           env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `vivace serve`; its log goes to a file (a pipe nobody reads could stall it)."""
    preexec = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    with open(log, "ab") as log_file:
        proc = subprocess.Popen(cmd, preexec_fn=preexec, env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
                                stdout=subprocess.DEVNULL, stderr=log_file)
    try:
        _wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", proc)
    except RuntimeError as exc:
        proc.kill()
        raise RuntimeError(f"{exc}; server log:\n{log.read_text()[-2000:]}") from None
    return proc


def _no_shedding() -> list[str]:
    """`vivace serve` options that turn load shedding off (queue-wait shedding is on by default)."""
    return ["--shed-queue-wait-ms", "0"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure_capacity(port: int, payload: bytes, concurrency: int, duration: float) -> float:
    outcomes = run_load(port, payload, concurrency=concurrency, duration=duration, warmup=1.0)
    ok = sum(1 for o in outcomes if o.status == 200)
    if ok == 0:
        raise RuntimeError(f"capacity run got no 200 responses: {outcomes[:1]}")
    return ok / duration


def _overload_run(label: str, port: int, pid: int, payload: bytes, rate: float,
                  duration: float, max_connections: int = 6000) -> OverloadResult:
    rss_before, _ = rss_kib(pid)
    # Answers to what was admitted before the schedule ended: bounded by the queue it built.
    outcomes = run_load(port, payload, rate=rate, duration=duration, max_connections=max_connections,
                        answer_timeout=duration * 3 + 10)
    return summarize(label, outcomes, duration, rss_before, pid)


def _overload_phase(tmp: Path, package: Path, label: str, serve_options: list[str], width: int,
                    duration: float, server_cpu: int | None) -> OverloadResult:
    """A fresh server: its capacity (closed loop), then open-loop load at 2x that capacity."""
    port = _free_port()
    proc = _start(_serve_cmd([str(package)], port, *serve_options), server_cpu, port, tmp / "serve.log")
    payload = infer_payload(port, width)
    try:
        # Measured on this server right before the overload: on a shared machine capacity drifts.
        capacity = _measure_capacity(port, payload, 4 * MAX_BATCH, 2.0)
        result = _overload_run(label, port, proc.pid, payload, RATIO_OFFERED * capacity, duration)
    finally:
        _stop(proc)
    result.capacity = capacity
    print_overload(result)
    return result


def scenario_shed(tmp: Path, width: int, depth: int, duration: float, shed_ms: int,
                  server_cpu: int | None) -> tuple[OverloadResult, OverloadResult]:
    """(run with shedding, run without), each at 2x the capacity measured just before it."""
    package = tmp / "compute"
    write_compute_bound_model(package, width, depth)
    without = _overload_phase(tmp, package, "no shedding", _no_shedding(), width, duration, server_cpu)
    shed_options = ["--shed-queue-wait-ms", str(shed_ms)]
    shed = _overload_phase(tmp, package, f"shed-queue-wait-ms {shed_ms}", shed_options, width, duration, server_cpu)
    if shed.rejected < 0.1 * shed.sent:
        # Capacity rose after it was measured (other jobs left the core): not an overload. Once more.
        print("  [shed] under 10% refused: the server was not overloaded after all; measuring again", flush=True)
        shed = _overload_phase(tmp, package, f"shed-queue-wait-ms {shed_ms}", shed_options, width, duration,
                               server_cpu)
    return shed, without


def scenario_switch(tmp: Path, width: int, depth: int, rate: float, moves: int, server_cpu: int | None) -> dict:
    """Move NAME@production between two versions `moves` times under open-loop load.

    Shedding is off: this measures the switch itself, and on a shared machine a dip in
    capacity must show as latency, not as refusals that would be counted as failures."""
    from vivace.registry.models import register_model, set_alias

    home = tmp / "home"
    for seed in (1, 2):
        write_compute_bound_model(tmp / f"v{seed}", width, depth, seed=seed)
        register_model(home, tmp / f"v{seed}", MODEL)
    set_alias(home, MODEL, 1, "production")
    port = _free_port()
    proc = _start(_serve_cmd([f"{MODEL}@production"], port, "--follow-interval", "0.1", *_no_shedding()),
                  server_cpu, port, tmp / "serve.log", env={"VIVACE_HOME": str(home)})
    gap = 1.0
    duration = gap * (moves + 1)
    targets = [2 if i % 2 == 0 else 1 for i in range(moves)]
    # A registry write (milliseconds of SQLite) runs on this thread; the generator's schedule holds.
    actions = {gap * (i + 1): (lambda v=v: set_alias(home, MODEL, v, "production")) for i, v in enumerate(targets)}
    try:
        _measure_capacity(port, infer_payload(port, width), MAX_BATCH, 0.5)  # warm-up
        outcomes = run_load(port, infer_payload(port, width), rate=rate, duration=duration, at=actions)
    finally:
        _stop(proc)
    by_version: dict[str, int] = {}
    for o in outcomes:
        if o.status == 200:
            by_version[o.version] = by_version.get(o.version, 0) + 1
    failed = [o for o in outcomes if o.status != 200]
    switches = sum(1 for a, b in itertools.pairwise(outcomes) if a.version and b.version and a.version != b.version)
    result = {"sent": len(outcomes), "failed": len(failed), "by_version": by_version, "moves": moves,
              "version_changes_seen": switches,
              "failures": sorted({(o.status, o.error, o.body[:80]) for o in failed})[:5]}
    print(f"  [switch] {moves} alias moves at {rate:.0f} req/s: sent {result['sent']}, failed {result['failed']}, "
          f"answered by version {dict(sorted(by_version.items()))}", flush=True)
    if failed:
        print(f"  [switch] failures: {result['failures']}", flush=True)
    return result


def scenario_drain(tmp: Path, width: int, depth: int, rate: float, server_cpu: int | None) -> dict:
    """SIGTERM after 2 s of open-loop load; the schedule goes on for 1 s after the signal.

    Shedding is off, as in the switch scenario: every request read before the signal must
    be answered 200."""
    package = tmp / "compute"
    if not package.exists():
        write_compute_bound_model(package, width, depth)
    port = _free_port()
    proc = _start(_serve_cmd([str(package)], port, *_no_shedding()), server_cpu, port, tmp / "serve.log")
    signalled = {}

    def terminate() -> None:
        signalled["at"] = time.monotonic()
        proc.send_signal(signal.SIGTERM)

    try:
        _measure_capacity(port, infer_payload(port, width), MAX_BATCH, 0.5)  # warm-up
        outcomes = run_load(port, infer_payload(port, width), rate=rate, duration=3.0, at={2.0: terminate})
        exit_code = proc.wait(timeout=30)
    finally:
        _stop(proc)
    before = [o for o in outcomes if o.sent and o.sent < signalled["at"]]
    after = [o for o in outcomes if not (o.sent and o.sent < signalled["at"])]
    failed_before = [o for o in before if o.status != 200]
    result = {
        "sent_before_signal": len(before),
        "answered_200_before_signal": len(before) - len(failed_before),
        "failed_before_signal": len(failed_before),
        "after_signal": len(after),
        "after_refused": sum(1 for o in after if o.error == "refused"),
        "after_503": sum(1 for o in after if o.status == 503),
        "after_200": sum(1 for o in after if o.status == 200),
        "after_lost": sum(1 for o in after if o.error == "lost"),
        "exit_code": exit_code,
        "failures": sorted({(o.status, o.error) for o in failed_before}),
    }
    print(f"  [drain] SIGTERM at 2 s of {rate:.0f} req/s: sent before {result['sent_before_signal']}, "
          f"answered 200 {result['answered_200_before_signal']}, failed {result['failed_before_signal']}; "
          f"after: {result['after_signal']} sent, {result['after_200']} answered 200 (accepted before close), "
          f"{result['after_refused']} connections refused, {result['after_503']} 503, "
          f"{result['after_lost']} closed unanswered; exit code {exit_code}", flush=True)
    if failed_before:
        print(f"  [drain] failures before the signal: {result['failures']}", flush=True)
    return result


def scenario_rows(tmp: Path, rows: int, ratio: float, frontends: list[str], shed_ms: int, duration: float,
                  server_cpu: int | None) -> dict[str, OverloadResult]:
    """Issue 12's overload repro, on each front end: the reference MLP with shedding at
    `shed_ms`, `rows`-row JSON requests, open loop at `ratio` x the capacity measured at c=8
    just before, new connections as needed up to 512."""
    from vivace.registry.reference_model import IN_FEATURES, write_reference_model

    package = tmp / "mlp"
    write_reference_model(package)
    results = {}
    for frontend in frontends:
        port = _free_port()
        cmd = _serve_cmd([str(package)], port, "--http-frontend", frontend, "--shed-queue-wait-ms", str(shed_ms))
        proc = _start(cmd, server_cpu, port, tmp / f"serve-{frontend}.log")
        payload = infer_payload(port, IN_FEATURES, "mlp", rows)
        try:
            capacity = _measure_capacity(port, payload, 8, 3.0)
            result = _overload_run(f"{frontend}, {rows} rows", port, proc.pid, payload, ratio * capacity, duration,
                                   max_connections=512)
        finally:
            _stop(proc)
        result.capacity = capacity
        print_overload(result)
        results[frontend] = result
    return results


# -- command --------------------------------------------------------------------------------

def register(subparsers) -> None:
    parser = subparsers.add_parser("overload", help="load shedding at 2x capacity, alias moves and SIGTERM under load")
    parser.add_argument("--scenario", default="shed,switch,drain",
                        help="comma-separated: shed, switch, drain, rows (issue 12's repro: --rows-per-request "
                        "rows at --offered x capacity on both front ends; not in the default set)")
    parser.add_argument("--rows-per-request", type=int, default=128, help="rows per request in the rows scenario")
    parser.add_argument("--offered", type=float, default=3.0,
                        help="offered load of the rows scenario, as a multiple of the c=8 capacity")
    parser.add_argument("--rows-shed-ms", type=int, default=20, help="--shed-queue-wait-ms of the rows scenario")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds of open-loop overload per run")
    parser.add_argument("--shed-queue-wait-ms", type=int, default=500,
                        help="queue wait above which the server refuses new requests in the shedding run")
    parser.add_argument("--width", type=int, default=1024, help="model width (Linear(W, W))")
    parser.add_argument("--depth", type=int, default=48, help="times the Linear layer is applied")
    parser.add_argument("--moves", type=int, default=6, help="alias moves in the switch scenario")
    parser.add_argument("--load-fraction", type=float, default=0.4,
                        help="offered load of the switch and drain scenarios, as a fraction of capacity")
    parser.add_argument("--server-cpu", type=int, default=0, help="core the server is pinned to (-1: none)")
    parser.add_argument("--client-cpu", type=int, default=1, help="core the load generator is pinned to (-1: none)")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    scenarios = [s.strip() for s in args.scenario.split(",") if s.strip()]
    unknown = set(scenarios) - {"shed", "switch", "drain", "rows"}
    if unknown:
        print(f"vivace bench overload: unknown scenario(s) {sorted(unknown)}; use shed, switch, drain, rows",
              file=sys.stderr)
        return 1
    server_cpu, client_cpu = pinned_cpus(args)
    if client_cpu is not None:
        os.sched_setaffinity(0, {client_cpu})
    print(f"vivace bench overload: model Linear({args.width},{args.width}) x{args.depth}, max batch {MAX_BATCH}, "
          f"server cpu {server_cpu}, client cpu {client_cpu}; {cpu_description()}", flush=True)
    started = time.monotonic()
    capacity = None
    with tempfile.TemporaryDirectory(prefix="vivace-overload-") as tmp_name:
        tmp = Path(tmp_name)
        if "rows" in scenarios:
            by_frontend = scenario_rows(tmp, args.rows_per_request, args.offered, ["native", "python"],
                                        args.rows_shed_ms, args.duration, server_cpu)
            for frontend, r in by_frontend.items():
                print(f"rows: {frontend} front end at {args.offered:g}x capacity ({r.capacity:.0f} req/s): goodput "
                      f"{r.admitted_rate / r.capacity:.0%} of capacity (target >= 90%), admitted p99 "
                      f"{r.admitted_ms[1]:.0f} ms = x{r.admitted_ms[1] / args.rows_shed_ms:.1f} the shed budget "
                      f"(target <= 3x), refusals p50 {r.rejected_ms[0]:.1f} ms; unanswered {r.unanswered}")
        if "shed" in scenarios:
            shed, without = scenario_shed(tmp, args.width, args.depth, args.duration, args.shed_queue_wait_ms,
                                          server_cpu)
            capacity = min(shed.capacity, without.capacity)
            print(f"shed: at {RATIO_OFFERED:g}x capacity ({shed.capacity:.0f} and {without.capacity:.0f} req/s), "
                  "admitted p99 with shedding / without: "
                  f"{shed.admitted_ms[1]:.0f} / {without.admitted_ms[1]:.0f} ms = "
                  f"x{shed.admitted_ms[1] / without.admitted_ms[1]:.3f}; peak RSS {shed.rss_mib[2]:.0f} vs "
                  f"{without.rss_mib[2]:.0f} MiB; 503 {100 * shed.rejected / max(shed.sent, 1):.0f}% "
                  f"(retry-after on {shed.rejected_with_retry_after}/{shed.rejected}); "
                  f"unanswered {shed.unanswered} + {without.unanswered}")
        if ("switch" in scenarios or "drain" in scenarios) and capacity is None:
            package = tmp / "compute"
            write_compute_bound_model(package, args.width, args.depth)
            port = _free_port()
            proc = _start(_serve_cmd([str(package)], port, *_no_shedding()), server_cpu, port, tmp / "serve.log")
            try:
                capacity = _measure_capacity(port, infer_payload(port, args.width), 4 * MAX_BATCH, 2.0)
            finally:
                _stop(proc)
            print(f"  capacity (closed loop, {4 * MAX_BATCH} clients): {capacity:.0f} req/s", flush=True)
        if "switch" in scenarios:
            switch = scenario_switch(tmp, args.width, args.depth, capacity * args.load_fraction, args.moves, server_cpu)
            print(f"switch: {switch['moves']} moves of {MODEL}@production under load: {switch['sent']} sent, "
                  f"{switch['failed']} failed")
        if "drain" in scenarios:
            drain = scenario_drain(tmp, args.width, args.depth, capacity * args.load_fraction, server_cpu)
            print(f"drain: SIGTERM under load: {drain['failed_before_signal']} of {drain['sent_before_signal']} "
                  f"requests sent before the signal failed; exit code {drain['exit_code']}")
    print(f"(total {time.monotonic() - started:.0f} s; machine shared with other jobs: compare ratios, not absolutes)")
    return 0
