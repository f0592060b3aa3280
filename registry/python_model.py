"""Python models (`platform: python`): a user's class served like any other model.

The package holds the user's module (`model_file`, e.g. model.py) and any files it reads;
`parameters.python_class` names the class. The contract:

    class Model:
        def load(self):               # once, before serving; self.package_dir is the package
            ...
        def predict(self, batch):     # a batch of rows
            return ...

`batch` is a read-only numpy array of the rows (a single-input model) or a dict of them
by input name; `predict` returns an array (a single-output model), a dict by output name,
or a tuple in output order, each with the batch's rows first. Outputs are cast to their
declared datatype when numpy can do so within the same kind (float64 -> float32, int64 ->
int32); any other dtype or shape is refused, naming the output.

Shared by `vivace package` (which runs the class on a batch before writing the package)
and the engine's Python backend (which serves it), so both hold the class to one contract.
"""
from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from vivace import datatypes

from .package import NUMPY_DTYPES, ModelPackage, PackageError, TensorSpec

_modules = itertools.count(1)


class UserCodeError(RuntimeError):
    """The user's module or class failed: importing it, `load()` or `predict()`."""


class OutputMismatch(UserCodeError):
    """`predict` returned something the package's outputs do not allow."""


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def load_class(path: Path, class_name: str, name: str) -> type:
    """Import the module at `path` under a name of its own and return its class."""
    module_name = f"vivace_user_model_{next(_modules)}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UserCodeError(f"model {name!r}: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickle look classes up there
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:  # noqa: BLE001 - any failure of user code, SystemExit included
        sys.modules.pop(module_name, None)
        raise UserCodeError(f"model {name!r}: importing {path.name} raised {describe(exc)}") from exc
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise UserCodeError(f"model {name!r}: {path.name} defines no class {class_name!r}")
    if not callable(getattr(cls, "predict", None)):
        raise UserCodeError(f"model {name!r}: class {class_name} has no predict(batch) method")
    return cls


def instantiate(cls: type, package_dir: Path, name: str) -> Any:
    """A loaded instance: created without arguments, package_dir set, then `load()`."""
    try:
        model = cls()
        model.package_dir = package_dir
        if callable(getattr(model, "load", None)):
            model.load()
    except BaseException as exc:  # noqa: BLE001 - any failure of user code, SystemExit included
        raise UserCodeError(f"model {name!r}: {cls.__name__}.load() raised {describe(exc)}") from exc
    return model


def load_model(package: ModelPackage) -> Any:
    """The package's user class, imported and loaded."""
    return instantiate(load_class(package.model_path, package.parameters["python_class"], package.name),
                       package.path, package.name)


def batch_of(arrays: Sequence[np.ndarray], inputs: Sequence[TensorSpec]) -> Any:
    """What predict receives: the array of a single-input model, else a dict by input name."""
    return arrays[0] if len(inputs) == 1 else {s.name: a for s, a in zip(inputs, arrays)}


def predict(model: Any, batch: Any, name: str) -> Any:
    try:
        return model.predict(batch)
    except BaseException as exc:  # noqa: BLE001 - any failure of user code, SystemExit included
        raise UserCodeError(f"model {name!r}: predict raised {describe(exc)}") from exc


def returned(result: Any, names: Sequence[str], name: str) -> list[Any]:
    """predict's result as one value per output name, in order."""
    if isinstance(result, Mapping):
        if sorted(map(str, result)) != sorted(names):
            raise OutputMismatch(f"model {name!r}: predict returned outputs {sorted(map(str, result))}, "
                                 f"expected {list(names)}")
        return [result[n] for n in names]
    if isinstance(result, (tuple, list)) and len(names) != 1:
        if len(result) != len(names):
            raise OutputMismatch(f"model {name!r}: predict returned {len(result)} values, expected {len(names)} "
                                 f"({', '.join(names)})")
        return list(result)
    if len(names) != 1:
        raise OutputMismatch(f"model {name!r}: predict returned {type(result).__name__}, expected a dict of "
                             f"{list(names)}")
    return [result]


def check_output(value: Any, spec: TensorSpec, rows: int, name: str) -> np.ndarray:
    """`value` as an array of the output's datatype and shape, or OutputMismatch saying why not.
    A BYTES output comes back as an object array of bytes (str elements encoded as UTF-8)."""
    if spec.datatype == "BYTES":
        return _check_strings(value, spec, rows, name)
    want = np.dtype(NUMPY_DTYPES[spec.datatype])
    if not isinstance(value, np.ndarray):
        try:
            value = np.asarray(value)
        except Exception as exc:  # noqa: BLE001 - whatever the user returned
            raise OutputMismatch(f"model {name!r}: output {spec.name!r} is not an array ({describe(exc)})") from None
    if value.dtype != want and not (value.dtype.kind in "biuf" and np.can_cast(value.dtype, want, "same_kind")):
        raise OutputMismatch(f"model {name!r}: predict returned output {spec.name!r} of dtype {value.dtype}, "
                             f"which is not {spec.datatype} ({want})")
    if value.shape != (rows, *spec.row_shape):
        raise OutputMismatch(f"model {name!r}: predict returned output {spec.name!r} with shape {value.shape}, "
                             f"expected {(rows, *spec.row_shape)}")
    return value


def _check_strings(value: Any, spec: TensorSpec, rows: int, name: str) -> np.ndarray:
    array = value if isinstance(value, np.ndarray) and value.dtype.kind == "O" else np.asarray(value, object)
    if array.shape != (rows, *spec.row_shape):
        raise OutputMismatch(f"model {name!r}: predict returned output {spec.name!r} with shape {array.shape}, "
                             f"expected {(rows, *spec.row_shape)}")
    out = np.empty(array.size, object)
    for k, v in enumerate(array.ravel().tolist()):
        if isinstance(v, str):
            v = v.encode()
        elif not isinstance(v, bytes):
            raise OutputMismatch(f"model {name!r}: predict returned output {spec.name!r} holding "
                                 f"{type(v).__name__}, expected str or bytes (BYTES)")
        out[k] = v
    return out.reshape(array.shape)


def as_bytes(value: Any) -> np.ndarray:
    """Strings given in process (str or bytes, any nesting) as the object array of bytes the
    server gives predict for a BYTES input."""
    array = np.asarray(value, object)
    out = np.empty(array.size, object)
    for k, v in enumerate(array.ravel().tolist()):
        if not isinstance(v, (str, bytes)):
            raise ValueError(f"a BYTES input holds str or bytes, not {type(v).__name__}")
        out[k] = v.encode() if isinstance(v, str) else v
    return out.reshape(array.shape)


def _stringy(value: Any) -> bool:
    """A nested list whose first leaf is a string (numpy would make it a fixed-width 'U' array)."""
    while isinstance(value, (list, tuple)) and value:
        value = value[0]
    return isinstance(value, (str, bytes))


def is_strings(array: np.ndarray) -> bool:
    """An array predict returned that holds strings (str or bytes elements)."""
    if array.dtype.kind in "SU":
        return True
    return array.dtype.kind == "O" and array.size > 0 and all(isinstance(v, (str, bytes)) for v in array.ravel().tolist())


def output_specs(values: Sequence[Any], names: Sequence[str]) -> list[dict[str, Any]]:
    """Manifest output entries for what predict returned on a probe batch."""
    specs = []
    for value, output in zip(values, names):
        array = value if isinstance(value, np.ndarray) else np.asarray(value, object if _stringy(value) else None)
        datatype = "BYTES" if is_strings(array) else datatypes.from_numpy(array.dtype.name)
        if datatype is None or not (datatypes.numpy_native(datatype) or datatype == "BYTES") or array.ndim == 0:
            raise PackageError(f"output {output!r}: predict returned {array.dtype} {list(array.shape)}, which "
                               f"cannot be served (numbers or booleans with the batch dimension first)")
        specs.append({"name": output, "datatype": datatype, "shape": [-1, *array.shape[1:]]})
    return specs
