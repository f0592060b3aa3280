"""Offline scoring on Ray: `vivace score --ray` and `score_dataset`.

For datasets larger than one machine: Ray Data reads the rows where the cluster keeps
them, and `map_batches` runs them through a pool of actors, each holding one `Scorer` of
the package. The package travels through Ray's object store (put once, verified by its
SHA-256 hashes when an actor writes it out), so workers need no shared file system. Each
batch is turned into model inputs and output columns exactly as `vivace score` does
(engine/commands.py `table_inputs` and `output_columns`), so both write the same table.
Actors are restarted, and their batches retried, when a worker dies mid-job.

    import ray
    from vivace.engine.distributed import score_dataset

    scored = score_dataset(ray.data.read_parquet("s3://bucket/rows/"), "models/churn", actors=4)
    scored.write_parquet("s3://bucket/scored/")
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from vivace.registry.package import ModelPackage, load_package


class _PackageScorer:
    """A Ray actor's state: the package written out from the object store, and its Scorer."""

    def __init__(self, files_ref: Any, columns: str | None, num_threads: int | None):
        import ray

        from .scorer import Scorer

        files = ray.get(files_ref)
        self._dir = tempfile.TemporaryDirectory(prefix="vivace-ray-package-")
        for name, data in files.items():
            Path(self._dir.name, name).write_bytes(data)
        self.package = load_package(self._dir.name)  # every file checked against package.json
        self.scorer = Scorer(self.package, num_threads=num_threads)
        self.columns = columns

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        from .commands import output_columns, table_inputs

        data, carried = table_inputs(batch, self.columns, self.package)
        result = self.scorer.predict(data)
        outputs = result if isinstance(result, dict) else {self.package.outputs[0].name: result}
        return pa.table(output_columns(outputs, carried))


def package_files(package: ModelPackage) -> dict[str, bytes]:
    """Every file of a package, package.json included: what an actor writes out."""
    from vivace.registry.package import MANIFEST

    return {name: (package.path / name).read_bytes() for name in (MANIFEST, *package.files)}


def score_dataset(dataset: Any, package: str | os.PathLike | ModelPackage, *, columns: str | None = None,
                  actors: int = 1, batch_size: int = 4096, num_threads: int | None = None) -> Any:
    """The Ray dataset `dataset` scored by `package` (a directory or a loaded package): a
    dataset of the rows' carried columns and the model's outputs, as `vivace score` writes
    them, in the input's order. `actors` Scorer actors run `batch_size` rows at a time."""
    import ray

    loaded = package if isinstance(package, ModelPackage) else load_package(package)
    files_ref = ray.put(package_files(loaded))
    scored = dataset.map_batches(
        _PackageScorer, fn_constructor_args=(files_ref, columns, num_threads), batch_size=batch_size,
        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1,
        # a worker lost mid-job: its actor comes back and the batches it held run again
        max_restarts=-1, max_task_retries=-1)
    scored.context.execution_options.preserve_order = True  # a dataset keeps its own copy of the context
    return scored
