"""Crash and concurrency safety with real processes: SIGKILL mid-write, concurrent registration."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from vivace.registry import Home, open_dataset, resolve
from vivace.registry.data import add_dataset, list_datasets
from vivace.registry.demo_data import churn_frame
from vivace.registry.models import get_version, list_versions, register_model, set_alias
from vivace.registry.package import write_package

MANIFEST = {"name": "lin", "version": "1", "platform": "torchscript", "model_file": "model.pt",
            "inputs": [{"name": "input__0", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": [{"name": "output__0", "datatype": "FP32", "shape": [-1, 1]}]}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "model.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 1)), str(path))
    return path


def spawn(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def kill_after(proc: subprocess.Popen, successes: int, delay_s: float) -> list[str]:
    """Wait for `successes` completed operations, then SIGKILL the child `delay_s` later."""
    lines = []
    while len(lines) < successes:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"child exited early: {proc.stderr.read()}")
        lines.append(line.strip())
    time.sleep(delay_s)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return lines


def assert_objects_whole(home: Home) -> None:
    """Every visible object's bytes hash to its name: nothing half-written is published."""
    for obj in home.objects.rglob("*"):
        if obj.is_file():
            assert hashlib.sha256(obj.read_bytes()).hexdigest() == obj.name
    assert home.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


ADD_LOOP = """
import sys
from vivace.registry.data import add_dataset
home, base = sys.argv[1], open(sys.argv[2], "rb").read()
i = 0
while True:
    i += 1
    with open(sys.argv[3], "wb") as f:
        f.write(base + f"{i},0,0.0,0,one-year,basic,north,0\\n".encode())
    print(add_dataset(home, "churn", sys.argv[3])[0].version, flush=True)
"""


@pytest.mark.parametrize("delay_s", [0.0, 0.03, 0.07, 0.12])
def test_sigkill_during_data_add_leaves_no_half_version(tmp_path, delay_s):
    base = tmp_path / "base.csv"
    churn_frame(rows=30000).to_csv(base, index=False)  # ~1.5 MB: copy, hash, parse take a while
    home_dir = tmp_path / "home"
    Home(home_dir).close()
    lines = kill_after(spawn(ADD_LOOP, home_dir, base, tmp_path / "work.csv"), 1, delay_s)
    with Home(home_dir) as home:
        versions = list_datasets(home, "churn")
        assert [v.version for v in versions] == list(range(1, len(versions) + 1))
        assert len(versions) >= len(lines)
        for v in versions:
            assert len(open_dataset(v.ref, home)) == v.row_count == 30001
        assert_objects_whole(home)
        home.collect_garbage(older_than_s=0)  # staging leftovers of the killed process
        assert not list(home.tmp.iterdir())
        fresh, created = add_dataset(home, "churn", base)
        assert created and fresh.version == len(versions) + 1


REGISTER_LOOP = """
import os, sys
from vivace.registry.models import register_model
from vivace.registry.package import write_package
import json
home, model, workdir = sys.argv[1], sys.argv[2], sys.argv[3]
manifest = json.loads(sys.argv[4])
blob = os.urandom(3 << 20)
i = 0
while True:
    i += 1
    pkg = os.path.join(workdir, f"p{i}")
    write_package(pkg, manifest, {"model.pt": model, "weights.bin": blob + str(i).encode()})
    print(register_model(home, pkg, "m").version, flush=True)
"""


@pytest.mark.parametrize("delay_s", [0.0, 0.02, 0.05])
def test_sigkill_during_register_leaves_no_half_version(tmp_path, model_file, delay_s):
    import json

    home_dir = tmp_path / "home"
    Home(home_dir).close()
    work = tmp_path / "work"
    work.mkdir()
    kill_after(spawn(REGISTER_LOOP, home_dir, model_file, work, json.dumps(MANIFEST)), 1, delay_s)
    with Home(home_dir) as home:
        versions = list_versions(home, "m")
        assert [v.version for v in versions] == list(range(1, len(versions) + 1))
        for v in versions:
            resolve(home, v.ref)  # verifies every file's hash
        for stored in home.packages.iterdir():  # only whole packages are published
            assert hashlib.sha256((stored / "package.json").read_bytes()).hexdigest() == stored.name
        home.collect_garbage(older_than_s=0)
        assert not list(home.tmp.iterdir())
        write_package(tmp_path / "final", MANIFEST, {"model.pt": model_file})
        assert register_model(home, tmp_path / "final", "m").version == len(versions) + 1


PROMOTE_LOOP = """
import sys
from vivace.registry.models import promote
home = sys.argv[1]
i = 0
while True:
    i += 1
    promote(home, "m", 1 + i % 2, force=True, reason=f"flip {i}")
    print(i, flush=True)
"""


def test_sigkill_during_promote_keeps_alias_and_audit_consistent(tmp_path, model_file):
    home_dir = tmp_path / "home"
    with Home(home_dir) as home:
        for note in ("a", "b"):
            write_package(tmp_path / note, MANIFEST, {"model.pt": model_file, "n.txt": note.encode()})
            register_model(home, tmp_path / note, "m")
        set_alias(home, "m", 1, "production")
    kill_after(spawn(PROMOTE_LOOP, home_dir), 20, 0.01)
    with Home(home_dir) as home:
        holder = get_version(home, "m@production").version
        promotions = [r for r in home.audit_log("m") if r["action"].startswith("model.promote")]
        assert promotions and promotions[-1]["target"] == f"m/{holder}"
        resolve(home, "m@production")
        assert_objects_whole(home)


CONCURRENT_REGISTER = """
import sys, time
from vivace.registry.models import register_model
home, pkg, count, start_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
while time.time() < start_at:
    time.sleep(0.001)
for _ in range(count):
    print(register_model(home, pkg, "shared").version, flush=True)
"""


def test_garbage_collection_skips_an_entry_that_vanishes_while_it_runs(tmp_path):
    # A concurrent writer renames its staging directory into place between our
    # listing and our stat; a dangling link is that moment made permanent.
    with Home(tmp_path / "home") as home:
        (home.tmp / "pkg.renamed-meanwhile").symlink_to(tmp_path / "gone")
        stale = home.staging_dir("pkg.")
        os.utime(stale, (0, 0))
        assert home.collect_garbage() == 1
        assert not stale.exists()


def test_two_processes_registering_get_distinct_versions(tmp_path, model_file):
    home_dir = tmp_path / "home"  # not created yet: both processes also race to create it
    for who in ("left", "right"):
        write_package(tmp_path / who, MANIFEST, {"model.pt": model_file, "who.txt": who.encode()})
    count, start_at = 15, time.time() + 1.5
    procs = {who: spawn(CONCURRENT_REGISTER, home_dir, tmp_path / who, count, start_at) for who in ("left", "right")}
    got = {}
    for who, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        got[who] = [int(v) for v in out.split()]
    assert len(got["left"]) == len(got["right"]) == count
    assert set(got["left"]).isdisjoint(got["right"])
    assert sorted(got["left"] + got["right"]) == list(range(1, 2 * count + 1))
    with Home(home_dir) as home:
        for who, versions in got.items():
            for v in versions:
                assert (resolve(home, f"shared/{v}") / "who.txt").read_text() == who
        assert len([r for r in home.audit_log("shared") if r["action"] == "model.register"]) == 2 * count
