"""`vivace bench chaos`: SIGKILL the lifecycle commands at random points, then check the home.

Operations: `data add`, `models register`, `models promote`, `features materialize` into
an existing store, and the first `features materialize` of a new store (materialize-new).
For each, the campaign first times unkilled runs of the real CLI (`python -m
vivace.cli`), then repeatedly starts it in a fresh process against a real home and
SIGKILLs it after a delay drawn uniformly in [0, 1.2 × the median duration of its unkilled
runs so far]. After every kill, `check_home` verifies the whole home (SQLite integrity,
every artifact's SHA-256, aliases against versions and the audit log, every online-store
row) and the killed command is run again, which must succeed. The table counts kills that
landed mid-run (and, of those, how many had already committed), runs that finished before
their kill, and homes that survived.

Everything stays on the local disk; nothing listens on a socket. The kill loop is bounded
by --seconds (shared equally between the operations).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import lmdb
    from vivace.registry import Home

OPS = ("data-add", "register", "promote", "materialize", "materialize-new")
KILL_WINDOW = 1.2          # delays are drawn in [0, KILL_WINDOW × median unkilled duration]
BASELINE_RUNS = 3          # unkilled runs per operation before the kills (the first pays cold caches)
RUN_TIMEOUT_S = 120.0      # an unkilled command taking longer than this is a failure
MODEL = "chaos"
DATASET = "churn"
VIEWS = ("chaos_a", "chaos_b")  # two views: one materialization must land in both or neither
N_FEATURES = 3
END = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)

# An online oracle gets the store's generation (0: nothing materialized) and each view's
# decoded rows {view: (int64 keys [n], float32 values [n, F])}, and returns problems.
OnlineOracle = Callable[[int, dict[str, tuple[np.ndarray, np.ndarray]]], list[str]]


# ---- the checker ---------------------------------------------------------------------


def check_home(home: str | Path, online_oracle: OnlineOracle | None = None) -> list[str]:
    """Every consistency problem of a Vivace home; an empty list when it is whole.

    Checks: SQLite `integrity_check` and `foreign_key_check`; dataset versions numbered
    1..n, each file's object present with the right SHA-256, the version readable with its
    recorded row count and audited; model versions numbered 1..n, each package verified
    and audited; each training run's package verified; aliases pointing at existing
    versions and agreeing with the last audit record that moved them; every published
    object and package whole (named by its hash); the LMDB online store's schema version,
    generation and view records valid and every row decoding (NaN exactly where the null
    bit is set). `online_oracle` adds a check of the decoded values (e.g. "all from one
    materialization").
    """
    from vivace.registry import Home

    home = Path(home)
    problems: list[str] = []
    if (home / "vivace.db").exists():  # a home used only for features has none
        with Home(home) as h:
            problems += _check_registry(h)
    problems += check_online_store(home / "online", online_oracle)
    return problems


def _check_registry(h: Home) -> list[str]:
    """SQLite integrity, then datasets, models, aliases and published files of an open Home."""
    problems: list[str] = []
    integrity = [r[0] for r in h.db.execute("PRAGMA integrity_check")]
    if integrity != ["ok"]:
        return [f"sqlite integrity_check: {'; '.join(integrity)[:300]}"]  # nothing else can be trusted
    for row in h.db.execute("PRAGMA foreign_key_check"):
        problems.append(f"sqlite foreign_key_check: table {row[0]} row {row[1]} -> {row[2]}")
    audited = {(r["action"], r["target"]) for r in h.db.execute("SELECT action, target FROM audit")}
    problems += _check_datasets(h, audited)
    problems += _check_models(h, audited)
    problems += _check_aliases(h)
    problems += _check_published(h)
    return problems


def _check_datasets(h: Home, audited: set[tuple[str, str]]) -> list[str]:
    from vivace.registry import open_dataset
    from vivace.registry.data import list_datasets
    from vivace.registry.store import RegistryError

    problems: list[str] = []
    versions = list_datasets(h)
    by_name: dict[str, list[int]] = {}
    hashes: dict[tuple[str, str], int] = {}
    for v in versions:
        by_name.setdefault(v.name, []).append(v.version)
        if (v.name, v.content_hash) in hashes:
            problems.append(f"dataset {v.ref}: same content as v{hashes[v.name, v.content_hash]} (duplicate version)")
        hashes[v.name, v.content_hash] = v.version
        if ("data.add", v.ref) not in audited:
            problems.append(f"dataset {v.ref}: no data.add audit record")
        expected_hash = next(iter(v.files.values())) if len(v.files) == 1 else hashlib.sha256(
            json.dumps(sorted(v.files.items()), separators=(",", ":")).encode()).hexdigest()
        if v.content_hash != expected_hash:
            problems.append(f"dataset {v.ref}: content hash does not match its file list")
        try:
            rows = len(open_dataset(v.ref, h))  # verifies each object's SHA-256 first
        except RegistryError as exc:
            problems.append(f"dataset {v.ref}: {exc}")
            continue
        if rows != v.row_count:
            problems.append(f"dataset {v.ref}: {rows} rows readable, {v.row_count} recorded")
    for name, numbers in by_name.items():
        if numbers != list(range(1, len(numbers) + 1)):
            problems.append(f"dataset {name}: versions {numbers} are not 1..{len(numbers)}")
    return problems


def _check_models(h: Home, audited: set[tuple[str, str]]) -> list[str]:
    from vivace.registry.models import package_path
    from vivace.registry.store import RegistryError

    problems: list[str] = []
    by_name: dict[str, list[int]] = {}
    for row in h.db.execute("SELECT name, version, package_sha FROM model_versions ORDER BY name, version"):
        ref = f"{row['name']}/{row['version']}"
        by_name.setdefault(row["name"], []).append(row["version"])
        if ("model.register", ref) not in audited:
            problems.append(f"model {ref}: no model.register audit record")
        try:
            package_path(h, row["package_sha"], verify=True)
        except RegistryError as exc:
            problems.append(f"model {ref}: {exc}")
    for name, numbers in by_name.items():
        if numbers != list(range(1, len(numbers) + 1)):
            problems.append(f"model {name}: versions {numbers} are not 1..{len(numbers)}")
    for row in h.db.execute("SELECT id, package_sha FROM runs WHERE package_sha IS NOT NULL"):
        try:
            package_path(h, row["package_sha"], verify=True)
        except RegistryError as exc:
            problems.append(f"run {row['id']}: {exc}")
    return problems


def _check_aliases(h: Home) -> list[str]:
    """Each alias names an existing version, the one its last alias-moving audit record names."""
    problems: list[str] = []
    holders = {(r["name"], r["alias"]): r["version"] for r in h.db.execute("SELECT name, alias, version FROM aliases")}
    for (name, alias), version in holders.items():
        if not h.db.execute("SELECT 1 FROM model_versions WHERE name = ? AND version = ?", (name, version)).fetchone():
            problems.append(f"alias {name}@{alias} points at missing version {version}")
    last_move: dict[tuple[str, str], tuple[str, int | None]] = {}
    for r in h.db.execute("SELECT action, target, details FROM audit WHERE action IN"
                          " ('model.alias', 'model.alias.delete', 'model.promote', 'model.promote.override')"
                          " ORDER BY id"):
        name, _, version = r["target"].rpartition("/")
        alias = json.loads(r["details"]).get("alias")
        last_move[name, alias] = (r["action"], None if r["action"] == "model.alias.delete" else int(version))
    for key in holders.keys() | last_move.keys():
        action, audited_version = last_move.get(key, ("(no audit record)", None))
        if holders.get(key) != audited_version:
            problems.append(f"alias {key[0]}@{key[1]} -> {holders.get(key)}, but the last audit record "
                            f"({action}) says {audited_version}")
    return problems


def _check_published(h: Home) -> list[str]:
    """Whatever is visible under objects/ and packages/ is whole: named by the hash of its bytes."""
    problems: list[str] = []
    for obj in h.objects.rglob("*"):
        if obj.is_file():
            with open(obj, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            if digest != obj.name:
                problems.append(f"object {obj.relative_to(h.path)} holds bytes with sha256 {digest[:12]}…")
    for pkg in h.packages.iterdir():
        manifest = pkg / "package.json"
        if not manifest.is_file() or hashlib.sha256(manifest.read_bytes()).hexdigest() != pkg.name:
            problems.append(f"package {pkg.name[:12]}… is published but its package.json is missing or differs")
    return problems


def _lmdb_file_problem(data_file: Path) -> str | None:
    """Why the LMDB file cannot be mapped safely (shorter than its newest meta page says), or None.

    Reading a page beyond the end of a mapped file kills the reader with SIGBUS, so the
    size is checked against both meta pages (pages 0 and 1) before LMDB opens the file.
    """
    import struct

    size = data_file.stat().st_size
    if size == 0:
        return None  # created, never written: LMDB initialises it on open
    with open(data_file, "rb") as f:
        head = f.read(16 + 152)
        if len(head) < 16 + 152:
            return f"{data_file.name} is {size} bytes, shorter than a meta page"
        page_size = struct.unpack_from("<I", head, 16 + 24)[0]  # the free DB's md_pad holds it
        f.seek(page_size)
        pages = [head, f.read(16 + 152)]
    newest = None
    for number, page in enumerate(pages):
        # MDB_meta after the 16-byte page header: magic, version, address, mapsize,
        # two 48-byte MDB_db records, then the last used page and the transaction id.
        if len(page) < 16 + 152 or struct.unpack_from("<I", page, 16)[0] != 0xBEEFC0DE:
            return f"{data_file.name}: meta page {number} is missing or has no LMDB magic number"
        last_page, txn_id = struct.unpack_from("<QQ", page, 16 + 24 + 2 * 48)
        if newest is None or txn_id > newest[0]:
            newest = (txn_id, last_page)
    if size < (newest[1] + 1) * page_size:
        return f"{data_file.name} is {size} bytes, but its pages run to {(newest[1] + 1) * page_size}"
    return None


def check_online_store(path: Path, online_oracle: OnlineOracle | None = None) -> list[str]:
    """Problems of the LMDB online store at `path` (see features/online.py for the layout)."""
    from vivace.features.online import environment

    views: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    generation = 0
    problems: list[str] = []
    if (path / "data.mdb").exists():
        broken = _lmdb_file_problem(path / "data.mdb")
        if broken:
            return [f"online store: {broken}"]
        generation, views, problems = _read_online(environment(path))
    if online_oracle is not None:
        problems += online_oracle(generation, views)
    return problems


def _read_online(env: lmdb.Environment) -> tuple[int, dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """(generation, {view: (keys, values)}, problems) of a store whose file is safe to map."""
    import lmdb
    from vivace.features.online import (
        META_DB,
        SCHEMA_VERSION,
        VIEW_RECORD_FORMAT,
        row_layout,
    )

    problems: list[str] = []
    views: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        txn = env.begin()
    except lmdb.MapResizedError:  # a writer grew the map since this process opened it
        env.set_mapsize(0)
        txn = env.begin()
    with txn:
        try:
            meta = env.open_db(META_DB, txn=txn, create=False)
        except lmdb.NotFoundError:
            return 0, views, problems  # created, nothing committed in it yet
        version = txn.get(b"schema_version", db=meta)
        generation_raw = txn.get(b"generation", db=meta)
        # The writer stamps the version in the transaction that creates the meta DB, so a
        # meta DB without it (or with another) is a store the serving reader refuses.
        if version != SCHEMA_VERSION:
            problems.append(f"online store: schema version {version!r}, expected {SCHEMA_VERSION!r}")
        if generation_raw is None:  # an empty store: every materialization writes the generation
            stray = [k.decode(errors="replace") for k, _ in txn.cursor(db=meta) if k != b"schema_version"]
            return 0, views, problems + [f"online store: {k} recorded without a generation" for k in stray]
        if len(generation_raw) != 8:
            return 0, views, problems + [f"online store: generation is {generation_raw!r}, not 8 bytes"]
        generation = int.from_bytes(generation_raw, "little")
        for key, record in txn.cursor(db=meta):
            if not key.startswith(b"view:"):
                continue
            view = key[5:].decode(errors="replace")
            lines = record.decode(errors="replace").split("\n")
            try:
                if lines[0] != VIEW_RECORD_FORMAT or not lines[1].startswith("ttl_us "):
                    raise ValueError("bad header")
                n_features = int(lines[2].removeprefix("features "))
                if len(lines) != 4 + n_features or lines[-1] != "":
                    raise ValueError("feature list length")
            except (IndexError, ValueError) as exc:
                problems.append(f"online view {view}: malformed view record ({exc})")
                continue
            interval = txn.get(f"interval:{view}".encode(), db=meta)
            try:
                lo, hi = map(int, (interval or b"").split())
                if lo > hi:
                    raise ValueError
            except ValueError:
                problems.append(f"online view {view}: interval record {interval!r} is malformed")
            try:
                db = env.open_db(f"v:{view}".encode(), txn=txn, create=False, integerkey=True)
            except lmdb.Error as exc:
                problems.append(f"online view {view}: rows DB missing ({exc})")
                continue
            layout = row_layout(n_features)
            keys, rows, bad = [], [], 0
            for k, v in txn.cursor(db=db):
                if len(k) != 8 or len(v) != layout.itemsize:
                    bad += 1
                    continue
                keys.append(k)
                rows.append(v)
            if bad:
                problems.append(f"online view {view}: {bad} rows with a wrong key or value size")
            packed = np.frombuffer(b"".join(rows), dtype=layout)
            values = packed["values"].reshape(len(packed), n_features)
            null_bits = np.unpackbits(packed["nulls"], axis=1, bitorder="little")[:, :n_features].astype(bool)
            if not np.array_equal(np.isnan(values), null_bits):
                problems.append(f"online view {view}: NaN values and null bits disagree")
            views[view] = (np.frombuffer(b"".join(keys), dtype="=i8"), values)
    return generation, views, problems


# ---- the operations --------------------------------------------------------------------


def _package_manifest() -> dict:
    return {"name": MODEL, "version": "1", "platform": "torchscript", "model_file": "model.pt",
            "inputs": [{"name": "input__0", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": [{"name": "output__0", "datatype": "FP32", "shape": [-1, 1]}]}


def feature_value(keys: np.ndarray, offset: float) -> np.ndarray:
    """The synthetic source's values: key + j/10 + offset for feature j (float32)."""
    return (keys[:, None] + np.arange(N_FEATURES) / 10 + offset).astype(np.float32)


class Operation(ABC):
    """One CLI command under test: how to prepare a run, detect its commit, check its retry."""

    name = ""

    def __init__(self, campaign: Campaign):
        self.c = campaign
        self.home = campaign.home  # the home the command runs against and the checker checks

    @abstractmethod
    def prepare(self, i: int) -> list[str]:
        """Set up iteration i's inputs; the CLI arguments of the command (after --home)."""

    @abstractmethod
    def committed(self) -> bool:
        """Whether the prepared run's effect is visible in the home."""

    def after_retry(self) -> list[str]:
        """Problems with the state after the prepared command was run again to completion."""
        return [] if self.committed() else [f"{self.name}: the retried command left no visible effect"]

    def oracle(self) -> OnlineOracle | None:
        return None


class DataAdd(Operation):
    name = "data-add"

    def prepare(self, i: int) -> list[str]:
        path = self.c.work / f"data{i}.csv"
        path.write_bytes(self.c.base_csv + f"{10_000_000 + i},0,0.0,0,one-year,basic,north,0\n".encode())
        self.content_hash = hashlib.sha256(path.read_bytes()).hexdigest()
        return ["data", "add", DATASET, str(path)]

    def committed(self) -> bool:
        return self._count() > 0

    def after_retry(self) -> list[str]:
        n = self._count()
        return [] if n == 1 else [f"data-add: {n} versions hold the retried content (expected exactly 1)"]

    def _count(self) -> int:
        return self.c.query("SELECT COUNT(*) FROM datasets WHERE name = ? AND content_hash = ?",
                            DATASET, self.content_hash)


class Register(Operation):
    name = "register"

    def prepare(self, i: int) -> list[str]:
        from vivace.registry.package import write_package

        path = self.c.work / f"pkg{i}"
        write_package(path, _package_manifest(), {"model.pt": self.c.model_bytes,
                                                  "weights.bin": self.c.blob + i.to_bytes(8, "little")})
        self.package_sha = hashlib.sha256((path / "package.json").read_bytes()).hexdigest()
        return ["models", "register", str(path), "--name", MODEL]

    def committed(self) -> bool:
        return self.c.query("SELECT COUNT(*) FROM model_versions WHERE package_sha = ?", self.package_sha) > 0


class Promote(Operation):
    name = "promote"

    def prepare(self, i: int) -> list[str]:
        holder = self.c.query("SELECT version FROM aliases WHERE name = ? AND alias = 'production'", MODEL)
        self.target = 2 if holder == 1 else 1
        return ["models", "promote", MODEL, str(self.target), "--force", "--reason", f"chaos {i}"]

    def committed(self) -> bool:
        return self.c.query("SELECT version FROM aliases WHERE name = ? AND alias = 'production'",
                            MODEL) == self.target


class Materialize(Operation):
    """Each run materializes sources whose values all carry a new offset; the store must hold
    exactly one materialization's values (every key, both views), matching its generation.

    `states` maps each generation a consistent store may show to the offset of its values
    (None: nothing materialized, no rows)."""

    name = "materialize"

    def prepare(self, i: int) -> list[str]:
        from vivace.features.online import read_generation

        self.before = read_generation(self.home)
        previous = self.c.source_offset
        self.c.write_sources(1000.0 * (i + 1))
        # The generations a consistent store may show: the previous one, or this run's.
        self.states = {self.before: previous, self.before + 1: self.c.source_offset}
        return ["features", "materialize", "--end", END.isoformat()]

    def committed(self) -> bool:
        from vivace.features.online import read_generation

        return read_generation(self.home) > self.before

    def after_retry(self) -> list[str]:
        from vivace.features.online import read_generation

        generation = read_generation(self.home)
        if generation not in (self.before + 1, self.before + 2):
            return [f"materialize: generation {generation} after the retry (was {self.before})"]
        self.states = {generation: self.c.source_offset}
        return check_online_store(self.home / "online", self.oracle())

    def oracle(self) -> OnlineOracle:
        states: dict[int, float | None] = dict(self.states)
        n_entities = self.c.n_entities

        def check(generation: int, views: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[str]:
            if generation not in states:
                return [f"online store: generation {generation}, expected one of {sorted(states)}"]
            if states[generation] is None:
                return [f"online store: rows of {sorted(views)} at generation {generation}"] if views else []
            problems = []
            for view in VIEWS:
                if view not in views:
                    problems.append(f"online view {view}: missing at generation {generation}")
                    continue
                keys, values = views[view]
                if not np.array_equal(np.sort(keys), np.arange(n_entities)):
                    problems.append(f"online view {view}: {len(keys)} keys, expected 0..{n_entities - 1}")
                    continue
                offsets = np.unique(np.round(values - feature_value(keys, 0.0)))
                if offsets.tolist() != [states[generation]]:
                    problems.append(f"online view {view}: generation {generation} should hold offset "
                                    f"{states[generation]}, holds {offsets.tolist()[:4]} (a mix of materializations)")
            return problems

        return check


class MaterializeNew(Materialize):
    """The first materialization of a new store (it creates the LMDB files): a fresh home each time."""

    name = "materialize-new"

    def prepare(self, i: int) -> list[str]:
        from vivace.features import FeatureStore

        self.home = self.c.root / "fresh" / f"home{i}"
        FeatureStore(self.home).apply(self.c.feature_definitions())
        self.before = 0
        self.states = {0: None, 1: self.c.source_offset}
        return ["features", "materialize", "--end", END.isoformat()]


OPERATIONS: dict[str, type[Operation]] = {
    op.name: op for op in (DataAdd, Register, Promote, Materialize, MaterializeNew)}


# ---- the campaign ----------------------------------------------------------------------


@dataclass
class OpTally:
    op: str
    baseline_s: float = 0.0
    iterations: int = 0
    killed_mid_run: int = 0
    committed_when_killed: int = 0
    finished_before_kill: int = 0
    survived: int = 0
    retry_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


class Campaign:
    """A real home under `root`, set up for every operation, and the kill loop."""

    def __init__(self, root: Path, seed: int = 0, n_entities: int = 100_000, data_rows: int = 5_000,
                 blob_bytes: int = 1 << 20, baseline_runs: int = BASELINE_RUNS):
        self.root = Path(root)
        self.home = self.root / "home"
        self.work = self.root / "work"
        self.rng = random.Random(seed)
        self.n_entities = n_entities
        self.data_rows = data_rows
        self.blob = random.Random(seed).randbytes(blob_bytes)
        self.source_offset = 0.0  # the offset of the values in the feature sources now
        self.baseline_runs = baseline_runs

    # -- setup ----------------------------------------------------------------------------

    def setup(self) -> None:
        """Home with a dataset, two model versions (@production on 1) and a materialized store."""
        import io

        import torch
        from vivace.features import FeatureStore
        from vivace.registry import Home
        from vivace.registry.data import add_dataset
        from vivace.registry.demo_data import churn_frame
        from vivace.registry.models import register_model, set_alias
        from vivace.registry.package import write_package

        self.work.mkdir(parents=True, exist_ok=True)
        self.base_csv = churn_frame(rows=self.data_rows).to_csv(index=False).encode()
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.script(torch.nn.Linear(4, 1)), buffer)
        self.model_bytes = buffer.getvalue()
        with Home(self.home) as home:
            (self.work / "base.csv").write_bytes(self.base_csv)
            add_dataset(home, DATASET, self.work / "base.csv")
            for version in (1, 2):
                pkg = self.work / f"seed{version}"
                write_package(pkg, _package_manifest(), {"model.pt": self.model_bytes,
                                                         "note.txt": f"seed {version}".encode()})
                register_model(home, pkg, MODEL)
            set_alias(home, MODEL, 1, "production", reason="chaos setup")
        self.write_sources(0.0)
        store = FeatureStore(self.home)
        store.apply(self.feature_definitions())
        store.materialize(end=END)

    def feature_definitions(self) -> list:
        """One int64 entity and the feature views of VIEWS over the campaign's sources."""
        from vivace.features import Entity, FeatureView, Field

        return [Entity("driver", "driver_id")] + [
            FeatureView(view, "driver", str(self.work / f"{view}.parquet"),
                        [Field(f"f{j}", "float32") for j in range(N_FEATURES)]) for view in VIEWS]

    def write_sources(self, offset: float) -> None:
        """Both views' parquet sources, one row per entity within the hour before END."""
        import pandas as pd

        keys = np.arange(self.n_entities, dtype=np.int64)
        frame = pd.DataFrame({"driver_id": keys,
                              "event_timestamp": pd.Timestamp(END - timedelta(minutes=30)) +
                              pd.to_timedelta(keys % 1800, unit="s")})
        values = feature_value(keys, offset)
        for j in range(N_FEATURES):
            frame[f"f{j}"] = values[:, j]
        for view in VIEWS:
            tmp = self.work / f".{view}.parquet"
            frame.to_parquet(tmp)
            tmp.replace(self.work / f"{view}.parquet")  # a run never sees half a file
        self.source_offset = offset

    def query(self, sql: str, *params: object) -> object:
        """First column of the first row of a read query on the home's database (None if none)."""
        from vivace.registry import Home

        with Home(self.home) as home:
            row = home.db.execute(sql, params).fetchone()
        return row[0] if row else None

    # -- the loop -------------------------------------------------------------------------

    @staticmethod
    def command(home: Path, args: list[str]) -> list[str]:
        return [sys.executable, "-m", "vivace.cli", "--home", str(home), *args]

    def run_to_completion(self, home: Path, args: list[str]) -> tuple[float, str | None]:
        """Run a command unkilled: (seconds, None) or (seconds, why it failed)."""
        start = time.monotonic()
        try:
            proc = subprocess.run(self.command(home, args), check=False, capture_output=True, text=True,
                                  timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return time.monotonic() - start, f"`{' '.join(args[:2])}` did not finish in {RUN_TIMEOUT_S:.0f} s"
        elapsed = time.monotonic() - start
        if proc.returncode != 0:
            return elapsed, f"`{' '.join(args[:2])}` exited {proc.returncode}: {proc.stderr.strip()[-300:]}"
        return elapsed, None

    def run_op(self, op_name: str, iterations: int, seconds: float,
               log: Callable[[str], None] = lambda line: None) -> OpTally:
        """Unkilled baseline runs, then up to `iterations` kill-check-retry rounds within `seconds`."""
        op = OPERATIONS[op_name](self)
        tally = OpTally(op_name)
        deadline = time.monotonic() + seconds
        clean_runs = []
        for i in range(self.baseline_runs):
            args = op.prepare(i)
            seconds_taken, error = self.run_to_completion(op.home, args)
            problems = [error] if error else op.after_retry()
            if problems:
                tally.failures += [f"baseline run {i}: {p}" for p in problems]
                return tally
            clean_runs.append(seconds_taken)
        tally.baseline_s = statistics.median(clean_runs)
        for i in range(self.baseline_runs, self.baseline_runs + iterations):
            if tally.iterations and time.monotonic() >= deadline:
                break
            tally.iterations += 1
            args = op.prepare(i)
            oracle = op.oracle()
            # The window follows every unkilled run so far: on a shared machine the
            # duration drifts, and a stale window would make kills land after the end.
            delay = self.rng.uniform(0.0, KILL_WINDOW * statistics.median(clean_runs))
            proc = subprocess.Popen(self.command(op.home, args), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
            try:
                _, stderr = proc.communicate(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                _, stderr = proc.communicate()
            problems: list[str] = []
            try:
                redo = False  # whether the retry has all of the operation's work to do again
                if proc.returncode == -signal.SIGKILL:
                    tally.killed_mid_run += 1
                    committed = op.committed()
                    tally.committed_when_killed += committed
                    redo = not committed
                elif proc.returncode == 0:
                    tally.finished_before_kill += 1
                else:
                    problems.append(f"exited {proc.returncode} before the kill: {stderr.strip()[-300:]}")
                problems += check_home(op.home, oracle)
                retry_s, error = self.run_to_completion(op.home, args)
                if redo:  # after a commit a retry may take a shortcut (same data: nothing to add)
                    tally.retry_s.append(retry_s)
                    clean_runs.append(retry_s)
                problems += [f"retry: {error}"] if error else op.after_retry()
            except Exception as exc:  # noqa: BLE001 - a home the reading APIs choke on is a failure to report
                problems.append(f"{type(exc).__name__}: {exc}")
            if problems:
                tally.failures += [f"iteration {i} (kill after {delay:.3f} s): {p}" for p in problems]
                log(f"  {op_name} iteration {i}: FAILED: {problems[0]}")
            else:
                tally.survived += 1
        return tally

    def final_check(self) -> list[str]:
        """The full check of the home as the campaign left it."""
        from vivace.features.online import read_generation

        probe = Materialize(self)
        # Every materialize iteration ends with a completed run over the current sources.
        probe.states = {read_generation(self.home): self.source_offset}
        return check_home(self.home, probe.oracle())

    def garbage(self) -> tuple[int, int]:
        """(staging leftovers in tmp/, unreferenced objects): what killed runs left behind."""
        from vivace.registry import Home

        with Home(self.home) as home:
            referenced = {d for (files,) in home.db.execute("SELECT files FROM datasets")
                          for d in json.loads(files).values()}
            objects = {p.name for p in home.objects.rglob("*") if p.is_file()}
            return len(list(home.tmp.iterdir())), len(objects - referenced)


def run_campaign(root: str | Path, ops: list[str] | tuple[str, ...] = OPS, iterations: int = 1000,
                 seconds: float = 60.0, seed: int = 0, log: Callable[[str], None] = lambda line: None,
                 **options: int) -> tuple[list[OpTally], list[str], Campaign]:
    """Set up a home under `root` and run the kill loop for each op: (tallies, final problems, campaign)."""
    unknown = [op for op in ops if op not in OPERATIONS]
    if unknown:
        raise ValueError(f"unknown operation(s) {unknown}; choose from {', '.join(OPS)}")
    campaign = Campaign(Path(root), seed=seed, **options)
    campaign.setup()
    per_op = seconds / max(1, len(ops))
    tallies = []
    for op in ops:
        tallies.append(campaign.run_op(op, iterations, per_op, log))
        log(format_row(tallies[-1]))
    return tallies, campaign.final_check(), campaign


# ---- report ----------------------------------------------------------------------------

HEADER = (f"{'op':<15} {'iterations':>10} {'killed mid-run':>14} {'(committed)':>11} "
          f"{'finished first':>14} {'survived':>8} {'failures':>8} {'clean s':>8} {'retry/clean':>11}")


def format_row(t: OpTally) -> str:
    ratio = statistics.median(t.retry_s) / t.baseline_s if t.retry_s and t.baseline_s else math.nan
    return (f"{t.op:<15} {t.iterations:>10} {t.killed_mid_run:>14} {t.committed_when_killed:>11} "
            f"{t.finished_before_kill:>14} {t.survived:>8} {len(t.failures):>8} {t.baseline_s:>8.3f} {ratio:>11.2f}")


def format_table(tallies: list[OpTally]) -> str:
    total = OpTally("total", iterations=sum(t.iterations for t in tallies),
                    killed_mid_run=sum(t.killed_mid_run for t in tallies),
                    committed_when_killed=sum(t.committed_when_killed for t in tallies),
                    finished_before_kill=sum(t.finished_before_kill for t in tallies),
                    survived=sum(t.survived for t in tallies),
                    failures=[f for t in tallies for f in t.failures])
    line = (f"{'total':<15} {total.iterations:>10} {total.killed_mid_run:>14} {total.committed_when_killed:>11} "
            f"{total.finished_before_kill:>14} {total.survived:>8} {len(total.failures):>8}")
    return "\n".join([HEADER, *(format_row(t) for t in tallies), line])


def _run(args: argparse.Namespace) -> int:
    ops = [op for op in args.ops.split(",") if op]
    unknown = [op for op in ops if op not in OPERATIONS]
    if unknown:
        print(f"vivace bench chaos: error: unknown op(s) {', '.join(unknown)}; choose from {', '.join(OPS)}",
              file=sys.stderr)
        return 1
    root = Path(tempfile.mkdtemp(prefix="vivace-chaos-"))
    print(f"chaos: SIGKILL at a random point of each run (uniform in [0, {KILL_WINDOW} x the median "
          f"unkilled duration]), then a full check of the home and a retry; home {root / 'home'}")
    started = time.monotonic()
    try:
        tallies, final, campaign = run_campaign(root, ops, args.iterations, args.seconds, args.seed,
                                                log=lambda line: print(line, flush=True))
        print()
        print(format_table(tallies))
        staging, orphans = campaign.garbage()
        print(f"garbage left by killed runs (harmless, collected by later writers): {staging} staging "
              f"entries in tmp/, {orphans} unreferenced data objects")
        failures = [f"{t.op} {f}" for t in tallies for f in t.failures] + [f"final check: {p}" for p in final]
        survived = sum(t.survived for t in tallies)
        iterations = sum(t.iterations for t in tallies)
        print(f"survived {survived}/{iterations} kills ({survived / max(1, iterations):.3f}); "
              f"clean s = median of {BASELINE_RUNS} unkilled runs before the kills; "
              f"retry/clean = median retry of a run killed before its commit / clean; "
              f"{time.monotonic() - started:.0f} s in all")
        for line in failures[:20]:
            print(f"FAIL {line}")
        return 1 if failures else 0
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def register(subparsers) -> None:
    p = subparsers.add_parser("chaos", help="SIGKILL data add / register / promote / materialize at random "
                                            "points and check the home stays consistent")
    p.add_argument("--iterations", type=int, default=1000, help="kills per operation at most (default 1000)")
    p.add_argument("--seconds", type=float, default=60.0,
                   help="time for the kill loops, shared by the operations (default 60)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill delays")
    p.add_argument("--keep", action="store_true", help="keep the scratch home for inspection")
    p.set_defaults(func=_run)
