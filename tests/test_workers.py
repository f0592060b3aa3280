"""`vivace serve --workers N`: a real supervisor and real worker processes on loopback.

One two-worker server is shared by the tests in order: requests spread across workers and
/metrics sums them; SIGKILL of a worker is survived; SIGTERM stops everything with status 0.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import free_port, wait_for

BODY = json.dumps({"inputs": [{"name": "input__0", "shape": [1, 32], "datatype": "FP32", "data": [0.1] * 32}]})


def process_state(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) from /proc, or None once the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid = stat.rsplit(")", 1)[1].split()[:2]
    return state, int(ppid)


def children(pid: int) -> list[int]:
    """Live (non-zombie) child processes of `pid`."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            state = process_state(int(entry))
            if state is not None and state[1] == pid and state[0] != "Z":
                out.append(int(entry))
    return out


def worker_index(pid: int) -> int | None:
    """The index argument of `python -m vivace.engine.workers RUN_DIR INDEX PARENT`, or
    None for a process that is exiting (its command line is already gone)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if b"vivace.engine.workers" not in argv:
        return None
    return int(argv[argv.index(b"vivace.engine.workers") + 2])


def alive(pid: int) -> bool:
    state = process_state(pid)
    return state is not None and state[0] != "Z"


class Supervised:
    """`vivace serve --workers N --port 0`, its port read from the line it prints."""

    def __init__(self, packages: list, workers: int, log: Path, *extra: str):
        cmd = [sys.executable, "-m", "vivace.cli", "serve", *map(str, packages), "--workers", str(workers),
               "--port", "0", "--log-level", "WARNING", *extra]
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log, "wb"), text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else ""
        match = re.search(r"serving on http://127\.0\.0\.1:(\d+)", line)
        if match is None:
            self.proc.kill()
            raise AssertionError(f"no port announced: {line!r} {log.read_text()[-2000:]}")
        self.port = int(match.group(1))
        self.answered = 0  # inference requests answered 200, over all tests

    def request(self, method: str, path: str, body: str | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)  # a fresh connection each time
        try:
            conn.request(method, path, body)
            response = conn.getresponse()
            self.answered += method == "POST" and response.status == 200
            return response.status, response.read()
        finally:
            conn.close()

    def metrics(self) -> dict[str, float]:
        status, text = self.request("GET", "/metrics")
        assert status == 200
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.decode().splitlines() if line and not line.startswith("#")}

    def workers(self) -> dict[int, int]:
        """worker index -> pid of the live workers."""
        pids = {worker_index(pid): pid for pid in children(self.proc.pid)}
        pids.pop(None, None)
        return pids


SUCCESS = 'vivace_request_success_total{model="mlp",version="1"}'
START = 'vivace_process_start_time_seconds{worker="%d"}'


@pytest.fixture(scope="module")
def supervised(mlp_package, tmp_path_factory):
    server = Supervised([mlp_package], 2, tmp_path_factory.mktemp("workers") / "serve.log")
    # Both workers published their metrics: their models are loaded and they are listening.
    def started() -> bool:
        try:
            return all(START % i in server.metrics() for i in (0, 1))
        except OSError:  # no worker listens yet
            return False

    try:
        wait_for(started, 60, "both workers to start")
        yield server
    finally:
        if server.proc.poll() is None:  # a failed test: the workers die with their supervisor
            server.proc.kill()
            server.proc.wait()


def test_requests_spread_across_workers_and_metrics_sum_them(supervised):
    statuses = [supervised.request("POST", "/v2/models/mlp/infer", BODY)[0] for _ in range(40)]
    assert statuses == [200] * 40
    # Snapshots refresh about once a second: poll until every worker's share is visible.
    metrics = wait_for(lambda: (m := supervised.metrics()).get(SUCCESS) == 40 and m, 20, "totals to reach 40")
    per_worker = {i: metrics['vivace_worker_request_success_total{worker="%d"}' % i] for i in (0, 1)}
    assert sum(per_worker.values()) == 40 and all(per_worker.values()), per_worker
    assert metrics['vivace_batch_size_count{model="mlp",version="1"}'] == metrics[
        'vivace_execution_count_total{model="mlp",version="1"}']
    assert metrics['vivace_model_ready{model="mlp",version="1"}'] == 1
    assert all('vivace_process_resident_memory_bytes{worker="%d"}' % i in metrics for i in (0, 1))
    # Triton's statistics extension answers for the whole server too.
    status, body = supervised.request("GET", "/v2/models/mlp/stats")
    stats = json.loads(body)["model_stats"][0]
    assert status == 200 and stats["inference_stats"]["success"]["count"] == 40
    assert stats["inference_count"] == 40 and stats["inference_stats"]["queue"]["ns"] > 0


def test_sigkilled_worker_is_restarted_and_new_connections_succeed(supervised):
    before = supervised.workers()
    assert sorted(before) == [0, 1]
    victim = before[0]
    old_start = supervised.metrics()[START % 0]
    # What /metrics shows was published by the workers: it survives the kill.
    shown_before = wait_for(lambda: (m := supervised.metrics()).get(SUCCESS, 0) == supervised.answered and m,
                            20, "totals to catch up")[SUCCESS]
    counts = {"ok": 0, "failed": 0}
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                ok = supervised.request("POST", "/v2/models/mlp/infer", BODY)[0] == 200
            except OSError:
                ok = False
            counts["ok" if ok else "failed"] += 1

    thread = threading.Thread(target=load)
    thread.start()
    try:
        wait_for(lambda: counts["ok"] >= 20, 30, "load to run")
        os.kill(victim, signal.SIGKILL)
        # A zombie has closed its sockets: the kernel no longer routes connections to it.
        wait_for(lambda: not alive(victim), 30, "the worker to die")
    finally:
        stop.set()
        thread.join(30)
    # Only the request in flight on the killed worker may fail; the other worker takes the rest.
    assert counts["failed"] <= 1, counts
    restarted = wait_for(lambda: (w := supervised.workers()).get(0) not in (None, victim) and w, 30, "a restart")
    assert restarted[1] == before[1]
    wait_for(lambda: supervised.metrics().get(START % 0, old_start) != old_start, 60, "the new worker to serve")
    # Once it serves, every new connection is answered, whichever worker the kernel picks.
    assert [supervised.request("POST", "/v2/models/mlp/infer", BODY)[0] for _ in range(20)] == [200] * 20
    assert "worker 0 (pid %d) was killed by SIGKILL; restarting" % victim in supervised.log.read_text()
    # The killed worker's counts up to its last snapshot are kept: totals never go back;
    # only what it answered after its last snapshot (about a second) may be missing.
    totals = []
    wait_for(lambda: totals.append(supervised.metrics()[SUCCESS]) or totals[-1] >= shown_before + 20, 20, "totals")
    assert totals == sorted(totals) and totals[-1] <= supervised.answered, (totals, supervised.answered)


def test_sigterm_stops_every_worker_with_status_0(supervised):
    pids = list(supervised.workers().values())
    assert len(pids) == 2
    supervised.proc.send_signal(signal.SIGTERM)
    assert supervised.proc.wait(60) == 0  # the supervisor exits 0 only when every worker did
    assert not any(alive(pid) for pid in pids)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", supervised.port), timeout=2).close()


def test_crash_loop_gives_up_with_a_clear_error(tmp_path):
    log = tmp_path / "serve.log"
    server = Supervised([tmp_path / "no-such-package"], 2, log)
    try:
        assert server.proc.wait(60) == 1
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    text = log.read_text()
    assert "not a package directory" in text
    assert re.search(r"worker \d exited with status 1 5 times in a row .* giving up \(crash loop", text), text
    assert children(server.proc.pid) == []


def test_killed_supervisor_takes_its_workers_with_it(mlp_package, tmp_path):
    server = Supervised([mlp_package], 2, tmp_path / "serve.log")
    try:
        pids = wait_for(lambda: len(w := children(server.proc.pid)) == 2 and w, 30, "two workers")
    finally:
        server.proc.kill()
    server.proc.wait()
    wait_for(lambda: not any(alive(pid) for pid in pids), 30, "the orphaned workers to die")
    # Its run directory outlived it; the next supervisor's run directory sweeps it away.
    from vivace.engine.workers import _run_dir

    stale = list(Path("/dev/shm").glob(f"vivace-serve-{server.proc.pid}-*"))
    fresh = _run_dir()
    fresh.rmdir()
    assert stale and not any(path.exists() for path in stale)


def test_port_taken_and_bad_worker_count_are_clear_errors(mlp_package, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "vivace.cli", "serve", str(mlp_package), "--workers",
                                 "2", "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"cannot bind 127.0.0.1:{port} for the workers: Address already in use" in result.stderr
    from vivace.cli import main

    assert main(["serve", str(mlp_package), "--workers", "0", "--port", str(free_port())]) == 1
