"""The package manifest spec (vivace/spec.py) through registry/package.py, its one reader
and writer: every package kind Vivace writes round-trips, manifests written before the
spec still load to the same content, and malformed, truncated, wrong-typed or hostile
manifests are refused with the field's path, leaving nothing half-written."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vivace import spec
from vivace.registry.package import MANIFEST, PackageError, load_package, write_package

SHA = "0" * 64


def _base(**extra):
    manifest = {
        "name": "mlp", "version": "1", "platform": "torchscript", "model_file": "model.pt",
        "inputs": [{"name": "input__0", "datatype": "FP32", "shape": [-1, 32]}],
        "outputs": [{"name": "output__0", "datatype": "FP32", "shape": [-1, 1]}],
    }
    manifest.update(extra)
    return manifest


# The manifests each writer in the tree produces (bench/model.py, registry/train.py,
# engine/native/convert.py, bench/entities.py, bench/monitoring.py), with every datatype.
KINDS = {
    "reference": (_base(
        max_batch_size=64, parameters={"torch_num_threads": 1},
        dynamic_batching={"max_queue_delay_microseconds": 100, "preferred_batch_size": [32, 8]},
        metadata={"description": "Vivace benchmark reference MLP"}), {"model.pt": b"pt"}),
    "torch_export": (_base(platform="torch_export", model_file="model.pt2"), {"model.pt2": b"pt2"}),
    "trained": (_base(
        name="churn", max_batch_size=128, parameters={"torch_num_threads": 1},
        metadata={"run_id": "r1", "task": "binary", "target": "y", "datasets": {"d": "v1"},
                  "feature_views": {"fv": 2}, "features": [{"name": "a", "dtype": "float64"}],
                  "profile": "profile.json", "weights_sha256": SHA, "metrics": {"auc": 0.9}}),
        {"model.pt": b"pt", "profile.json": b"{}"}),
    "native": (_base(
        platform="native_mlp", model_file="model.npz", version="1-int8",
        instance_group={"count": 2, "kind": "KIND_CPU"},
        parameters={"precision": "int8", "activation_scales": "static", "num_threads": 1},
        metadata={"native_mlp": {"layers": [], "macs_per_row": 10}, "accuracy": {"max_abs_error": 0.01},
                  "lineage": {"quantized_from": "mlp/1", "source_model_sha256": SHA}}),
        {"model.npz": b"npz"}),
    "by_entity": (_base(name="mlp_by_id", metadata={"feature_service": "scoring", "unknown_entity": "default"}),
                  {"model.pt": b"pt"}),
    "onnx": (_base(
        platform="onnxruntime", model_file="model.onnx",
        parameters={"intra_op_thread_count": 2, "inter_op_thread_count": 1, "graph_optimization_level": "extended",
                    "execution_mode": "parallel", "session_config": {"session.intra_op.allow_spinning": "0"}}),
        {"model.onnx": b"onnx"}),
    "python": (_base(platform="python", model_file="model.py", parameters={"python_class": "Model"}),
               {"model.py": b"class Model: ...", "vocab.txt": b"a"}),
    "every_datatype": (_base(
        inputs=[{"name": f"i{n}", "datatype": d, "shape": [-1, 2, n + 1]} for n, d in enumerate(spec.TENSOR_DATATYPES)],
        outputs=[{"name": "o", "datatype": "BF16", "shape": [-1]}],
        instance_group={"count": 1, "kind": "KIND_AUTO"},
        dynamic_batching={"priority_levels": 3, "default_priority_level": 2,
                          "default_queue_policy": {"default_timeout_microseconds": 5, "allow_timeout_override": False,
                                                   "max_queue_size": 9}}),
        {"model.pt": b"pt", "notes.txt": b"n"}),
}


@pytest.mark.parametrize("kind", KINDS)
def test_every_package_kind_round_trips(tmp_path, kind):
    manifest, files = KINDS[kind]
    written = write_package(tmp_path / kind, copy.deepcopy(manifest), files)
    loaded = load_package(tmp_path / kind)
    assert loaded == written
    on_disk = json.loads((tmp_path / kind / MANIFEST).read_bytes())
    assert on_disk == loaded.manifest()
    for key, value in manifest.items():  # what the writer asked for is what was stored
        if key == "dynamic_batching" and "preferred_batch_size" in value:
            value = dict(value, preferred_batch_size=sorted(value["preferred_batch_size"]))
        if key != "dynamic_batching":
            assert on_disk[key] == value, key
    rewritten = write_package(tmp_path / "again", loaded.manifest(), files)
    assert (tmp_path / "again" / MANIFEST).read_bytes() == (tmp_path / kind / MANIFEST).read_bytes()
    assert rewritten.manifest() == loaded.manifest()


# package.json exactly as the writer before the spec (json.dumps, indent=2) wrote it.
LEGACY = """{
  "format": "vivace-model-package/1",
  "name": "mlp",
  "version": "1",
  "platform": "torchscript",
  "model_file": "model.pt",
  "inputs": [
    {
      "name": "input__0",
      "datatype": "FP32",
      "shape": [
        -1,
        32
      ]
    }
  ],
  "outputs": [
    {
      "name": "output__0",
      "datatype": "FP32",
      "shape": [
        -1,
        1
      ]
    }
  ],
  "max_batch_size": 128,
  "dynamic_batching": {
    "preferred_batch_size": [],
    "max_queue_delay_microseconds": 0,
    "priority_levels": 1,
    "default_priority_level": 1,
    "default_queue_policy": {
      "default_timeout_microseconds": 0,
      "allow_timeout_override": true,
      "max_queue_size": 0
    }
  },
  "instance_group": {
    "count": 1,
    "kind": "KIND_CPU"
  },
  "parameters": {
    "torch_num_threads": 1
  },
  "metadata": {
    "description": "x"
  },
  "files": {
    "model.pt": "e75b11da693d7bb5273985dcf9f02729455da7e7c80e54a0615e00ec2ae76d8e"
  }
}
"""


def _package_dir(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "pkg"
    path.mkdir(exist_ok=True)
    (path / "model.pt").write_bytes(b"pt")
    data = text.encode() if isinstance(text, str) else text
    (path / MANIFEST).write_bytes(data)
    return path


def test_manifest_written_before_the_spec_loads_unchanged(tmp_path):
    path = _package_dir(tmp_path, LEGACY)
    package = load_package(path, verify=False)
    assert package.manifest() == json.loads(LEGACY)
    # the new writer writes the same fields in the same order
    written = write_package(tmp_path / "new", package.manifest(), {"model.pt": b"pt"})
    assert list(json.loads((written.path / MANIFEST).read_bytes())) == list(json.loads(LEGACY))


def test_lenient_forms_read_as_before(tmp_path):
    """Null sections read as their defaults, an integer version as its decimal form, and
    unknown fields are ignored (and dropped when written)."""
    manifest = dict(_base(version=3, dynamic_batching=None, instance_group=None, extra_field={"x": 1}),
                    format=spec.FORMAT)
    manifest["inputs"][0]["comment"] = "ignored"
    package = load_package(_package_dir(tmp_path, json.dumps(manifest)), verify=False)
    assert package.version == "3" and package.dynamic_batching.priority_levels == 1
    assert package.instance_kind == "KIND_CPU" and "extra_field" not in package.manifest()
    manifest["dynamic_batching"] = {"default_queue_policy": None}
    package = load_package(_package_dir(tmp_path, json.dumps(manifest)), verify=False)
    assert package.dynamic_batching.default_queue_policy.max_queue_size == 0


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda m: m.update(max_batch_size=0), r"Expected `int` >= 1 - at `\$.max_batch_size`"),
        (lambda m: m.update(max_batch_size="8"), r"Expected `int`, got `str` - at `\$.max_batch_size`"),
        (lambda m: m.update(max_batch_size=True), r"got `bool` - at `\$.max_batch_size`"),
        (lambda m: m.update(max_batch_size=8.5), r"Expected `int`, got `float` - at `\$.max_batch_size`"),
        (lambda m: m.update(format="vivace-model-package/2"), r"at `\$.format`"),
        (lambda m: m.pop("format"), r"missing required field `format`"),
        (lambda m: m.update(name="no spaces"), r"at `\$.name`"),
        (lambda m: m.update(version=-1), r"version must be a non-negative integer"),
        (lambda m: m.update(platform=""), r"at `\$.platform`"),
        (lambda m: m.update(model_file="../etc/passwd"), r"at `\$.model_file`"),
        (lambda m: m.update(model_file=".hidden"), r"at `\$.model_file`"),
        (lambda m: m.update(inputs=[]), r"length >= 1 - at `\$.inputs`"),
        (lambda m: m.update(outputs={"name": "o"}), r"Expected `array`, got `object` - at `\$.outputs`"),
        (lambda m: m["inputs"][0].update(datatype="FP99"), r"at `\$.inputs\[0\].datatype`"),
        (lambda m: m["inputs"][0].update(datatype="BYTES"), r"at `\$.inputs\[0\].datatype`"),
        (lambda m: m["outputs"][0].update(name=""), r"at `\$.outputs\[0\].name`"),
        (lambda m: m["inputs"][0].update(shape=[32]), r"batch dimension -1 - at `\$.inputs\[0\]`"),
        (lambda m: m["inputs"][0].update(shape=[-1, 0]), r"variable batch dimension.* - at `\$.inputs\[0\]`"),
        (lambda m: m["inputs"][0].update(shape=[-1, 2.5]), r"at `\$.inputs\[0\].shape\[1\]`"),
        (lambda m: m["inputs"].append(dict(m["inputs"][0])), r"duplicate inputs names"),
        (lambda m: m.update(dynamic_batching={"preferred_batch_size": [1000]}), r"preferred_batch_size"),
        (lambda m: m.update(dynamic_batching={"preferred_batch_size": [0]}),
         r"at `\$.dynamic_batching.preferred_batch_size\[0\]`"),
        (lambda m: m.update(dynamic_batching={"priority_levels": 2, "default_priority_level": 3}),
         r"default_priority_level must be within 1..priority_levels - at `\$.dynamic_batching`"),
        (lambda m: m.update(dynamic_batching={"default_queue_policy": {"max_queue_size": -1}}),
         r"at `\$.dynamic_batching.default_queue_policy.max_queue_size`"),
        (lambda m: m.update(dynamic_batching={"default_queue_policy": {"allow_timeout_override": 1}}),
         r"Expected `bool`, got `int` - at `\$.dynamic_batching.default_queue_policy.allow_timeout_override`"),
        (lambda m: m.update(instance_group={"kind": "KIND_TPU"}), r"at `\$.instance_group.kind`"),
        (lambda m: m.update(instance_group={"count": 0}), r"at `\$.instance_group.count`"),
        (lambda m: m.update(parameters=None), r"Expected `object`, got `null` - at `\$.parameters`"),
        (lambda m: m.update(metadata=[1]), r"at `\$.metadata`"),
        (lambda m: m.update(files={"model.pt": "not-a-digest"}), r"at `\$.files\[...\]`"),
        (lambda m: m.update(files={"../model.pt": SHA}), r"at `key` in `\$.files`"),
    ],
)
def test_bad_manifests_name_the_field(tmp_path, mutate, message):
    manifest = dict(_base(), format=spec.FORMAT, files={"model.pt": SHA})
    mutate(manifest)
    path = _package_dir(tmp_path, json.dumps(manifest))
    with pytest.raises(PackageError, match=message) as info:
        load_package(path, verify=False)
    assert str(info.value).startswith(str(path / MANIFEST))
    if "format" in message or "files" in message:
        return  # the writer sets format and files itself
    manifest.pop("files", None)
    with pytest.raises(PackageError, match=message):  # the writer refuses the same manifest
        write_package(tmp_path / "out", manifest, {"model.pt": b"pt"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]  # nothing half-written


def _valid(**fields: str) -> bytes:
    """A valid manifest plus `fields` given as JSON text (json.dumps cannot write 1e400)."""
    parts = [f'"{k}": {v}' for k, v in fields.items()]
    base = json.dumps(dict(_base(), format=spec.FORMAT))
    return (base[:-1] + ", " + ", ".join(parts) + "}").encode()


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "invalid JSON"),
        (b"[]", r"Expected `object`, got `array`"),
        (b"\xff\xfe{}", "invalid JSON"),
        (b'{"format": "vivace-model-package/1", "max_batch_size": NaN}', "invalid JSON"),
        (b'{"metadata": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_001, "nested too deeply"),
        (_valid(max_batch_size="1" + "0" * 400), r"Expected `int` <= 9223372036854775807 - at `\$.max_batch_size`"),
        (_valid(max_batch_size="1e400"), r"out of range - at `\$.max_batch_size`"),
        (_valid(inputs=json.dumps([{"name": "x", "datatype": "FP64", "shape": [-1, 2**31, 2**31]}])),
         r"exceed 1099511627776 bytes - at `\$.inputs\[0\]`"),
    ],
)
def test_hostile_manifests_are_refused(tmp_path, data, message):
    with pytest.raises(PackageError, match=message):
        load_package(_package_dir(tmp_path, data), verify=False)


def test_every_truncation_is_refused(tmp_path):
    path = _package_dir(tmp_path, LEGACY)
    data = LEGACY.encode().rstrip()
    for end in range(len(data)):
        (path / MANIFEST).write_bytes(data[:end])
        with pytest.raises(PackageError, match="invalid JSON"):
            load_package(path, verify=False)


def test_a_deep_manifest_given_as_objects_is_refused(tmp_path):
    deep: dict = {}
    node = deep
    for _ in range(100_000):
        node["a"] = {}
        node = node["a"]
    with pytest.raises(PackageError, match="nested too deeply"):
        write_package(tmp_path / "out", _base(metadata=deep), {"model.pt": b"pt"})
    assert list(tmp_path.iterdir()) == []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8) | st.sampled_from(["FP32", "BF16", "KIND_GPU", "model.pt", SHA, "-1"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def _paths(value, prefix=()):
    """Every place in a JSON value where another value could go."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, (*prefix, i))


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(sorted(KINDS)), data=st.data())
def test_any_mutated_manifest_is_refused_by_path_or_round_trips(kind, data):
    """Put an arbitrary JSON value anywhere in a valid manifest (or add a field): either the
    spec refuses it with a ManifestError, or what it accepts encodes and decodes to itself."""
    manifest = dict(copy.deepcopy(KINDS[kind][0]), format=spec.FORMAT)
    places = list(_paths(manifest))[1:]
    path = data.draw(st.sampled_from(places) | st.just(("new_field",)))
    value = data.draw(json_values)
    node = manifest
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    try:
        decoded = spec.decode(json.dumps(manifest).encode())
    except spec.ManifestError as exc:
        assert str(exc)  # refused, with a reason
        return
    encoded = spec.encode(decoded)
    assert spec.encode(spec.decode(encoded)) == encoded
