"""The README's commands, run as a new user would: the quick start's requests against
`vivace demo` (what `make serve` runs once installed) and every command of "Serve your own
model", through the real console script in a fresh home. A README edit that breaks a
command breaks this test."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port

README = Path(__file__).resolve().parents[1] / "README.md"


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def commands(block: str) -> list[list[str]]:
    """The block's shell commands (continuation lines joined, comments dropped)."""
    out, pending = [], ""
    for line in re.sub(r"\\\n", " ", block).splitlines():
        pending += line + "\n"
        try:
            argv = shlex.split(pending, comments=True)
        except ValueError:  # a quoted argument continues on the next line
            continue
        if argv:
            out.append(argv)
        pending = ""
    assert not pending, f"unbalanced quotes in {block!r}"
    return out


def vivace(*argv: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vivace", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


class Served:
    """A README `vivace serve`/`vivace demo` line, run on a free port until stopped."""

    def __init__(self, argv: list[str], cwd: Path, env: dict):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "vivace", *argv, "--port", str(self.port)],
                                     cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 240
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"{argv} exited: {self.proc.stdout.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/health/ready", timeout=1):
                    return
            except OSError:
                assert time.monotonic() < deadline, f"{argv} did not become ready"
                time.sleep(0.2)

    def stop(self) -> str:
        """Stop it with SIGTERM (exit 0 expected); returns what it printed."""
        self.proc.terminate()
        assert self.proc.wait(timeout=60) == 0
        return self.proc.stdout.read()


def curl(argv: list[str], port: int) -> tuple[int, bytes]:
    """A README curl line (-s, -X, -d) against the test's port."""
    url, data, method = None, None, None
    args = iter(argv[1:])
    for arg in args:
        if arg == "-X":
            method = next(args)
        elif arg == "-d":
            data = next(args).encode()
        elif not arg.startswith("-"):
            url = arg
    url = "http://" + url.replace("localhost:8000", f"127.0.0.1:{port}")
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"))
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def fresh(tmp_path):
    env = dict(os.environ, VIVACE_HOME=str(tmp_path / ".vivace"))
    return tmp_path, env


def test_quick_start_requests_answer_against_the_demo(fresh):
    cwd, env = fresh
    requests = [c for c in commands(blocks(section("Quick start"), "sh")[1]) if c[0] == "curl"]
    assert len(requests) >= 4
    demo = Served(["demo", "--host", "127.0.0.1"], cwd, env)
    try:
        for argv in requests:
            status, body = curl(argv, demo.port)
            assert status == 200, (argv, body[:500])
    finally:
        output = demo.stop()
    # Training imports triton (through torch's optimizers); the server's frozen heap once
    # made its nanobind bindings print hundreds of "leaked" lines at exit (issue 13 item 9).
    assert "leaked" not in output, output[-2000:]


def test_serve_your_own_model_commands_work_in_a_fresh_home(fresh):
    import torch

    cwd, env = fresh
    shell, python = blocks(section("Serve your own model"), "sh")[0], blocks(section("Serve your own model"), "python")[0]
    model = torch.nn.Sequential(torch.nn.Linear(32, 2), torch.nn.Softmax(dim=1))
    torch.jit.save(torch.jit.trace(model, torch.randn(4, 32)), str(cwd / "model.pt"))
    body = ('{"inputs":[{"name":"features","shape":[2,32],"datatype":"FP32","data":[%s]}]}'
            % ",".join(["0.5"] * 64)).encode()
    for argv in commands(shell):
        assert argv[0] == "vivace", argv
        if argv[1] == "serve":
            server = Served(argv[1:], cwd, env)
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{server.port}/v2/models/mine/infer", data=body)
                with urllib.request.urlopen(request, timeout=30) as response:
                    assert response.status == 200 and b'"probs"' in response.read()
            finally:
                server.stop()
        else:
            done = vivace(*argv[1:], cwd=cwd, env=env)
            assert done.returncode == 0, (argv, done.stdout, done.stderr)

    # The Python block, the alternative to `vivace package`: in a directory of its own, with
    # the profile its comment names.
    import numpy as np
    import pandas as pd

    alone = cwd / "python"
    alone.mkdir()
    pd.DataFrame(np.random.default_rng(0).normal(size=(500, 32)),
                 columns=[f"f{i}" for i in range(32)]).to_parquet(alone / "train.parquet")
    profile_line = re.search(r"`(vivace monitor profile [^`]*)`", python).group(1)
    done = vivace(*shlex.split(profile_line)[1:], cwd=alone, env=env)
    assert done.returncode == 0, done.stderr
    script = f"import os\nos.chdir({str(alone)!r})\nimport torch\nmodel = torch.nn.Linear(32, 2)\n{python}"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (alone / "models" / "mine" / "package.json").is_file()


def run_block(block: str, cwd: Path, env: dict, model: str, body: bytes) -> None:
    """A README shell block: `echo TEXT > FILE` lines, vivace commands, and `vivace serve`
    answering one infer request for `model`."""
    for argv in commands(block):
        if argv[0] == "echo":
            assert argv[2] == ">", argv
            (cwd / argv[3]).write_text(argv[1] + "\n")
            continue
        assert argv[0] == "vivace", argv
        if argv[1] == "serve":
            server = Served(argv[1:], cwd, env)
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{server.port}/v2/models/{model}/infer", data=body)
                with urllib.request.urlopen(request, timeout=30) as response:
                    assert response.status == 200, response.read()
            finally:
                server.stop()
        else:
            done = vivace(*argv[1:], cwd=cwd, env=env)
            assert done.returncode == 0, (argv, done.stdout, done.stderr)


def test_onnx_and_python_model_commands_work_in_a_fresh_home(fresh):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    cwd, env = fresh
    text = section("Serve your own model")
    onnx_block = text[text.index("### ONNX models"):text.index("### Python models")]
    python_part = text[text.index("### Python models"):text.index("### Pipelines (ensembles)")]
    # an ONNX graph with a dynamic batch axis: features FP32 [n, 32] -> probs FP32 [n, 32]
    graph = helper.make_graph([helper.make_node("Softmax", ["features"], ["probs"], axis=1)], "softmax",
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", 32])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", 32])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(cwd / "model.onnx"))
    body = ('{"inputs":[{"name":"features","shape":[2,32],"datatype":"FP32","data":[%s]}]}'
            % ",".join(["0.5"] * 64)).encode()
    run_block(blocks(onnx_block, "sh")[0], cwd, env, "mine-onnx", body)
    # the Python block is scaler.py, as its first line says
    module = blocks(python_part, "python")[0]
    assert module.startswith("# scaler.py\n")
    (cwd / "scaler.py").write_text(module)
    body = b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}'
    run_block(blocks(python_part, "sh")[0], cwd, env, "scaler", body)
    # the pipeline joins the scaler with risk.py (its first line names it)
    pipeline_part = text[text.index("### Pipelines (ensembles)"):]
    module = blocks(pipeline_part, "python")[0]
    assert module.startswith("# risk.py\n")
    (cwd / "risk.py").write_text(module)
    run_block(blocks(pipeline_part, "sh")[0], cwd, env, "scored", body)
