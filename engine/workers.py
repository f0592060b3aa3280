"""`vivace serve --workers N`: a supervisor process and N worker processes on one port.

Every worker is a fresh interpreter (`python -m vivace.engine.workers RUN_DIR INDEX PID`:
nothing is forked after torch is imported) that runs the ordinary single-process server on
the same host:port; SO_REUSEPORT lets the kernel spread new connections across them. The
supervisor keeps its own SO_REUSEPORT socket bound (not listening, so it receives no
connections) to hold the port, which is how `--port 0` gives every worker the same port.

The supervisor
- restarts a worker that exits (crash, SIGKILL, OOM) after a backoff, with a log line;
- kills (then restarts) a worker whose event loop stopped turning: the loop touches a
  heartbeat file every second, and one unchanged for longer than --execution-timeout
  (at least 3 s) on the supervisor's monotonic clock means a batch run inline, or
  anything else, has blocked it;
- gives up when a worker fails `MAX_FAST_FAILURES` times in a row soon after its start (a
  crash loop: a broken package, a port in use), stops the others and exits 1;
- forwards SIGTERM/SIGINT to the workers, which drain, and exits 0 when all exit 0.
Workers ask the kernel to SIGKILL them when the supervisor dies (PR_SET_PDEATHSIG), so a
killed supervisor leaves nothing running. Metrics are shared through the run directory
(see vivace.monitor.multiproc), which the supervisor creates and removes.
"""
from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vivace.errors import VivaceCLIError
from vivace.monitor.logs import configure_logging
from vivace.monitor.multiproc import SnapshotError, heartbeat_path, retire_worker

from .options import ServeOptions

log = logging.getLogger("vivace.workers")

MAX_FAST_FAILURES = 5        # consecutive early exits of one worker before giving up
FAST_FAILURE_S = 10.0        # an exit this soon after the start counts as early
BACKOFF_S = (0.25, 8.0)      # first restart delay, doubling up to the cap
STOP_GRACE_S = 10.0          # beyond --drain-timeout, before stragglers get SIGKILL
OPTIONS_FILE = "options.json"
PR_SET_PDEATHSIG = 1
HEARTBEAT_GRACE_S = 3.0      # the least silence that counts as blocked: 3 missed beats


@dataclass
class Worker:
    index: int
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    beat_mtime: float = 0.0  # the heartbeat file's mtime when last seen to change
    beat_seen_at: float = 0.0  # time.monotonic() then: wall-clock steps cannot fake silence
    serving: bool = False  # its loop has beaten since this start
    fast_failures: int = 0
    restart_at: float | None = None


class CrashLoop(RuntimeError):
    """A worker kept failing right after its start."""


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) an SO_REUSEPORT socket on host:port, holding the port for
    the workers; port 0 picks a free one. Raises OSError when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot bind {host}:{port} for the workers: {exc.strerror}") from None
    return sock


RUN_DIR_PREFIX = "vivace-serve-"


def _run_dir() -> Path:
    """A private directory for this supervisor's workers, named after its pid; run
    directories of supervisors that were killed (no cleanup) are removed on the way."""
    # tmpfs when there is one: snapshots are rewritten every second by every worker.
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    for stale in base.glob(f"{RUN_DIR_PREFIX}*-*"):
        pid = stale.name[len(RUN_DIR_PREFIX):].split("-", 1)[0]
        try:
            if not pid.isdigit() or stale.stat().st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except OSError:  # vanished meanwhile, or a live process of another user
            continue
    return Path(tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-", dir=base))


class Supervisor:
    """Runs `options.workers` workers serving `options` until a signal or a crash loop."""

    def __init__(self, options: ServeOptions):
        self.options = options
        self.server = options.server
        self.workers = [Worker(i) for i in range(options.workers)]
        self.stopping: int | None = None  # the signal that asked us to stop
        self.run_dir: Path | None = None  # created by run(), removed when it returns

    def run(self) -> int:
        sock = reserve_port(self.server.host, self.server.port)
        self.run_dir = _run_dir()
        try:
            self.server.port = sock.getsockname()[1]
            (self.run_dir / OPTIONS_FILE).write_bytes(self.options.to_json())
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, self._on_signal)
            for worker in self.workers:
                self._start(worker)
            scheme = "https" if self.server.tls_cert else "http"
            print(f"vivace: {len(self.workers)} workers serving on {scheme}://{self.server.host}:{self.server.port} "
                  f"(supervisor pid {os.getpid()})", flush=True)
            try:
                self._watch()
            except CrashLoop:
                self._stop_all(signal.SIGTERM)
                raise
            return self._stop_all(self.stopping)
        finally:
            sock.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _on_signal(self, signum: int, frame) -> None:
        self.stopping = signum

    def _start(self, worker: Worker) -> None:
        cmd = [sys.executable, "-m", "vivace.engine.workers", str(self.run_dir), str(worker.index), str(os.getpid())]
        worker.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        worker.started_at = time.monotonic()
        worker.beat_mtime, worker.beat_seen_at, worker.serving = self._beat_mtime(worker), worker.started_at, False
        worker.restart_at = None
        log.info("worker %d started (pid %d)", worker.index, worker.process.pid)

    def _watch(self) -> None:
        while self.stopping is None:
            now = time.monotonic()
            for worker in self.workers:
                if worker.process is not None and worker.process.poll() is not None:
                    self._exited(worker, now)
                elif worker.process is not None and self._blocked(worker):
                    worker.process.kill()
                    worker.process.wait()  # SIGKILL cannot be ignored: this returns at once
                    self._exited(worker, now)
                elif worker.restart_at is not None and now >= worker.restart_at:
                    self._start(worker)
            time.sleep(0.05)  # a signal interrupts the sleep; the loop then sees `stopping`

    def _beat_mtime(self, worker: Worker) -> float:
        try:
            return heartbeat_path(self.run_dir, worker.index).stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def _blocked(self, worker: Worker) -> bool:
        """The worker has served (its heartbeat changed since its start) but its event loop
        has not touched the heartbeat for longer than the execution timeout."""
        now, mtime = time.monotonic(), self._beat_mtime(worker)
        if mtime != worker.beat_mtime:  # a beat since the last look (the first: it serves)
            worker.beat_mtime, worker.beat_seen_at, worker.serving = mtime, now, True
            return False
        if not worker.serving:  # still loading its models
            return False
        silent = now - worker.beat_seen_at
        if silent <= max(self.server.execution_timeout_s, HEARTBEAT_GRACE_S):
            return False
        log.error("worker %d (pid %d): its event loop has been blocked for %.1f s (--execution-timeout %g); "
                  "killing it", worker.index, worker.process.pid, silent, self.server.execution_timeout_s)
        return True

    def _exited(self, worker: Worker, now: float) -> None:
        process, worker.process = worker.process, None
        status = _describe(process.returncode)
        try:
            retire_worker(self.run_dir, worker.index, process.pid)
        except (SnapshotError, OSError) as exc:  # metrics must never take the supervisor down
            log.warning("worker %d: its last counts are lost from /metrics: %s", worker.index, exc)
        worker.fast_failures = worker.fast_failures + 1 if now - worker.started_at < FAST_FAILURE_S else 0
        if worker.fast_failures >= MAX_FAST_FAILURES:
            raise CrashLoop(f"worker {worker.index} {status} {worker.fast_failures} times in a row within "
                            f"{FAST_FAILURE_S:g} s of starting: giving up (crash loop; see the worker's errors above)")
        delay = min(BACKOFF_S[0] * 2 ** max(0, worker.fast_failures - 1), BACKOFF_S[1])
        worker.restart_at = now + delay
        log.warning("worker %d (pid %d) %s; restarting in %.2f s", worker.index, process.pid, status, delay)

    def _stop_all(self, signum: int | None) -> int:
        """Forward `signum` (SIGTERM when None), wait for the drain; 0 when every worker stopped
        cleanly: exit status 0, or ended by that signal before it had started serving."""
        signum = signum or signal.SIGTERM
        clean = (0, -signum, 128 + signum)
        running = [w.process for w in self.workers if w.process is not None]
        for process in running:
            process.send_signal(signum)
        deadline = time.monotonic() + self.server.drain_timeout + STOP_GRACE_S
        failed = 0
        for process in running:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker pid %d did not finish draining; killing it", process.pid)
                process.kill()
                process.wait()
            if process.returncode not in clean:
                failed += 1
                log.error("worker pid %d %s while stopping", process.pid, _describe(process.returncode))
        if failed:
            return 1
        log.info("all %d workers stopped", len(self.workers))
        return 0


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def supervise(options: ServeOptions) -> int:
    """Serve `options` with `options.workers` worker processes."""
    if not sys.platform.startswith("linux"):
        raise VivaceCLIError("--workers needs Linux (SO_REUSEPORT load balancing, PR_SET_PDEATHSIG)")
    configure_logging(options.log_level, options.log_format, role="supervisor")
    try:
        return Supervisor(options).run()
    except CrashLoop as exc:
        print(f"vivace serve: error: {exc}", file=sys.stderr, flush=True)
        return 1


def _die_with_parent(parent_pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the supervisor died before prctl took effect
        sys.exit(1)


def worker_main(run_dir: Path, index: int, parent_pid: int) -> int:
    """One worker: the ordinary server, publishing its metrics to `run_dir`."""
    _die_with_parent(parent_pid)
    options = ServeOptions.from_json((run_dir / OPTIONS_FILE).read_bytes())
    options.worker_index = index
    # Configured before run() configures it, which then leaves it alone: lines name the worker.
    configure_logging(options.log_level, options.log_format, role=f"worker {index}")
    from vivace.monitor.metrics import share_across_workers

    from .serving import run

    share_across_workers(run_dir, index)
    try:
        return run(options)
    except KeyboardInterrupt:  # Ctrl-C reached the worker before its server handled signals
        return 128 + signal.SIGINT
    except (VivaceCLIError, ValueError, OSError, RuntimeError) as exc:
        if os.environ.get("VIVACE_DEBUG"):
            raise
        print(f"vivace serve [worker {index}]: error: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(worker_main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
