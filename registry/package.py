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

Shapes include the batch dimension as -1 (the KServe v2 metadata convention). Every file
listed under `files` is verified by SHA-256 when the package is loaded, so corrupted or
substituted artifacts are refused before they run.

This module lives in `registry` (not `engine`) because the registry stores packages and
the engine serves them; the engine imports registry, never the reverse.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "vivace-model-package/1"
MANIFEST = "package.json"

DATATYPES = {
    "BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8,
    "INT8": 1, "INT16": 2, "INT32": 4, "INT64": 8,
    "FP16": 2, "BF16": 2, "FP32": 4, "FP64": 8,
}
NUMPY_DTYPES = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class PackageError(ValueError):
    """A model package is missing, malformed, or fails verification."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # with the batch dimension first, as -1

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    @property
    def row_elements(self) -> int:
        n = 1
        for d in self.row_shape:
            n *= d
        return n

    @property
    def row_bytes(self) -> int:
        return self.row_elements * DATATYPES[self.datatype]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "TensorSpec":
        if not isinstance(obj, dict):
            raise PackageError(f"{where}: each tensor must be an object with name, datatype, shape")
        name, datatype, shape = obj.get("name"), obj.get("datatype"), obj.get("shape")
        if not isinstance(name, str) or not name:
            raise PackageError(f"{where}: tensor name must be a non-empty string")
        if datatype not in DATATYPES:
            raise PackageError(f"{where}: tensor {name!r} has unsupported datatype {datatype!r}")
        if (
            not isinstance(shape, list)
            or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        ):
            raise PackageError(f"{where}: tensor {name!r} shape must be a list of integers")
        if shape[0] != -1:
            raise PackageError(f"{where}: tensor {name!r} shape must start with the batch dimension -1")
        if any(d < 1 for d in shape[1:]):
            raise PackageError(
                f"{where}: tensor {name!r} may only have a variable batch dimension; got {shape}"
            )
        return cls(name, datatype, tuple(shape))


@dataclass
class QueuePolicy:
    default_timeout_microseconds: int = 0
    allow_timeout_override: bool = True
    max_queue_size: int = 0


@dataclass
class DynamicBatching:
    preferred_batch_size: list[int] = field(default_factory=list)
    max_queue_delay_microseconds: int = 0
    priority_levels: int = 1
    default_priority_level: int = 1
    default_queue_policy: QueuePolicy = field(default_factory=QueuePolicy)


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

    def manifest(self) -> dict[str, Any]:
        db = self.dynamic_batching
        return {
            "format": FORMAT,
            "name": self.name,
            "version": self.version,
            "platform": self.platform,
            "model_file": self.model_file,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "max_batch_size": self.max_batch_size,
            "dynamic_batching": {
                "preferred_batch_size": list(db.preferred_batch_size),
                "max_queue_delay_microseconds": db.max_queue_delay_microseconds,
                "priority_levels": db.priority_levels,
                "default_priority_level": db.default_priority_level,
                "default_queue_policy": {
                    "default_timeout_microseconds": db.default_queue_policy.default_timeout_microseconds,
                    "allow_timeout_override": db.default_queue_policy.allow_timeout_override,
                    "max_queue_size": db.default_queue_policy.max_queue_size,
                },
            },
            "instance_group": {"count": self.instance_count, "kind": self.instance_kind},
            "parameters": dict(self.parameters),
            "metadata": dict(self.metadata),
            "files": dict(self.files),
        }


def _int(obj: dict, key: str, default: int, where: str, minimum: int = 0) -> int:
    value = obj.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise PackageError(f"{where}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def parse_manifest(manifest: Any, path: Path) -> ModelPackage:
    """Validate a manifest dict; raises PackageError naming the first problem."""
    where = str(path / MANIFEST)
    if not isinstance(manifest, dict):
        raise PackageError(f"{where}: must be a JSON object")
    if manifest.get("format") != FORMAT:
        raise PackageError(f"{where}: format must be {FORMAT!r}, got {manifest.get('format')!r}")
    name = manifest.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PackageError(f"{where}: name must match {_NAME_RE.pattern}, got {name!r}")
    version = str(manifest.get("version", "1"))
    if not _NAME_RE.match(version):
        raise PackageError(f"{where}: version must match {_NAME_RE.pattern}, got {version!r}")
    platform = manifest.get("platform")
    if not isinstance(platform, str) or not platform:
        raise PackageError(f"{where}: platform must be a non-empty string")
    model_file = manifest.get("model_file")
    if not isinstance(model_file, str) or not model_file or "/" in model_file or model_file.startswith("."):
        raise PackageError(f"{where}: model_file must be a plain file name inside the package")
    tensors = {}
    for kind in ("inputs", "outputs"):
        specs = manifest.get(kind)
        if not isinstance(specs, list) or not specs:
            raise PackageError(f"{where}: {kind} must be a non-empty list")
        tensors[kind] = [TensorSpec.from_json(s, f"{where} {kind}") for s in specs]
        names = [t.name for t in tensors[kind]]
        if len(set(names)) != len(names):
            raise PackageError(f"{where}: duplicate {kind} names {names}")
    mbs = _int(manifest, "max_batch_size", 128, where, minimum=1)
    db_obj = manifest.get("dynamic_batching") or {}
    if not isinstance(db_obj, dict):
        raise PackageError(f"{where}: dynamic_batching must be an object")
    qp_obj = db_obj.get("default_queue_policy") or {}
    if not isinstance(qp_obj, dict):
        raise PackageError(f"{where}: default_queue_policy must be an object")
    preferred = db_obj.get("preferred_batch_size", [])
    if not isinstance(preferred, list) or not all(
        isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= mbs for p in preferred
    ):
        raise PackageError(f"{where}: preferred_batch_size entries must be integers in 1..{mbs}")
    levels = _int(db_obj, "priority_levels", 1, where, minimum=1)
    default_level = _int(db_obj, "default_priority_level", 1, where, minimum=1)
    if default_level > levels:
        raise PackageError(f"{where}: default_priority_level must be within 1..priority_levels")
    allow = qp_obj.get("allow_timeout_override", True)
    if not isinstance(allow, bool):
        raise PackageError(f"{where}: allow_timeout_override must be true or false")
    batching = DynamicBatching(
        preferred_batch_size=sorted(preferred),
        max_queue_delay_microseconds=_int(db_obj, "max_queue_delay_microseconds", 0, where),
        priority_levels=levels,
        default_priority_level=default_level,
        default_queue_policy=QueuePolicy(
            default_timeout_microseconds=_int(qp_obj, "default_timeout_microseconds", 0, where),
            allow_timeout_override=allow,
            max_queue_size=_int(qp_obj, "max_queue_size", 0, where),
        ),
    )
    group = manifest.get("instance_group") or {}
    if not isinstance(group, dict):
        raise PackageError(f"{where}: instance_group must be an object")
    kind = group.get("kind", "KIND_CPU")
    if kind not in ("KIND_CPU", "KIND_GPU", "KIND_AUTO"):
        raise PackageError(f"{where}: instance_group.kind must be KIND_CPU, KIND_GPU or KIND_AUTO")
    for key in ("parameters", "metadata", "files"):
        if not isinstance(manifest.get(key, {}), dict):
            raise PackageError(f"{where}: {key} must be an object")
    files = manifest.get("files", {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise PackageError(f"{where}: files must map file names to sha256 hex digests")
    return ModelPackage(
        path=path,
        name=name,
        version=version,
        platform=platform,
        model_file=model_file,
        inputs=tensors["inputs"],
        outputs=tensors["outputs"],
        max_batch_size=mbs,
        dynamic_batching=batching,
        instance_count=_int(group, "count", 1, where, minimum=1),
        instance_kind=kind,
        parameters=dict(manifest.get("parameters", {})),
        metadata=dict(manifest.get("metadata", {})),
        files=dict(files),
    )


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
        manifest = json.loads(manifest_path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"{manifest_path}: invalid JSON ({exc})") from None
    package = parse_manifest(manifest, path)
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
        (tmp / MANIFEST).write_text(json.dumps(package.manifest(), indent=2, sort_keys=False) + "\n")
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
