"""Package a user's own model: `vivace package`, `package_torch_model`, `package_onnx_model`.

Takes a torch module (traced to TorchScript or exported with torch.export), a TorchScript
file (`.pt`), a torch.export file (`.pt2`) or an ONNX file (`.onnx`); names its inputs and
outputs (from example inputs or the ONNX graph, or declared), sets batching and
parameters, optionally attaches a reference profile (`vivace monitor profile`) so the
served model is drift-monitored, runs the model on a batch to check that its outputs match
the declared signature, and writes a verified package (registry/package.py
`write_package`: hashes, atomic).

    from vivace.registry.packaging import package_torch_model
    package_torch_model(model, "models/mine", name="mine", example=torch.randn(4, 32))
"""
from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

from .package import DATATYPES, ModelPackage, PackageError, write_package

# torch dtype name -> KServe v2 datatype (what the torch backend can feed and read)
_TORCH_DATATYPES = {
    "float32": "FP32", "float64": "FP64", "float16": "FP16", "bfloat16": "BF16", "int64": "INT64",
    "int32": "INT32", "int16": "INT16", "int8": "INT8", "uint8": "UINT8", "bool": "BOOL",
}
_PLATFORM_FILES = {"torchscript": "model.pt", "torch_export": "model.pt2"}


def parse_tensor_arg(text: str, default_datatype: str = "FP32") -> dict[str, Any]:
    """`NAME:DATATYPE:DIMS` (DIMS: row shape, e.g. 32 or 3x224x224; DATATYPE optional) as a
    manifest tensor entry with the batch dimension -1."""
    parts = text.split(":")
    if len(parts) == 2:
        parts = [parts[0], default_datatype, parts[1]]
    if len(parts) != 3 or not parts[0]:
        raise PackageError(f"tensor {text!r}: expected NAME:DATATYPE:DIMS, e.g. input__0:FP32:32")
    name, datatype, dims = parts
    datatype = datatype.upper()
    if datatype not in DATATYPES and datatype != "BYTES":  # BYTES: Python models (the manifest says so)
        raise PackageError(f"tensor {text!r}: unknown datatype {datatype!r}")
    try:
        row = [int(d) for d in dims.lower().split("x")] if dims else []
    except ValueError:
        raise PackageError(f"tensor {text!r}: dimensions must be integers like 32 or 3x224x224") from None
    if any(d < 1 for d in row):
        raise PackageError(f"tensor {text!r}: dimensions must be positive")
    return {"name": name, "datatype": datatype, "shape": [-1, *row]}


def _datatype_of(tensor: Any) -> str:
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in _TORCH_DATATYPES:
        raise PackageError(f"tensors of dtype {name} cannot be served")
    return _TORCH_DATATYPES[name]


def _as_tuple(example: Any) -> tuple:
    return tuple(example) if isinstance(example, (tuple, list)) else (example,)


def _specs_from(tensors: Sequence[Any], prefix: str) -> list[dict[str, Any]]:
    return [{"name": f"{prefix}__{i}", "datatype": _datatype_of(t), "shape": [-1, *t.shape[1:]]}
            for i, t in enumerate(tensors)]


def _serialize(model: Any, platform: str, example: tuple) -> bytes:
    """TorchScript (`torch.jit.save`) or torch.export (`torch.export.save`) bytes of `model`."""
    import torch

    buffer = io.BytesIO()
    if platform == "torchscript":
        if not isinstance(model, torch.jit.ScriptModule):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = torch.jit.trace(model.eval(), example)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(model, buffer)
    else:
        if not isinstance(model, torch.export.ExportedProgram):
            batch = torch.export.Dim("batch", min=1, max=1 << 20)
            # Exported at batch 2 (batch 1 would be specialised as a constant).
            rows2 = tuple(x[:1].expand(2, *x.shape[1:]).contiguous() for x in example)
            model = torch.export.export(model.eval(), rows2, dynamic_shapes=tuple({0: batch} for _ in example))
        torch.export.save(model, buffer)
    return buffer.getvalue()


def _load(data: bytes, platform: str) -> Any:
    import torch

    if platform == "torchscript":
        return torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
    return torch.export.load(io.BytesIO(data)).module()


def _batch_of(specs: list[dict[str, Any]], rows: int) -> tuple:
    """Zeros of `rows` rows for each declared input."""
    import numpy as np
    import torch

    from .package import NUMPY_DTYPES

    return tuple(torch.from_numpy(np.zeros((rows, *s["shape"][1:]), NUMPY_DTYPES[s["datatype"]]))
                 for s in specs)


def package_torch_model(
    model: Any,
    out: str | os.PathLike,
    *,
    name: str,
    version: str = "1",
    example: Any = None,
    inputs: Sequence[dict[str, Any] | str] | None = None,
    outputs: Sequence[dict[str, Any] | str] | None = None,
    platform: str | None = None,
    max_batch_size: int = 128,
    dynamic_batching: dict[str, Any] | None = None,
    parameters: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    profile: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> ModelPackage:
    """Write `model` as a verified model package at `out`.

    `model`: a torch.nn.Module, a scripted module, a torch.export ExportedProgram, or the
    path of a TorchScript (.pt) or torch.export (.pt2) file. `example`: a tensor (or tuple
    of tensors) with a batch dimension, used to trace/export a module and to name and shape
    the inputs and outputs (`input__0`..., `output__0`...). `inputs`/`outputs` declare them
    instead (dicts like the manifest's, or "NAME:DATATYPE:DIMS" strings); declared names
    replace the derived ones. `profile`: a reference profile (`vivace monitor profile`)
    whose features are the input's columns in order; the served model is then monitored
    for drift. Raises PackageError naming the problem; nothing is written then.
    """
    import torch

    in_specs = [parse_tensor_arg(s) if isinstance(s, str) else dict(s) for s in inputs or ()]
    if example is not None:
        example_t = _as_tuple(example)
    elif in_specs:  # a module can be traced on zeros of its declared inputs
        example_t = _batch_of(in_specs, 2)
    else:
        raise PackageError("declare the inputs (NAME:DATATYPE:DIMS) or give example inputs")
    if not in_specs:
        in_specs = _specs_from(example_t, "input")
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise PackageError(f"{path}: no such model file")
        platform = platform or ("torch_export" if path.suffix == ".pt2" else "torchscript")
        data = path.read_bytes()
    else:
        platform = platform or "torchscript"
        if platform not in _PLATFORM_FILES:
            raise PackageError(f"platform must be torchscript or torch_export, got {platform!r}")
        data = _serialize(model, platform, example_t)
    if platform not in _PLATFORM_FILES:
        raise PackageError(f"platform must be torchscript or torch_export, got {platform!r}")
    try:
        loaded = _load(data, platform)
    except Exception as exc:  # torch raises many types for a bad file
        raise PackageError(f"cannot load the model as {platform}: {exc}") from exc

    # Verification: the packaged model on a batch of 2 rows must give outputs of the
    # declared shapes, or every served request would fail.
    probe = tuple(x[:1].expand(2, *x.shape[1:]).contiguous() for x in example_t)
    try:
        with torch.inference_mode():
            result = loaded(*probe)
    except Exception as exc:
        raise PackageError(f"the model failed on a batch of 2 rows of its declared inputs: {exc}") from exc
    results = _as_tuple(result)
    if not all(isinstance(r, torch.Tensor) for r in results):
        raise PackageError("the model must return a tensor or a tuple of tensors")
    derived = _specs_from(results, "output")
    out_specs = [parse_tensor_arg(s) if isinstance(s, str) else dict(s) for s in outputs or ()]
    if out_specs:
        if len(out_specs) != len(derived):
            raise PackageError(f"{len(out_specs)} outputs declared, the model returns {len(derived)}")
        for spec, got, tensor in zip(out_specs, derived, results):
            if spec["shape"] != got["shape"] or spec["datatype"] != got["datatype"]:
                raise PackageError(f"output {spec['name']!r} declared {spec['datatype']} {spec['shape']}, the model "
                                   f"returns {got['datatype']} {[-1, *tensor.shape[1:]]}")
    else:
        out_specs = derived
    manifest: dict[str, Any] = {
        "name": name, "version": str(version), "platform": platform, "model_file": _PLATFORM_FILES[platform],
        "inputs": in_specs, "outputs": out_specs, "max_batch_size": max_batch_size,
        "dynamic_batching": dynamic_batching or {}, "parameters": {"torch_num_threads": 1, **(parameters or {})},
        "metadata": dict(metadata or {}),
    }
    return _write(out, manifest, {_PLATFORM_FILES[platform]: data}, profile, overwrite)


def _write(out: str | os.PathLike, manifest: dict[str, Any], files: dict[str, bytes | str | os.PathLike],
           profile: str | os.PathLike | None, overwrite: bool) -> ModelPackage:
    """Attach the profile (when given) and write the package."""
    if profile is not None:
        files = dict(files, **{"profile.json": _checked_profile(Path(profile), manifest["inputs"])})
        manifest["metadata"]["profile"] = "profile.json"
    return write_package(out, manifest, files, overwrite=overwrite)


ONNX_FILE = "model.onnx"


def _declared(specs: Sequence[dict[str, Any] | str] | None) -> list[dict[str, Any]]:
    return [parse_tensor_arg(s) if isinstance(s, str) else dict(s) for s in specs or ()]


def package_onnx_model(
    model: Any,
    out: str | os.PathLike,
    *,
    name: str,
    version: str = "1",
    example: Any = None,
    inputs: Sequence[dict[str, Any] | str] | None = None,
    outputs: Sequence[dict[str, Any] | str] | None = None,
    max_batch_size: int = 128,
    dynamic_batching: dict[str, Any] | None = None,
    parameters: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    profile: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> ModelPackage:
    """Write an ONNX model as a verified `onnxruntime` model package at `out`.

    `model`: the path of a .onnx file, its bytes, or an onnx ModelProto. Inputs and outputs
    are named and typed as the graph declares them; `inputs`/`outputs` ("NAME:DATATYPE:DIMS"
    or manifest dicts, graph names) give the row shapes of tensors whose graph shape is
    symbolic beyond the batch dimension. `parameters`: onnxruntime settings
    (vivace.spec.OnnxRuntimeParameters: intra_op_thread_count, inter_op_thread_count,
    graph_optimization_level, execution_mode, session_config, ...). The model is run with
    those settings on `example` (an array, or a sequence/mapping of arrays in input order)
    or on a batch of 2 rows of zeros; outputs must have their declared shapes.
    Raises PackageError naming the problem; nothing is written then.
    """
    import numpy as np

    from . import onnx_model
    from .package import NUMPY_DTYPES, TensorSpec

    if hasattr(model, "SerializeToString"):
        data = model.SerializeToString()
    elif isinstance(model, (bytes, bytearray)):
        data = bytes(model)
    else:
        path = Path(model)
        if not path.is_file():
            raise PackageError(f"{path}: no such model file")
        data = path.read_bytes()
    parameters = {"intra_op_thread_count": 1, "inter_op_thread_count": 1, **(parameters or {})}
    where = f"{model}: " if isinstance(model, (str, os.PathLike)) else ""
    try:
        session = onnx_model.open_session(data, parameters)
        graph_inputs, graph_outputs = onnx_model.graph_signature_or_declared(session, _declared(inputs),
                                                                             _declared(outputs))
    except PackageError as exc:
        raise PackageError(f"{where}{exc}") from None
    in_specs = [TensorSpec(s["name"], s["datatype"], tuple(s["shape"])) for s in graph_inputs]
    out_specs = [TensorSpec(s["name"], s["datatype"], tuple(s["shape"])) for s in graph_outputs]
    onnx_model.check_signature(session, in_specs, out_specs, name)

    # Verification: the model, run with the settings it will be served with, must give
    # outputs of the declared shapes and types on a batch of its declared inputs.
    if example is None:
        feed = {s.name: np.zeros((2, *s.row_shape), NUMPY_DTYPES[s.datatype]) for s in in_specs}
    elif isinstance(example, dict):
        feed = {s.name: np.asarray(example[s.name], NUMPY_DTYPES[s.datatype]) for s in in_specs}
    else:
        arrays = example if isinstance(example, (tuple, list)) else (example,)
        feed = {s.name: np.asarray(a, NUMPY_DTYPES[s.datatype]) for s, a in zip(in_specs, arrays)}
    rows = next(iter(feed.values())).shape[0]
    try:
        results = session.run([s.name for s in out_specs], feed)
    except Exception as exc:  # onnxruntime's own error types
        raise PackageError(f"{where}the model failed on a batch of {rows} rows of its declared inputs: {exc}") from None
    for s, result in zip(out_specs, results):
        if result.shape != (rows, *s.row_shape) or result.dtype != np.dtype(NUMPY_DTYPES[s.datatype]):
            raise PackageError(f"{where}output {s.name!r} is declared {s.datatype} {list(s.shape)}, the model "
                               f"returned {result.dtype} {list(result.shape)} for {rows} rows")
    manifest: dict[str, Any] = {
        "name": name, "version": str(version), "platform": "onnxruntime", "model_file": ONNX_FILE,
        "inputs": graph_inputs, "outputs": graph_outputs, "max_batch_size": max_batch_size,
        "dynamic_batching": dynamic_batching or {}, "parameters": parameters, "metadata": dict(metadata or {}),
    }
    return _write(out, manifest, {ONNX_FILE: data}, profile, overwrite)


def _checked_profile(path: Path, inputs: list[dict[str, Any]]) -> bytes:
    """The profile's bytes, once it is known to describe the (single, flat) input's columns."""
    if len(inputs) != 1 or len(inputs[0]["shape"]) != 2 or inputs[0]["datatype"] == "BYTES":
        raise PackageError("a profile can be attached to a model with one numeric input of shape [-1, N] only")
    try:
        data = path.read_bytes()
        profile = json.loads(data)
    except (OSError, ValueError) as exc:
        raise PackageError(f"cannot read the profile {path}: {exc}") from None
    features = profile.get("features") if isinstance(profile, dict) else None
    if not isinstance(features, dict) or not features:
        raise PackageError(f"{path}: not a reference profile (write one with `vivace monitor profile`)")
    columns = inputs[0]["shape"][1]
    if len(features) != columns:
        raise PackageError(f"{path} profiles {len(features)} features, the input {inputs[0]['name']!r} has "
                           f"{columns} columns")
    return data


PYTHON_FILE = "model.py"


def package_python_model(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    name: str,
    inputs: Sequence[dict[str, Any] | str],
    class_name: str | None = None,
    version: str = "1",
    outputs: Sequence[dict[str, Any] | str] | None = None,
    files: Sequence[str | os.PathLike] = (),
    example: Any = None,
    max_batch_size: int = 128,
    dynamic_batching: dict[str, Any] | None = None,
    parameters: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    profile: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> ModelPackage:
    """Write a user's Python class as a verified `python` model package at `out`.

    `source`: "path/module.py:ClassName" (or the path, with `class_name`); the module is
    stored as model.py, next to `files` (read by the model from `self.package_dir`). The
    class is loaded from the written package and run on `example` (an array, or a
    sequence/mapping of arrays in input order) or on 2 rows of zeros of the declared
    `inputs`; what predict returns names and shapes the outputs, or must match the
    declared `outputs`. Raises PackageError naming the problem; nothing is written then.
    (The contract of the class: registry/python_model.py.)
    """
    import shutil
    import tempfile

    import numpy as np

    from . import python_model
    from .package import NUMPY_DTYPES, load_package

    text = os.fspath(source)
    if class_name is None:
        text, sep, class_name = text.rpartition(":")
        if not sep or not class_name:
            raise PackageError(f"{source}: expected MODULE.py:CLASS, e.g. model.py:Model")
    path = Path(text)
    if not path.is_file():
        raise PackageError(f"{path}: no such module")
    in_specs = _declared(inputs)
    if not in_specs:
        raise PackageError("declare the inputs (NAME:DATATYPE:DIMS)")
    extra: dict[str, bytes | str | os.PathLike] = {PYTHON_FILE: path}
    for f in map(Path, files):
        if not f.is_file():
            raise PackageError(f"{f}: no such file")
        if f.name in (PYTHON_FILE, "profile.json") or f.name in extra:
            raise PackageError(f"{f}: a package file named {f.name!r} is already there")
        extra[f.name] = f
    manifest: dict[str, Any] = {
        "name": name, "version": str(version), "platform": "python", "model_file": PYTHON_FILE,
        "inputs": in_specs, "outputs": _declared(outputs) or [{"name": "output__0", "datatype": "FP32", "shape": [-1]}],
        "max_batch_size": max_batch_size, "dynamic_batching": dynamic_batching or {},
        "parameters": {**(parameters or {}), "python_class": class_name}, "metadata": dict(metadata or {}),
    }
    dest = Path(out)
    if dest.exists() and not overwrite:
        raise PackageError(f"{dest}: already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        # Written first (outputs provisional when not declared), then loaded from there as
        # the server will load it: the class sees the package's files, not the sources.
        staged = load_package(_write(staging / "package", manifest, extra, profile, overwrite=False).path)
        try:
            model = python_model.load_model(staged)
        except python_model.UserCodeError as exc:
            raise PackageError(str(exc)) from None
        specs = staged.inputs

        def dtype(s: Any) -> Any:  # BYTES: an object array of bytes, as the server gives predict
            return object if s.datatype == "BYTES" else NUMPY_DTYPES[s.datatype]

        if example is None:
            arrays = [np.full((2, *s.row_shape), b"", object) if s.datatype == "BYTES" else
                      np.zeros((2, *s.row_shape), dtype(s)) for s in specs]
        elif isinstance(example, dict):
            arrays = [np.asarray(example[s.name], dtype(s)) for s in specs]
        else:
            given = example if isinstance(example, (tuple, list)) else (example,)
            arrays = [np.asarray(a, dtype(s)) for s, a in zip(specs, given)]
        try:
            arrays = [python_model.as_bytes(a) if s.datatype == "BYTES" else a for s, a in zip(specs, arrays)]
        except ValueError as exc:
            raise PackageError(f"example: {exc}") from None
        rows = arrays[0].shape[0]
        try:
            result = python_model.predict(model, python_model.batch_of(arrays, specs), name)
        except python_model.UserCodeError as exc:
            raise PackageError(f"{exc} on a batch of {rows} rows of its declared inputs") from None
        if not outputs:  # named and shaped by what predict returned
            names = list(map(str, result)) if isinstance(result, dict) else \
                [f"output__{i}" for i in range(len(result) if isinstance(result, (tuple, list)) else 1)]
            manifest["outputs"] = python_model.output_specs(python_model.returned(result, names, name), names)
            staged = load_package(_write(staging / "package", manifest, extra, profile, overwrite=True).path)
        try:
            values = python_model.returned(result, [s.name for s in staged.outputs], name)
            for value, s in zip(values, staged.outputs):
                python_model.check_output(value, s, rows, name)
        except python_model.OutputMismatch as exc:
            raise PackageError(str(exc)) from None
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(staging / "package", dest)
        return load_package(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "…"


def _register_boosters() -> None:
    """Teach skl2onnx the scikit-learn estimators of LightGBM and XGBoost (alone or in a
    pipeline) with onnxmltools' converters, for each library that is installed."""
    try:
        from skl2onnx import update_registered_converter
        from skl2onnx.common.shape_calculator import (
            calculate_linear_classifier_output_shapes, calculate_linear_regressor_output_shapes)
    except ImportError:
        return
    classifier_options = {"nocl": [True, False], "zipmap": [True, False, "columns"]}
    try:
        from lightgbm import LGBMClassifier, LGBMRegressor
        from onnxmltools.convert.lightgbm.operator_converters.LightGbm import convert_lightgbm
    except ImportError:
        pass
    else:
        update_registered_converter(LGBMClassifier, "LightGbmLGBMClassifier",
                                    calculate_linear_classifier_output_shapes, convert_lightgbm,
                                    options=classifier_options)
        update_registered_converter(LGBMRegressor, "LightGbmLGBMRegressor", calculate_linear_regressor_output_shapes,
                                    convert_lightgbm, options={"split": None})
    try:
        from onnxmltools.convert.xgboost.operator_converters.XGBoost import convert_xgboost
        from xgboost import XGBClassifier, XGBRegressor
    except ImportError:
        pass
    else:
        update_registered_converter(XGBClassifier, "XGBoostXGBClassifier", calculate_linear_classifier_output_shapes,
                                    convert_xgboost, options=classifier_options)
        update_registered_converter(XGBRegressor, "XGBoostXGBRegressor", calculate_linear_regressor_output_shapes,
                                    convert_xgboost)


def package_sklearn_model(
    estimator: Any,
    out: str | os.PathLike,
    *,
    name: str,
    version: str = "1",
    example: Any = None,
    input_name: str = "input__0",
    tolerance: float = 1e-4,
    max_batch_size: int = 128,
    dynamic_batching: dict[str, Any] | None = None,
    parameters: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    profile: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> ModelPackage:
    """Write a fitted scikit-learn estimator (a tree ensemble, a pipeline, ...; LightGBM's
    LGBMClassifier/LGBMRegressor and XGBoost's XGBClassifier/XGBRegressor too when
    onnxmltools is installed) as an `onnxruntime`
    package: converted with skl2onnx, then checked against the estimator.

    One FP32 input `input_name` [-1, n_features_in_]. A classifier answers `label` (INT64
    [-1], when its classes are integers; otherwise the classes are listed in the package
    metadata) and `probabilities` (FP32 [-1, n_classes]); a regressor `variable` (FP32
    [-1, n_targets]). Verification: on `example` rows (default: 256 rows drawn from a
    standard normal, seed 0), onnxruntime's probabilities or predictions must be within
    `tolerance` (relative to the largest prediction for a regressor) of the estimator's
    own, and its labels equal wherever the top two probabilities are not tied.
    Raises PackageError naming the problem; nothing is written then.
    """
    import numpy as np

    from . import onnx_model

    try:
        from skl2onnx import convert_sklearn
        from skl2onnx.common.data_types import FloatTensorType
    except ImportError:
        raise PackageError("scikit-learn models need skl2onnx: pip install 'vivace[sklearn]'") from None
    kind = f"{type(estimator).__module__.split('.')[0]}.{type(estimator).__name__}"
    features = getattr(estimator, "n_features_in_", None)
    if not hasattr(estimator, "predict") or features is None:
        raise PackageError(f"{kind} is not a fitted scikit-learn estimator (no n_features_in_: call fit first)")
    classifier = hasattr(estimator, "predict_proba")
    _register_boosters()
    try:
        # ai.onnx.ml 3: the newest version onnxmltools' LightGBM converter writes
        model = convert_sklearn(estimator, initial_types=[(input_name, FloatTensorType([None, int(features)]))],
                                options={id(estimator): {"zipmap": False}} if classifier else None,
                                target_opset={"": 17, "ai.onnx.ml": 3})
    except Exception as exc:  # skl2onnx raises many types for estimators it cannot convert
        raise PackageError(f"skl2onnx cannot convert {kind}: {_first_line(exc)}") from None
    meta: dict[str, Any] = {"converted_from": kind, **(metadata or {})}
    classes = getattr(estimator, "classes_", None)
    if classifier and classes is not None and np.asarray(classes).dtype.kind not in "iub":
        # String labels would be a BYTES output, which the batcher cannot hold: the client
        # maps the probabilities' columns to these classes instead.
        kept = [o for o in model.graph.output if o.name != "label"]
        del model.graph.output[:]
        model.graph.output.extend(kept)
        meta["classes"] = [str(c) for c in classes]
    rows = np.asarray(example, np.float32) if example is not None else \
        np.random.default_rng(0).standard_normal((256, int(features))).astype(np.float32)
    if rows.ndim != 2 or rows.shape[1] != features:
        raise PackageError(f"example rows have shape {list(rows.shape)}, the estimator takes {features} features")
    session = onnx_model.open_session(model.SerializeToString(), {"intra_op_thread_count": 1})
    answers = dict(zip([o.name for o in session.get_outputs()], session.run(None, {input_name: rows})))
    try:
        if classifier:
            reference = np.asarray(estimator.predict_proba(rows), np.float64)
            error = float(np.abs(answers["probabilities"] - reference).max())
            if "label" in answers:
                top2 = np.sort(reference, axis=1)[:, -2:]
                clear = top2[:, 1] - top2[:, 0] > 1e-5
                wrong = int((answers["label"][clear] != np.asarray(estimator.predict(rows))[clear]).sum())
                if wrong:
                    raise PackageError(f"the converted {kind} labels {wrong} of {len(rows)} rows differently")
        else:
            reference = np.asarray(estimator.predict(rows), np.float64).reshape(len(rows), -1)
            scale = max(1.0, float(np.abs(reference).max()))
            error = float(np.abs(answers["variable"].reshape(len(rows), -1) - reference).max()) / scale
    except PackageError:
        raise
    except Exception as exc:  # the estimator's own predict failing on the rows
        raise PackageError(f"{kind} cannot predict the example rows: {_first_line(exc)}") from None
    if not error <= tolerance:
        raise PackageError(f"the converted {kind} differs from the estimator by {error:.3g} "
                           f"(tolerance {tolerance:g}) on {len(rows)} rows")
    meta["conversion"] = {"rows": int(len(rows)), "max_abs_error": error, "tolerance": tolerance}
    return package_onnx_model(model, out, name=name, version=version, example=rows[:2], max_batch_size=max_batch_size,
                              dynamic_batching=dynamic_batching, parameters=parameters, metadata=meta,
                              profile=profile, overwrite=overwrite)


def package_ensemble(
    steps: Sequence[tuple[str, str | os.PathLike | ModelPackage]],
    out: str | os.PathLike,
    *,
    name: str,
    version: str = "1",
    tensor_map: dict[str, str] | None = None,
    outputs: Sequence[str] | None = None,
    max_batch_size: int | None = None,
    dynamic_batching: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    profile: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> ModelPackage:
    """Write a pipeline of model packages as one `ensemble` package, served as one model.

    `steps`: (step name, package directory) in the order they run, e.g. a Python
    preprocessing package, then an ONNX/torch/native model, then Python postprocessing.
    Tensors connect by name: a step's input is fed by the earlier step output of the same
    name, or else becomes an input of the ensemble. `tensor_map` renames where names differ:
    {"STEP.INPUT": "TENSOR"} feeds a step's input from TENSOR, {"STEP.OUTPUT": "TENSOR"}
    names what a step's output becomes. `outputs`: the tensors the ensemble answers with
    (default: the last step's outputs). Every step's package is verified on reading; its
    files are copied in (model files renamed STEP.FILE, other files, which a Python step
    reads by name, kept as they are and refused if two steps bring different ones), and the
    wiring is checked (datatypes and row shapes agree, nothing produced twice, no cycle).
    Raises PackageError naming the problem; nothing is written then.
    """
    from vivace import spec

    from .package import load_package

    tensor_map = dict(tensor_map or {})
    if not steps:
        raise PackageError("an ensemble needs at least one step")
    loaded = [(step, source if isinstance(source, ModelPackage) else load_package(source)) for step, source in steps]
    names = [step for step, _ in loaded]
    if len(set(names)) != len(names):
        raise PackageError(f"step names must be unique, got {names}")
    used_keys: set[str] = set()
    inputs: dict[str, spec.TensorSpec] = {}
    produced: dict[str, spec.TensorSpec] = {}
    files: dict[str, Path] = {}
    owners: dict[str, str] = {}
    ensemble_steps = []
    for step, package in loaded:
        if package.platform == spec.ENSEMBLE_PLATFORM:
            raise PackageError(f"step {step!r}: {package.path} is itself an ensemble; list its steps instead")
        if package.metadata.get("feature_service"):
            raise PackageError(f"step {step!r}: {package.path} is served by entity id, which a step cannot be")
        input_map, output_map = {}, {}
        for t in package.inputs:
            key = f"{step}.{t.name}"
            source = tensor_map.get(key, t.name)
            used_keys.add(key)
            if source not in produced:  # an input of the ensemble (several steps may share one)
                if source in inputs and (inputs[source].datatype, inputs[source].shape) != (t.datatype, t.shape):
                    raise PackageError(f"step {step!r}: input {t.name!r} wants {source!r} as {t.datatype} "
                                       f"{list(t.shape)}, another step wants it as {inputs[source].datatype} "
                                       f"{list(inputs[source].shape)}")
                inputs.setdefault(source, spec.TensorSpec(source, t.datatype, t.shape))
            if source != t.name:
                input_map[t.name] = source
        for t in package.outputs:
            key = f"{step}.{t.name}"
            target = tensor_map.get(key, t.name)
            used_keys.add(key)
            if target in produced or target in inputs:
                raise PackageError(f"step {step!r}: output {t.name!r} would become {target!r}, which another "
                                   f"tensor already is: rename it with {key}=NEW_NAME")
            produced[target] = spec.TensorSpec(target, t.datatype, t.shape)
            if target != t.name:
                output_map[t.name] = target
        model_file = f"{step}.{package.model_file}"
        for file_name in package.files:
            stored = model_file if file_name == package.model_file else file_name
            if file_name == "profile.json" and package.metadata.get("profile") == "profile.json":
                continue  # a step's drift profile: the ensemble is monitored on its own inputs
            if stored in files and (files[stored].read_bytes() != (package.path / file_name).read_bytes()):
                raise PackageError(f"steps {owners[stored]!r} and {step!r} both bring a file {stored!r} with "
                                   f"different contents")
            files[stored], owners[stored] = package.path / file_name, step
        ensemble_steps.append(spec.EnsembleStep(
            name=step, platform=package.platform, model_file=model_file, inputs=package.inputs,
            outputs=package.outputs, parameters=package.parameters, input_map=input_map, output_map=output_map))
    unused = sorted(set(tensor_map) - used_keys)
    if unused:
        raise PackageError(f"tensor map entries {unused} name no step's input or output (STEP.TENSOR)")
    wanted = list(outputs) if outputs else [tensor_map.get(f"{names[-1]}.{t.name}", t.name)
                                            for t in loaded[-1][1].outputs]
    missing = [t for t in wanted if t not in produced]
    if missing:
        raise PackageError(f"outputs {missing} are not produced by any step (produced: {sorted(produced)})")
    ensemble = spec.Ensemble(format=spec.ENSEMBLE_FORMAT, steps=ensemble_steps)
    out_specs = [produced[t] for t in wanted]
    try:
        spec.check_wiring(ensemble, list(inputs.values()), out_specs)
    except spec.ManifestError as exc:
        raise PackageError(str(exc)) from None
    if spec.ENSEMBLE_FILE in files:
        raise PackageError(f"step {owners[spec.ENSEMBLE_FILE]!r} brings a file named {spec.ENSEMBLE_FILE!r}, "
                           f"which the ensemble writes")
    manifest: dict[str, Any] = {
        "name": name, "version": str(version), "platform": spec.ENSEMBLE_PLATFORM, "model_file": spec.ENSEMBLE_FILE,
        "inputs": [t.to_json() for t in inputs.values()], "outputs": [t.to_json() for t in out_specs],
        "max_batch_size": max_batch_size or min(p.max_batch_size for _, p in loaded),
        "dynamic_batching": dynamic_batching or {},
        "metadata": {**(metadata or {}), "steps": [{"name": s, "platform": p.platform, "from": f"{p.name}/{p.version}"}
                                                    for s, p in loaded]},
    }
    return _write(out, manifest, {spec.ENSEMBLE_FILE: spec.encode_ensemble(ensemble), **files}, profile, overwrite)
