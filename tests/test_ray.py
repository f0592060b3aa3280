"""Offline scoring on Ray (`vivace score --ray`, `vivace.engine.distributed.score_dataset`)
on a real local Ray cluster of two nodes (a head and a worker node on 127.0.0.1): the
output must be what `vivace score` writes on one machine, also when a worker process is
killed mid-job; bad input is one line of error."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from vivace.engine.distributed import score_dataset  # noqa: E402
from vivace.registry.packaging import package_python_model  # noqa: E402

WIDTH = 32
SLOW = '''
import time


class Slow:
    def predict(self, x):
        time.sleep(0.05)
        return {"total": x.sum(axis=1, keepdims=True)}
'''


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 100 << 20,
                                                          "include_dashboard": False})
    nodes.add_node(num_cpus=2, object_store_memory=100 << 20)
    ray.init(address=nodes.address, logging_level="ERROR", log_to_driver=False)
    nodes.wait_for_nodes()
    yield nodes
    ray.shutdown()
    nodes.shutdown()


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """A parquet dataset of several files: 32 feature columns and an id column."""
    root = tmp_path_factory.mktemp("rows") / "rows"
    root.mkdir()
    rng = np.random.default_rng(0)
    for part in range(4):
        values = rng.standard_normal((2500, WIDTH)).astype(np.float32)
        table = pa.table({"customer_id": np.arange(part * 2500, (part + 1) * 2500),
                          **{f"f{j}": values[:, j] for j in range(WIDTH)}})
        pq.write_table(table, root / f"part-{part}.parquet")
    return root


def vivace(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vivace", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def local_score(package, source: Path, out: Path, columns: str) -> pa.Table:
    whole = out.with_suffix(".in.parquet")
    pq.write_table(pa.concat_tables(pq.read_table(p) for p in sorted(source.glob("*.parquet"))), whole)
    done = vivace("score", package, "--input", whole, "--output", out, "--columns", columns)
    assert done.returncode == 0, done.stderr
    return pq.read_table(out)


COLUMNS = ",".join(f"f{j}" for j in range(WIDTH))


def test_score_dataset_matches_vivace_score_on_one_machine(cluster, rows, mlp_package, tmp_path):
    expected = local_score(mlp_package, rows, tmp_path / "local.parquet", COLUMNS)
    dataset = ray.data.read_parquet(str(rows), file_extensions=["parquet"])
    scored = score_dataset(dataset, mlp_package, columns=COLUMNS, actors=2, batch_size=1000)
    got = pa.concat_tables(ray.get(scored.to_arrow_refs()))
    assert got.num_rows == 10_000 and got.column_names == expected.column_names
    np.testing.assert_array_equal(got.column("output__0").to_numpy(), expected.column("output__0").to_numpy())


def test_the_cli_scores_on_an_existing_cluster_into_one_file_or_a_directory(cluster, rows, mlp_package, tmp_path):
    expected = local_score(mlp_package, rows, tmp_path / "local.parquet", COLUMNS)
    env = dict(os.environ, RAY_ADDRESS=cluster.address)
    single = tmp_path / "ray.parquet"
    done = subprocess.run([sys.executable, "-m", "vivace", "score", str(mlp_package), "--input", str(rows),
                           "--output", str(single), "--columns", COLUMNS, "--ray", "--ray-actors", "2"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert pq.read_table(single).equals(expected)
    folder = tmp_path / "scored"
    done = subprocess.run([sys.executable, "-m", "vivace", "score", str(mlp_package), "--input", str(rows),
                           "--output", str(folder), "--columns", COLUMNS, "--ray"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    written = pq.read_table(folder)
    assert sorted(written.column("output__0").to_pylist()) == sorted(expected.column("output__0").to_pylist())


def _actor_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "MapWorker" in title and "PackageScorer" in title:
                pids.append(int(entry.name))
    return pids


def test_a_worker_killed_mid_job_is_replaced_and_the_job_completes(cluster, tmp_path):
    (tmp_path / "slow.py").write_text(SLOW)
    package = package_python_model(f"{tmp_path / 'slow.py'}:Slow", tmp_path / "slow", name="slow",
                                   inputs=[f"x:FP32:{WIDTH}"])
    values = np.random.default_rng(1).standard_normal((6000, WIDTH)).astype(np.float32)
    dataset = ray.data.from_arrow(pa.table({f"f{j}": values[:, j] for j in range(WIDTH)}))
    result: dict = {}

    def run() -> None:
        scored = score_dataset(dataset, package.path, actors=2, batch_size=100)
        result["table"] = pa.concat_tables(ray.get(scored.to_arrow_refs()))

    job = threading.Thread(target=run)
    job.start()
    deadline = time.monotonic() + 60
    while not _actor_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    victims = _actor_pids()
    assert victims, "no scoring actor process appeared"
    time.sleep(0.5)  # some batches done, most still to come
    os.kill(victims[0], signal.SIGKILL)
    job.join(timeout=240)
    assert not job.is_alive(), "the job did not finish after a worker was killed"
    totals = result["table"].column("total").to_numpy()
    np.testing.assert_allclose(totals, values.sum(axis=1), rtol=1e-5, atol=1e-4)  # every row, in order, once


def test_bad_input_is_one_line_of_error(mlp_package, rows, tmp_path):
    npy = tmp_path / "rows.npy"
    np.save(npy, np.zeros((3, WIDTH), np.float32))
    for args, words in (
        (["score", mlp_package, "--input", npy, "--output", tmp_path / "o.parquet", "--ray"], "parquet"),
        (["score", tmp_path / "nothing", "--input", rows, "--output", tmp_path / "o.parquet", "--ray"], "nothing"),
        (["score", mlp_package, "--input", tmp_path / "missing", "--output", tmp_path / "o.parquet", "--ray"],
         "missing"),
    ):
        done = vivace(*args)
        assert done.returncode != 0
        assert words in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not (tmp_path / "o.parquet").exists()
