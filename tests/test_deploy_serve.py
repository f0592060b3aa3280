"""What a rendered pod runs, on loopback: `vivace deploy fetch` (the init container) copies
the pinned package into a directory, verified; `vivace serve DIR --model-name --model-version
--expect-sha256` serves it as the registry's release, and refuses any other bytes."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import urllib.request

import pytest

from conftest import ServerProcess

BODY = json.dumps({"inputs": [{"name": "input__0", "shape": [1, 32], "datatype": "FP32", "data": [0.1] * 32}]})


def vivace(*args, home=None):
    home_args = ["--home", str(home)] if home else []
    return subprocess.run([sys.executable, "-m", "vivace.cli", *home_args, *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def one_line_error(proc, command: str) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vivace {command}: error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def stored(tmp_path_factory, mlp_package):
    """(the package directory as the registry stores it, its package id)."""
    home = tmp_path_factory.mktemp("home")
    assert vivace("models", "register", mlp_package, "--name", "churn", home=home).returncode == 0
    sha = hashlib.sha256((mlp_package / "package.json").read_bytes()).hexdigest()
    assert (home / "packages" / sha).is_dir()
    return home / "packages" / sha, sha


def test_fetched_package_is_served_as_the_pinned_release(stored, tmp_path):
    source, sha = stored
    dest = tmp_path / "models"
    dest.mkdir()  # a pod's emptyDir: the mount point exists and cannot be replaced
    proc = vivace("deploy", "fetch", f"file://{source}", dest, "--sha256", sha)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in source.iterdir())
    server = ServerProcess([dest], "--model-name", "churn", "--model-version", "7", "--expect-sha256", sha)
    try:
        with urllib.request.urlopen(f"{server.url}/v2/models/churn") as response:
            metadata = json.loads(response.read())
        assert metadata["name"] == "churn" and metadata["versions"] == ["7"]
        request = urllib.request.Request(f"{server.url}/v2/models/churn/infer", BODY.encode(), method="POST")
        with urllib.request.urlopen(request) as response:
            answer = json.loads(response.read())
        assert answer["model_name"] == "churn" and answer["model_version"] == "7"
    finally:
        assert server.stop() == 0


def test_serve_refuses_a_package_that_is_not_the_pinned_one(stored, tmp_path, mlp_package):
    source, sha = stored
    other = hashlib.sha256(b"another package").hexdigest()
    line = one_line_error(vivace("serve", source, "--port", "0", "--expect-sha256", other), "serve")
    assert f"package.json has sha256 {sha}, the release pins {other}" in line
    # A file swapped under an unchanged package.json is caught by the file digests.
    copy = tmp_path / "pkg"
    shutil.copytree(source, copy)
    (copy / "model.pt").chmod(0o644)
    (copy / "model.pt").write_bytes(b"not the model")
    line = one_line_error(vivace("serve", copy, "--port", "0", "--expect-sha256", sha), "serve")
    assert "model.pt is corrupted" in line


@pytest.mark.parametrize("args, message", [
    (["churn@production", "--model-name", "x"], "apply to one package directory"),
    (["{pkg}", "{pkg}", "--model-version", "2"], "apply to one package directory"),
    (["{pkg}", "--expect-sha256", "ABC"], "--expect-sha256 must be 64 lowercase hex digits"),
])
def test_release_options_need_one_package_directory(mlp_package, args, message):
    args = [str(mlp_package) if a == "{pkg}" else a for a in args]
    assert message in one_line_error(vivace("serve", *args, "--port", "0"), "serve")


def test_fetch_refuses_corrupted_or_missing_objects_and_writes_no_package(stored, tmp_path):
    source, sha = stored
    bucket = tmp_path / "bucket"
    shutil.copytree(source, bucket)
    (bucket / "model.pt").chmod(0o644)
    data = bytearray((bucket / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bucket / "model.pt").write_bytes(bytes(data))
    dest = tmp_path / "dest"
    line = one_line_error(vivace("deploy", "fetch", bucket, dest, "--sha256", sha), "deploy")
    assert "model.pt is corrupted" in line
    assert list(dest.iterdir()) == []  # no package.json, no staging left behind
    (bucket / "model.pt").unlink()
    line = one_line_error(vivace("deploy", "fetch", bucket, dest, "--sha256", sha), "deploy")
    assert "model.pt is missing (listed in package.json)" in line and list(dest.iterdir()) == []
    # Another package at the URI (or a corrupted package.json): refused before any file is read.
    other = hashlib.sha256(b"x").hexdigest()
    line = one_line_error(vivace("deploy", "fetch", source, dest, "--sha256", other), "deploy")
    assert f"the release pins {other[:12]}" in line and list(dest.iterdir()) == []
    line = one_line_error(vivace("deploy", "fetch", tmp_path / "nowhere", dest, "--sha256", sha), "deploy")
    assert "no package at" in line and list(dest.iterdir()) == []


def test_fetch_again_after_a_kill_and_after_success(stored, tmp_path):
    source, sha = stored
    dest = tmp_path / "dest"
    stale = dest / ".incoming.killed"
    stale.mkdir(parents=True)
    (stale / "model.pt").write_bytes(b"half")
    (dest / "model.pt").write_bytes(b"half a previous fetch")
    assert vivace("deploy", "fetch", source, dest, "--sha256", sha).returncode == 0
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in source.iterdir())
    assert (dest / "model.pt").read_bytes() == (source / "model.pt").read_bytes()
    # A restarted init container finds the package whole and reads nothing.
    proc = vivace("deploy", "fetch", tmp_path / "gone", dest, "--sha256", sha)
    assert proc.returncode == 0, proc.stderr
