"""`vivace serve` on a port another server holds fails with one line naming the address
and port, on both front ends; only `--workers` shares a port (SO_REUSEPORT)."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest


@pytest.fixture
def held_port():
    """A port held the way a `--workers` Vivace server holds it (SO_REUSEPORT, listening):
    a server that set SO_REUSEPORT itself could bind it too."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    yield sock.getsockname()[1]
    sock.close()


@pytest.mark.parametrize("frontend", ["native", "python"])
def test_serving_on_a_busy_port_fails_naming_the_address(mlp_package, held_port, frontend):
    try:
        result = subprocess.run(
            [sys.executable, "-m", "vivace", "serve", str(mlp_package), "--host", "127.0.0.1",
             "--port", str(held_port), "--http-frontend", frontend],
            capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"vivace serve started on port {held_port}, which another server holds")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"vivace serve: error: [Errno 98] cannot listen on 127.0.0.1:{held_port}: Address already in use"
