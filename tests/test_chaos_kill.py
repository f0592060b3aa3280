"""SIGKILL at random points of `data add`, `models register`, `models promote` and
`features materialize` (real CLI processes, real home) never leaves a corrupt or
half-visible store; and the checker that says so does catch corruption."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from vivace.bench.chaos import (
    END,
    OPS,
    VIEWS,
    Campaign,
    Materialize,
    check_home,
    format_table,
    run_campaign,
)
from vivace.features import FeatureStore

SMALL = {"n_entities": 3000, "data_rows": 2000, "blob_bytes": 256 << 10}


def test_random_sigkills_leave_every_home_consistent(tmp_path: Path) -> None:
    tallies, final, _ = run_campaign(tmp_path, OPS, iterations=5, seconds=25, seed=7, log=print,
                                     baseline_runs=1, **SMALL)
    print(format_table(tallies))
    failures = [f"{t.op}: {f}" for t in tallies for f in t.failures]
    assert not failures, "\n".join(failures)
    assert not final, final
    assert [t.op for t in tallies] == list(OPS)
    for t in tallies:
        assert t.iterations >= 1 and t.survived == t.iterations
        assert t.killed_mid_run + t.finished_before_kill == t.iterations
    # Delays run over [0, 1.2 × duration]: nearly all kills land mid-run, so a campaign in
    # which none did would prove nothing.
    assert sum(t.killed_mid_run for t in tallies) >= 1


# ---- the checker catches corruption ---------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Campaign:
    campaign = Campaign(tmp_path_factory.mktemp("chaos"), **SMALL)
    campaign.setup()
    return campaign


@pytest.fixture
def home(pristine: Campaign, tmp_path: Path) -> Path:
    """A copy of the set-up home (nothing has it open: the copy is a consistent snapshot)."""
    copy = tmp_path / "home"
    shutil.copytree(pristine.home, copy)
    return copy


def oracle_for(campaign: Campaign):
    probe = Materialize(campaign)
    probe.states = {1: 0.0}  # setup materialized once, with offset 0
    return probe.oracle()


def writable(path: Path) -> None:
    os.chmod(path.parent, 0o755)
    os.chmod(path, 0o644)


def test_the_pristine_home_passes(pristine: Campaign, home: Path) -> None:
    assert check_home(home, oracle_for(pristine)) == []


def test_a_missing_dataset_object_is_reported(home: Path) -> None:
    with sqlite3.connect(home / "vivace.db") as db:
        digest = next(iter(json.loads(db.execute("SELECT files FROM datasets").fetchone()[0]).values()))
    (home / "objects" / digest[:2] / digest).unlink()
    problems = check_home(home)
    assert any("churn@v1" in p and "missing" in p for p in problems), problems


def test_a_tampered_package_file_is_reported(home: Path) -> None:
    model = next((home / "packages").glob("*/model.pt"))
    writable(model)
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    problems = check_home(home)
    assert any(p.startswith("model chaos/") and "corrupted" in p for p in problems), problems


def test_a_half_written_object_is_reported(home: Path) -> None:
    fake = "ab" + "0" * 62
    (home / "objects" / "ab").mkdir(exist_ok=True)
    (home / "objects" / "ab" / fake).write_bytes(b"half")
    problems = check_home(home)
    assert any(fake in p for p in problems), problems


def test_an_alias_on_a_missing_version_is_reported(home: Path) -> None:
    with sqlite3.connect(home / "vivace.db") as db:  # foreign keys are off in a plain connection
        db.execute("UPDATE aliases SET version = 99 WHERE alias = 'production'")
    problems = check_home(home)
    assert any("points at missing version 99" in p for p in problems), problems


def test_an_alias_moved_without_its_audit_record_is_reported(home: Path) -> None:
    with sqlite3.connect(home / "vivace.db") as db:
        db.execute("UPDATE aliases SET version = 2 WHERE alias = 'production'")
    problems = check_home(home)
    assert any("chaos@production -> 2" in p and "says 1" in p for p in problems), problems


def test_a_truncated_online_store_is_reported_without_mapping_it(home: Path) -> None:
    data = home / "online" / "data.mdb"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    problems = check_home(home)
    assert any("online store: data.mdb" in p for p in problems), problems


def test_a_mixed_materialization_is_reported(pristine: Campaign, home: Path) -> None:
    from vivace.features.online import environment

    env = environment(home / "online")
    with env.begin(write=True) as txn:
        db = env.open_db(f"v:{VIEWS[1]}".encode(), txn=txn, create=False, integerkey=True)
        key = np.int64(5).tobytes()
        row = bytearray(txn.get(key, db=db))
        values = np.frombuffer(row, dtype="<f4", offset=len(row) - 12).copy() + 1000.0
        row[-12:] = values.tobytes()
        txn.put(key, bytes(row), db=db)
    problems = check_home(home, oracle_for(pristine))
    assert any(VIEWS[1] in p and "a mix of materializations" in p for p in problems), problems
    assert not any(VIEWS[0] in p for p in problems), problems


def test_a_lost_materialization_is_reported(pristine: Campaign, home: Path) -> None:
    shutil.rmtree(home / "online")
    problems = check_home(home, oracle_for(pristine))
    assert any("generation 0" in p for p in problems), problems


# ---- regression: a first materialization killed before it wrote anything ---------------

KILLED_BEFORE_FIRST_WRITE = """
import os, signal, sys
from vivace.features import FeatureStore
from vivace.features.online import OnlineWriter
home, step = sys.argv[1], sys.argv[2]
writer = OnlineWriter(home)  # creates the LMDB files
if step == "handles":  # materialize's first transaction: the DB handles
    writer._open_dbs([f"v:{name}".encode() for name in FeatureStore(home).catalog.views], rebuild=False)
os.kill(os.getpid(), signal.SIGKILL)  # dies before the transaction that writes the rows
"""


def vivace_cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vivace.cli", "--home", str(home), *args],
                          check=False, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("step", "reader_says"), [
    ("files", "holds no Vivace metadata"),
    ("handles", "is not in the online store"),
])
def test_first_materialization_killed_before_writing_leaves_an_empty_store(
        tmp_path: Path, step: str, reader_says: str) -> None:
    from vivace.features.online import read_generation

    campaign = Campaign(tmp_path, n_entities=100)
    campaign.work.mkdir()
    campaign.write_sources(0.0)
    FeatureStore(campaign.home).apply(campaign.feature_definitions())
    child = subprocess.run([sys.executable, "-c", KILLED_BEFORE_FIRST_WRITE, str(campaign.home), step],
                           check=False, capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    # Before the fixes, read_generation raised lmdb.NotFoundError after "files", and the
    # reader called the store of "handles" one of "schema version ''" that needs --rebuild.
    assert read_generation(campaign.home) == 0
    assert check_home(campaign.home) == []
    got = vivace_cli(campaign.home, "features", "get", "--features", f"{VIEWS[0]}:f0", "--", "1")
    assert got.returncode == 1
    assert reader_says in got.stderr and "schema version" not in got.stderr, got.stderr
    assert vivace_cli(campaign.home, "features", "materialize", "--end", END.isoformat()).returncode == 0
    got = vivace_cli(campaign.home, "features", "get", "--features", f"{VIEWS[0]}:f0", "--", "1")
    assert got.returncode == 0 and "1\tTrue\t1\n" in got.stdout, got.stdout
