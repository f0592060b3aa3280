"""Model packages: the unit Vivace serves, scores and registers.

A model package is a directory:

    package.json   signature, batching config, runtime parameters, file hashes
    model.pt       the model (TorchScript), or model.pt2 (torch.export), or another
                   file named by `model_file` for other platforms

`package.json` follows Triton's model configuration names where one exists, so that a
Triton user reads it without a manual:

    {
      "format": "vivace-model-package/1",
      "name": "mlp", "version": "1",
      "platform": "torchscript",            # or "torch_export", "native_mlp", ...
      "model_file": "model.pt",
      "inputs":  [{"name": "input__0",  "datatype": "FP32", "shape": [-1, 32]}],
      "outputs": [{"name": "output__0", "datatype": "FP32", "shape": [-1, 1]}],
      "max_batch_size": 128,
      "dynamic_batching": {
        "preferred_batch_size": [], "max_queue_delay_microseconds": 0,
        "priority_levels": 1, "default_priority_level": 1,
        "default_queue_policy": {"default_timeout_microseconds": 0,
                                 "allow_timeout_override": true, "max_queue_size": 0}
      },
      "instance_group": {"count": 1, "kind": "KIND_CPU"},
      "parameters": {"torch_num_threads": 1},
      "metadata": {...free-form: training run, lineage, features...},
      "files": {"model.pt": "<sha256>"}
    }

The format itself (types, constraints, field order) is defined once, in vivace/spec.py;
this module reads and writes package.json only through it. Shapes include the batch
dimension as -1 (the KServe v2 metadata convention). Every file
listed under `files` is verified by SHA-256 when the package is loaded, so corrupted or
substituted artifacts are refused before they run.

This module lives in `registry` (not `engine`) because the registry stores packages and
the engine serves them; the engine imports registry, never the reverse.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vivace import datatypes, spec
from vivace.spec import FORMAT, MANIFEST, DynamicBatching, QueuePolicy, TensorSpec

__all__ = [
    "DATATYPES", "FORMAT", "MANIFEST", "NUMPY_DTYPES", "DynamicBatching", "ModelPackage", "PackageError",
    "QueuePolicy", "TensorSpec", "load_package", "parse_manifest", "sha256_file", "write_package",
]

# Views of vivace.datatypes kept for importers: bytes per element of every datatype a
# package may use, and the numpy dtype names of those numpy holds natively (not BF16).
DATATYPES = {name: datatypes.itemsize(name) for name in datatypes.TENSOR_DATATYPES}
NUMPY_DTYPES = {
    name: datatypes.get(name).numpy for name in datatypes.TENSOR_DATATYPES if datatypes.numpy_native(name)
}


class PackageError(ValueError):
    """A model package is missing, malformed, or fails verification."""


@dataclass
class ModelPackage:
    """A loaded (and verified) package manifest plus the directory it lives in."""

    path: Path
    name: str
    version: str
    platform: str
    model_file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch_size: int = 128
    dynamic_batching: DynamicBatching = field(default_factory=DynamicBatching)
    instance_count: int = 1
    instance_kind: str = "KIND_CPU"
    parameters: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def model_path(self) -> Path:
        return self.path / self.model_file

    def to_spec(self) -> spec.Manifest:
        return spec.Manifest(
            format=FORMAT, name=self.name, version=self.version, platform=self.platform,
            model_file=self.model_file, inputs=list(self.inputs), outputs=list(self.outputs),
            max_batch_size=self.max_batch_size, dynamic_batching=self.dynamic_batching,
            instance_group=spec.InstanceGroup(self.instance_count, self.instance_kind),  # type: ignore[arg-type]
            parameters=self.parameters, metadata=self.metadata, files=self.files,
        )

    def manifest(self) -> dict[str, Any]:
        """The manifest as JSON-ready Python objects (a fresh copy the caller may change)."""
        return spec.to_dict(self.to_spec())

    @classmethod
    def from_spec(cls, manifest: spec.Manifest, path: Path) -> "ModelPackage":
        group = manifest.instance_group or spec.InstanceGroup()  # never None once decoded
        return cls(
            path=path,
            name=manifest.name,
            version=str(manifest.version),
            platform=manifest.platform,
            model_file=manifest.model_file,
            inputs=manifest.inputs,
            outputs=manifest.outputs,
            max_batch_size=manifest.max_batch_size,
            dynamic_batching=manifest.dynamic_batching or DynamicBatching(),
            instance_count=group.count,
            instance_kind=group.kind,
            parameters=manifest.parameters,
            metadata=manifest.metadata,
            files=manifest.files,
        )


def parse_manifest(manifest: Any, path: Path) -> ModelPackage:
    """Validate a manifest given as Python objects; raises PackageError naming the field."""
    try:
        return ModelPackage.from_spec(spec.convert(manifest), path)
    except spec.ManifestError as exc:
        raise PackageError(f"{path / MANIFEST}: {exc}") from None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_package(path: str | os.PathLike, verify: bool = True) -> ModelPackage:
    """Read and validate a package directory; with verify, check every file's SHA-256."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise PackageError(f"{path}: not a model package directory")
    if not manifest_path.is_file():
        raise PackageError(f"{path}: missing {MANIFEST}")
    try:
        package = ModelPackage.from_spec(spec.decode(manifest_path.read_bytes()), path)
    except spec.ManifestError as exc:
        raise PackageError(f"{manifest_path}: {exc}") from None
    if not package.model_path.is_file():
        raise PackageError(f"{path}: model file {package.model_file!r} is missing")
    if verify:
        if package.model_file not in package.files:
            raise PackageError(f"{manifest_path}: files has no hash for the model file {package.model_file!r}")
        for name, digest in package.files.items():
            file_path = path / name
            if "/" in name or name.startswith(".") or not file_path.is_file():
                raise PackageError(f"{path}: listed file {name!r} is missing")
            actual = sha256_file(file_path)
            if actual != digest:
                raise PackageError(
                    f"{path}: {name} is corrupted (sha256 {actual[:12]}…, package.json says {digest[:12]}…)"
                )
    return package


def write_package(
    dest: str | os.PathLike,
    manifest: dict[str, Any],
    files: dict[str, bytes | os.PathLike | str],
    overwrite: bool = False,
) -> ModelPackage:
    """Write a package atomically: build it in a sibling temp dir, then rename into place.

    `files` maps file names to bytes or to source paths to copy. Hashes are computed here;
    the manifest's `files` entry is filled in. A crash leaves either no package or a whole one.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise PackageError(f"{dest}: already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        hashes = {}
        for name, content in files.items():
            if "/" in name or name.startswith(".") or name == MANIFEST:
                raise PackageError(f"invalid package file name {name!r}")
            target = tmp / name
            if isinstance(content, (bytes, bytearray)):
                target.write_bytes(content)
            else:
                shutil.copyfile(content, target)
            hashes[name] = sha256_file(target)
        manifest = dict(manifest, format=FORMAT, files=hashes)
        package = parse_manifest(manifest, dest)
        try:
            (tmp / MANIFEST).write_bytes(spec.encode(package.to_spec()))
        except spec.ManifestError as exc:
            raise PackageError(f"{dest / MANIFEST}: {exc}") from None
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
        return package
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
