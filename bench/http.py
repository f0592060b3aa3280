"""`vivace bench http`: Vivace against the FastAPI baseline, same model, same load, same run.

Both servers serve the reference MLP (one row per request, OIP JSON body); Vivace also
serves it converted by `vivace quantize` to its native fp32 kernel (same numbers to 1e-7). Each is
started pinned to one core and driven by wrk (Lua POST script) pinned to another, at each
concurrency; perf_analyzer (binary tensors) runs too when it is installed. Printed per
server and concurrency: req/s, p50/p99 latency, server CPU time per request (a figure that
holds up on a shared machine), and the Vivace/baseline ratios.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .drift import cpu_description

LUA = Path(__file__).with_name("data") / "infer_mlp.lua"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    server: str
    tool: str
    concurrency: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us_per_request: float
    extra: dict = field(default_factory=dict)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before becoming ready")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"server at {url} not ready after {timeout} s")


def _start(cmd: list[str], cpu: int | None, port: int) -> subprocess.Popen:
    preexec = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, preexec_fn=preexec, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", proc)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _latency_ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def run_wrk(port: int, concurrency: int, duration: float, cpu: int | None, pid: int, server: str,
            path: str = "/v2/models/mlp/infer", lua: Path = LUA) -> Result:
    url = f"http://127.0.0.1:{port}{path}"
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--latency", "-s", str(lua), url]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    cpu_before = _cpu_seconds(pid)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=duration + 60).stdout
    cpu_used = _cpu_seconds(pid) - cpu_before
    if not re.search(r"^\s+50%\s+[\d.]+(us|ms|s)$", out, re.M) or "requests in" not in out:
        raise RuntimeError(f"unexpected wrk output against {server}:\n{out}")
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    errors += sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return Result(
        server=server,
        tool="wrk",
        concurrency=concurrency,
        requests_per_s=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        # Anchored: "+/- Stdev" columns such as "69.50%" also contain "50%".
        p50_ms=_latency_ms(re.search(r"^\s+50%\s+(\S+)$", out, re.M).group(1)),
        p99_ms=_latency_ms(re.search(r"^\s+99%\s+(\S+)$", out, re.M).group(1)),
        errors=errors,
        cpu_us_per_request=cpu_used / max(total, 1) * 1e6,
    )


def _perf_analyzer_env() -> dict[str, str] | None:
    if shutil.which("perf_analyzer") is None:
        return None
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime as cuda_runtime  # its libcudart lets perf_analyzer start without a GPU

        lib = str(Path(list(cuda_runtime.__path__)[0]) / "lib")
        env["LD_LIBRARY_PATH"] = f"{lib}:{env.get('LD_LIBRARY_PATH', '')}"
    except ImportError:
        pass
    return env


def run_perf_analyzer(port: int, concurrency: int, duration: float, cpu: int | None, pid: int, server: str,
                      env: dict[str, str], tensor_format: str) -> Result | None:
    cmd = ["perf_analyzer", "-m", "mlp", "-u", f"127.0.0.1:{port}", "-i", "http",
           "--concurrency-range", str(concurrency), "--measurement-interval", str(int(duration * 1000)),
           "--input-tensor-format", tensor_format, "--output-tensor-format", tensor_format,
           # A loaded 2-core machine rarely holds the default 10% for three windows.
           "--stability-percentage", "25", "--max-trials", "6"]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    cpu_before = _cpu_seconds(pid)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=duration * 8 + 60)
    except subprocess.TimeoutExpired:
        print(f"  perf_analyzer against {server} found no stable measurement in time", file=sys.stderr)
        return None
    cpu_used = _cpu_seconds(pid) - cpu_before
    out = proc.stdout
    if proc.returncode != 0 or "Throughput" not in out:
        print(f"  perf_analyzer against {server} failed: {(out + proc.stderr).strip()[-300:]}", file=sys.stderr)
        return None
    count = int(re.search(r"Request count: (\d+)", out).group(1))
    return Result(
        server=server,
        tool=f"perf_analyzer/{tensor_format}",
        concurrency=concurrency,
        requests_per_s=float(re.search(r"Throughput: ([\d.]+) infer/sec", out).group(1)),
        p50_ms=int(re.search(r"p50 latency: (\d+) usec", out).group(1)) / 1000,
        p99_ms=int(re.search(r"p99 latency: (\d+) usec", out).group(1)) / 1000,
        errors=0,
        # perf_analyzer repeats measurement windows until stable: CPU over all of them.
        cpu_us_per_request=cpu_used / max(count, 1) * 1e6,
    )


def benchmark(duration: float, concurrencies: list[int], server_cpu: int | None, client_cpu: int | None,
              baseline: bool, perf_analyzer: bool, native: bool, pa_concurrencies: list[int] = (8,),
              port: int = 18000, auth: bool = False, python_frontend: bool = False) -> list[Result]:
    from vivace.registry.reference_model import write_reference_model

    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="vivace-bench-") as tmp:
        package = Path(tmp) / "mlp"
        write_reference_model(package)
        serve = [sys.executable, "-m", "vivace.cli", "serve", "--log-level", "WARNING"]
        servers = [("vivace", [*serve, str(package), "--port", str(port)], LUA)]
        if auth:
            # The same server with bearer authentication on: every request carries a token.
            from vivace.engine.auth import TokenStore

            tokens = Path(tmp) / "tokens.json"
            token = TokenStore(tokens).create("bench", ["infer"])
            lua = Path(tmp) / "infer_auth.lua"
            lua.write_text(LUA.read_text() + f'wrk.headers["Authorization"] = "Bearer {token}"\n')
            servers.append(("vivace-auth", [*serve, str(package), "--port", str(port + 3), "--auth-tokens",
                                            str(tokens)], lua))
        if native:
            # The same model converted with `vivace quantize` (fp32: no accuracy change).
            native_package = Path(tmp) / "mlp-native"
            subprocess.run([sys.executable, "-m", "vivace.cli", "quantize", str(package),
                            "--out", str(native_package)], check=True, capture_output=True)
            servers.append(("vivace-native", [*serve, str(native_package), "--port", str(port + 2)], LUA))
        if python_frontend:
            # The same packages through the Python front end (uvloop + httptools), which
            # serves TLS and auth: what the native front end adds, in the same run.
            servers += [(f"{name}-pyfe", [*cmd, "--http-frontend", "python"], script)
                        for name, cmd, script in list(servers) if name in ("vivace", "vivace-native")]
        if baseline:
            servers.append(("fastapi", [sys.executable, "-m", "vivace.bench.baselines.fastapi_server",
                                        str(package), "--port", str(port + 1)], LUA))
        pa_env = _perf_analyzer_env() if perf_analyzer else None
        for name, cmd, lua in servers:
            server_port = int(cmd[cmd.index("--port") + 1])
            proc = _start(cmd, server_cpu, server_port)
            try:
                run_wrk(server_port, 16, 1.0, client_cpu, proc.pid, name, lua=lua)  # warm-up
                for c in concurrencies:
                    try:
                        result = run_wrk(server_port, c, duration, client_cpu, proc.pid, name, lua=lua)
                    except RuntimeError as exc:
                        print(f"  {exc}", file=sys.stderr)
                        continue
                    results.append(result)
                    print_result(result)
                    if pa_env is not None and c in pa_concurrencies:
                        # The baseline only speaks JSON tensors; Vivace is measured both ways.
                        for fmt in (["json"] if name == "fastapi" else ["binary", "json"]):
                            pa = run_perf_analyzer(server_port, c, duration / 2, client_cpu, proc.pid, name, pa_env, fmt)
                            if pa:
                                results.append(pa)
                                print_result(pa)
            finally:
                _stop(proc)
    return results


class OtlpSink:
    """A stand-in OTLP/HTTP collector on 127.0.0.1: accepts POST /v1/traces (200; 404 for
    another path), counts the exports and their bytes and hands each body to `on_export`
    (one at a time; the bench discards them, tests decode them). Its threads run on `cpu`
    when given (the bench: the client's core, not the server's; a real collector runs
    elsewhere)."""

    def __init__(self, cpu: int | None = None, on_export: Callable[[bytes], None] | None = None):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        sink = self
        lock = threading.Lock()
        self.posts = 0
        self.bytes = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                with lock:
                    sink.posts += 1
                    sink.bytes += len(body)
                    if on_export is not None:
                        on_export(body)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

        def serve() -> None:
            if cpu is not None:  # the handler threads inherit this thread's CPUs
                os.sched_setaffinity(0, {cpu})
            self.server.serve_forever()

        threading.Thread(target=serve, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def trace_overhead(duration: float, concurrencies: list[int], rounds: int, server_cpu: int | None,
                   client_cpu: int | None, ratio: float = 0.01, port: int = 18010, native_kernel: bool = True) -> list[str]:
    """Tracing's cost on the native front end: the same package served twice at once,
    tracing off and on (`ratio` of the requests sampled, spans exported over OTLP/HTTP to
    a local sink), measured in interleaved rounds. One comparison line per concurrency."""
    from vivace.registry.reference_model import write_reference_model

    results: dict = {}
    sink = OtlpSink(client_cpu)
    procs: dict[str, tuple[int, subprocess.Popen]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="vivace-bench-trace-") as tmp:
            package = Path(tmp) / "mlp"
            write_reference_model(package)
            if native_kernel:
                native_package = Path(tmp) / "mlp-native"
                subprocess.run([sys.executable, "-m", "vivace.cli", "quantize", str(package),
                                "--out", str(native_package)], check=True, capture_output=True)
                package = native_package
            serve = [sys.executable, "-m", "vivace.cli", "serve", str(package), "--log-level", "WARNING",
                     "--http-frontend", "native"]
            for name, offset, extra in (("trace-off", 0, []),
                                        ("trace-on", 1, ["--trace-endpoint", sink.url, "--trace-sample-ratio",
                                                         f"{ratio:g}"])):
                procs[name] = (port + offset, _start([*serve, "--port", str(port + offset), *extra], server_cpu,
                                                     port + offset))
            interleaved_rounds(procs, concurrencies, rounds, duration, client_cpu, results)
    finally:
        for _, proc in procs.values():
            _stop(proc)
        sink.close()
    lines = [f"wrk c={c}: tracing on at {ratio:g} sampling / off, native front end: "
             + compare_rounds(results[("trace-on", c)], results[("trace-off", c)]) for c in concurrencies]
    lines.append(f"(the OTLP sink received {sink.posts} exports, {sink.bytes} bytes)")
    return lines


def interleaved_rounds(procs: dict[str, tuple[int, subprocess.Popen]], concurrencies: list[int], rounds: int,
                       duration: float, client_cpu: int | None, results: dict) -> None:
    """wrk against running servers ({name: (port, process)}) in turn, round after round,
    so that a change in the machine's load hits each alike; appends each Result to
    results[(name, concurrency)] and prints it."""
    for name, (port, proc) in procs.items():
        run_wrk(port, 16, 1.0, client_cpu, proc.pid, name, lua=LUA)  # warm-up
    for r in range(rounds):
        for c in concurrencies:
            for name, (port, proc) in procs.items():
                result = run_wrk(port, c, duration, client_cpu, proc.pid, name, lua=LUA)
                results.setdefault((name, c), []).append(result)
                print(f"  round {r + 1} {name:12s} c={c:<3d} {result.requests_per_s:9.0f} req/s  "
                      f"p99 {result.p99_ms:7.3f} ms  cpu {result.cpu_us_per_request:6.1f} us/req  "
                      f"errors {result.errors}", flush=True)


def compare_rounds(mine: list[Result], peer: list[Result]) -> str:
    """One line comparing two servers measured in the same interleaved rounds: the median
    of the rounds' throughput ratios (and each), median req/s, p99 and CPU per request."""
    import statistics

    def median(results: list[Result], field: str) -> float:
        return statistics.median(getattr(r, field) for r in results)

    ratios = [m.requests_per_s / p.requests_per_s for m, p in zip(mine, peer)]
    return (f"throughput x{statistics.median(ratios):.2f} median (rounds {', '.join(f'{x:.2f}' for x in ratios)}); "
            f"req/s {median(mine, 'requests_per_s'):.0f} vs {median(peer, 'requests_per_s'):.0f}; "
            f"p99 {median(mine, 'p99_ms'):.2f} vs {median(peer, 'p99_ms'):.2f} ms; CPU per request "
            f"{median(mine, 'cpu_us_per_request'):.1f} vs {median(peer, 'cpu_us_per_request'):.1f} us; "
            f"errors {sum(m.errors for m in mine)} vs {sum(p.errors for p in peer)}")


def print_result(r: Result) -> None:
    print(f"  {r.server:8s} {r.tool:20s} c={r.concurrency:<3d} {r.requests_per_s:10.0f} req/s  "
          f"p50 {r.p50_ms:7.3f} ms  p99 {r.p99_ms:7.3f} ms  cpu {r.cpu_us_per_request:6.1f} us/req  errors {r.errors}",
          flush=True)


def summarize(results: list[Result]) -> list[str]:
    lines = []
    by_key = {(r.server, r.tool, r.concurrency): r for r in results}
    for (server, tool, c), r in sorted(by_key.items()):
        if server == "fastapi":
            continue
        base = by_key.get(("fastapi", tool, c)) or by_key.get(("fastapi", "perf_analyzer/json", c))
        if base is None or tool != base.tool:
            continue
        lines.append(
            f"{tool} c={c}: {server} {r.requests_per_s:.0f} req/s (p99 {r.p99_ms:.2f} ms) vs fastapi "
            f"{base.requests_per_s:.0f} req/s (p99 {base.p99_ms:.2f} ms): "
            f"throughput x{r.requests_per_s / base.requests_per_s:.1f}, "
            f"CPU per request x{base.cpu_us_per_request / r.cpu_us_per_request:.1f} less"
        )
    for (server, tool, c), r in sorted(by_key.items()):
        python_fe = by_key.get((f"{server}-pyfe", tool, c))
        if python_fe is not None:
            lines.append(
                f"{tool} c={c}: {server} native / Python front end: throughput "
                f"x{r.requests_per_s / python_fe.requests_per_s:.2f}, CPU per request "
                f"x{python_fe.cpu_us_per_request / r.cpu_us_per_request:.2f} less"
            )
        plain = by_key.get(("vivace", tool, c))
        if server == "vivace-auth" and plain is not None:
            lines.append(
                f"{tool} c={c}: bearer auth on / off: throughput x{r.requests_per_s / plain.requests_per_s:.2f}, "
                f"CPU per request {r.cpu_us_per_request - plain.cpu_us_per_request:+.1f} us"
            )
    return lines


def add_load_options(parser, duration: float) -> None:
    """The options every HTTP load benchmark shares: duration, concurrency, core pinning."""
    parser.add_argument("--duration", type=float, default=duration, help="seconds per measurement")
    parser.add_argument("--concurrency", default="8,64", help="comma-separated connection counts")
    parser.add_argument("--server-cpu", type=int, default=0, help="core the server is pinned to (-1: none)")
    parser.add_argument("--client-cpu", type=int, default=1, help="core the load generator is pinned to (-1: none)")


def pinned_cpus(args) -> tuple[int | None, int | None]:
    """(server core, load-generator core), each None when not pinnable on this machine."""
    cpus = os.sched_getaffinity(0)

    def pick(cpu: int) -> int | None:
        return cpu if cpu >= 0 and cpu in cpus else None

    return pick(args.server_cpu), pick(args.client_cpu)


def register(subparsers) -> None:
    parser = subparsers.add_parser("http", help="HTTP throughput/latency: Vivace vs a FastAPI baseline")
    add_load_options(parser, duration=10.0)
    parser.add_argument("--no-baseline", action="store_true", help="measure Vivace only")
    parser.add_argument("--no-perf-analyzer", action="store_true", help="wrk only")
    parser.add_argument("--pa-concurrency", default="8",
                        help="concurrencies perf_analyzer measures too (at 64 it rarely stabilises on 2 cores)")
    parser.add_argument("--no-native", action="store_true",
                        help="skip the native fp32 package (the same model through vivace quantize)")
    parser.add_argument("--auth", action="store_true",
                        help="also measure Vivace with bearer-token authentication on (vivace-auth)")
    parser.add_argument("--python-frontend", action="store_true",
                        help="also measure each Vivace package through the Python front end (-pyfe)")
    parser.add_argument("--trace", action="store_true",
                        help="only measure OpenTelemetry tracing's cost: the native package served with tracing "
                        "off and on (--trace-sample-ratio, spans sent to a local OTLP sink), in interleaved rounds")
    parser.add_argument("--trace-sample-ratio", type=float, default=0.01, help="with --trace: the sampling ratio")
    parser.add_argument("--rounds", type=int, default=5, help="with --trace: interleaved rounds")
    parser.add_argument("--json", dest="json_out", help="write the results as JSON to this file")
    parser.set_defaults(func=_run)


def wrk_missing(bench: str) -> bool:
    """True (after saying so) when wrk, the load generator of the HTTP benchmarks, is absent."""
    if shutil.which("wrk") is not None:
        return False
    print(f"vivace bench {bench}: wrk is not installed (apt-get install wrk)", file=sys.stderr)
    return True


def _run(args) -> int:
    if wrk_missing("http"):
        return 1
    if args.trace:
        server_cpu, client_cpu = pinned_cpus(args)
        concurrencies = [int(c) for c in args.concurrency.split(",")]
        print(f"vivace bench http --trace: {args.rounds} rounds of {args.duration:g} s, server cpu {server_cpu}, "
              f"client cpu {client_cpu}; {cpu_description()}")
        for line in trace_overhead(args.duration, concurrencies, args.rounds, server_cpu, client_cpu,
                                   args.trace_sample_ratio, native_kernel=not args.no_native):
            print(line)
        return 0
    if not args.no_baseline:
        try:
            import fastapi  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError:
            print("vivace bench http: the baseline needs fastapi and uvicorn (pip install 'vivace[bench]')",
                  file=sys.stderr)
            return 1
    server_cpu, client_cpu = pinned_cpus(args)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    print(f"vivace bench http: {args.duration:g} s per point, server cpu {server_cpu}, client cpu {client_cpu}; "
          f"{cpu_description()}")
    results = benchmark(args.duration, concurrencies, server_cpu, client_cpu,
                        baseline=not args.no_baseline, perf_analyzer=not args.no_perf_analyzer,
                        native=not args.no_native, auth=args.auth, python_frontend=args.python_frontend,
                        pa_concurrencies=[int(c) for c in args.pa_concurrency.split(",")])
    for line in summarize(results):
        print(line)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0
