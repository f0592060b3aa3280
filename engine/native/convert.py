"""Convert torch MLPs into native packages, with an accuracy check against fp32 torch.

Supported models: an nn.Sequential (nested Sequentials are flattened), or a TorchScript
(scripted or traced) of one, made of
    Linear, ReLU, GELU (exact erf form), Sigmoid, Tanh, Identity, Dropout (eval: identity),
    BatchNorm1d (eval statistics, folded into the adjacent Linear: a leading one is the
    input normalisation).
Anything else is refused with the layer's position and type. Every conversion is then
checked: the native model is run on calibration/holdout rows next to the torch model and
refused when the max abs error exceeds the tolerance.
"""
from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vivace import _core
from vivace.registry.package import ModelPackage, load_package, write_package

from .backend import NATIVE_PLATFORM
from .spec import MLPSpec, SpecError

DEFAULT_TOLERANCE = 5e-3
SYNTHETIC_ROWS = 2048
SUPPORTED = "Linear, ReLU, GELU(approximate='none'), Sigmoid, Tanh, Identity, Dropout, BatchNorm1d"


class ConversionError(ValueError):
    """The model cannot be converted, or the converted model is not accurate enough."""


@dataclass
class Accuracy:
    max_abs_error: float
    mean_abs_error: float
    rows: int
    tolerance: float
    data: str  # "calibration" or "synthetic N(0,1)"

    def to_json(self) -> dict[str, Any]:
        return {
            "max_abs_error": self.max_abs_error, "mean_abs_error": self.mean_abs_error,
            "rows": self.rows, "tolerance": self.tolerance, "data": self.data,
        }


def _kind(module: Any) -> str:
    # TorchScript modules keep the Python class name in `original_name`.
    return str(getattr(module, "original_name", type(module).__name__))


def _flatten(module: Any) -> list[Any]:
    if _kind(module) == "Sequential":
        out: list[Any] = []
        for child in module.children():
            out.extend(_flatten(child))
        return out
    return [module]


def _array(tensor: Any) -> np.ndarray:
    return tensor.detach().to("cpu").double().numpy()


def spec_from_torch(model: Any) -> MLPSpec:
    """Read the layers of a torch MLP; raises ConversionError naming an unsupported layer."""
    model.eval()
    if _kind(model) != "Sequential":
        children = list(model.children())
        if len(children) != 1 or _kind(children[0]) != "Sequential":
            raise ConversionError(
                f"only an nn.Sequential MLP (or a TorchScript of one) can be converted; got {_kind(model)}"
            )
        model = children[0]  # a wrapper around one Sequential; the accuracy check verifies it adds nothing
    weights: list[np.ndarray] = []
    biases: list[np.ndarray] = []
    activations: list[str] = []
    pending: tuple[np.ndarray, np.ndarray] | None = None  # x -> x * scale + shift before the next Linear
    for position, layer in enumerate(_flatten(model)):
        kind = _kind(layer)
        where = f"layer {position} ({kind})"
        if kind == "Linear":
            w, b = _array(layer.weight), (_array(layer.bias) if layer.bias is not None else np.zeros(layer.weight.shape[0]))
            if pending is not None:
                scale, shift = pending
                if scale.shape[0] != w.shape[1]:
                    raise ConversionError(f"{where}: normalisation of {scale.shape[0]} features feeds {w.shape[1]} inputs")
                b = b + w @ shift
                w = w * scale[None, :]
                pending = None
            weights.append(w)
            biases.append(b)
            activations.append("identity")
        elif kind in ("ReLU", "GELU", "Sigmoid", "Tanh"):
            if not activations or activations[-1] != "identity" or pending is not None:
                raise ConversionError(f"{where}: an activation must directly follow a Linear layer")
            if kind == "GELU" and getattr(layer, "approximate", "none") != "none":
                raise ConversionError(f"{where}: only the exact (erf) GELU is supported, not approximate='tanh'")
            activations[-1] = kind.lower()
        elif kind in ("Identity", "Dropout"):
            continue
        elif kind == "BatchNorm1d":
            if layer.running_mean is None or layer.running_var is None:
                raise ConversionError(f"{where}: BatchNorm1d without running statistics cannot be folded")
            scale = 1.0 / np.sqrt(_array(layer.running_var) + float(layer.eps))
            shift = -_array(layer.running_mean) * scale
            if layer.weight is not None:
                gamma, beta = _array(layer.weight), _array(layer.bias)
                scale, shift = scale * gamma, shift * gamma + beta
            if weights and activations[-1] == "identity" and pending is None:
                if scale.shape[0] != weights[-1].shape[0]:
                    raise ConversionError(f"{where}: {scale.shape[0]} features after a Linear with {weights[-1].shape[0]} outputs")
                weights[-1] = weights[-1] * scale[:, None]
                biases[-1] = biases[-1] * scale + shift
            elif pending is None:
                pending = (scale, shift)
            else:
                raise ConversionError(f"{where}: two normalisations in a row")
        else:
            raise ConversionError(f"{where} is not supported; supported layers: {SUPPORTED}")
    if pending is not None:
        raise ConversionError("a BatchNorm1d at the end of the model has no Linear layer to fold into")
    if not weights:
        raise ConversionError("the model has no Linear layer")
    try:
        return MLPSpec(
            [w.astype(np.float32) for w in weights], [b.astype(np.float32) for b in biases], activations
        )
    except SpecError as exc:
        raise ConversionError(str(exc)) from None


def _native(spec: MLPSpec, precision: str, static: bool, level: str | None = None) -> Any:
    return _core.NativeMLP(
        spec.weights, spec.biases, spec.activations, precision=precision,
        input_ranges=spec.input_ranges if static else None, level=level,
    )


def calibrate_ranges(spec: MLPSpec, rows: np.ndarray) -> list[tuple[float, float]]:
    """Each layer's input (min, max) over `rows`, from fp32 prefixes of the model."""
    ranges = [(float(rows.min()), float(rows.max()))]
    for depth in range(1, len(spec.weights)):
        prefix = MLPSpec(spec.weights[:depth], spec.biases[:depth], spec.activations[:depth])
        hidden = _native(prefix, "fp32", False).forward(rows)
        ranges.append((float(hidden.min()), float(hidden.max())))
    return ranges


def torch_outputs(model: Any, rows: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        out = model(torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)))
    if isinstance(out, (tuple, list)):
        if len(out) != 1:
            raise ConversionError(f"the model returns {len(out)} outputs; a native MLP has one")
        out = out[0]
    return out.detach().to("cpu").float().numpy().reshape(rows.shape[0], -1)


def check_rows(rows: np.ndarray | None, in_features: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """Validated calibration rows, or synthetic N(0, 1) rows when none are given."""
    if rows is None:
        rng = np.random.default_rng(seed)
        return rng.standard_normal((SYNTHETIC_ROWS, in_features)).astype(np.float32), "synthetic N(0,1)"
    rows = np.asarray(rows)
    if rows.dtype.kind not in "fiu":
        raise ConversionError(f"calibration data must be numeric, got dtype {rows.dtype}")
    if rows.ndim != 2 or rows.shape[1] != in_features or rows.shape[0] < 1:
        raise ConversionError(f"calibration data must have shape [rows, {in_features}], got {list(rows.shape)}")
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if not np.isfinite(rows).all():
        raise ConversionError("calibration data holds NaN or Inf")
    return rows, "calibration"


def convert(
    model: Any,
    rows: np.ndarray | None = None,
    precision: str = "int8",
    activation_scales: str = "dynamic",
    tolerance: float = DEFAULT_TOLERANCE,
    data_label: str | None = None,
) -> tuple[MLPSpec, Accuracy]:
    """Convert a torch MLP and check it; raises ConversionError when it cannot or is too inaccurate.

    With static activation scales, the first half of the rows calibrates the ranges and
    the second half is the holdout the accuracy is measured on. `data_label` says where
    given rows come from (default "calibration"), in the accuracy record and errors.
    """
    if precision not in ("fp32", "int8"):
        raise ConversionError(f"precision must be 'fp32' or 'int8', got {precision!r}")
    if activation_scales not in ("dynamic", "static") or (activation_scales == "static" and precision != "int8"):
        raise ConversionError("activation_scales must be 'dynamic', or 'static' with precision 'int8'")
    spec = spec_from_torch(model)
    rows, source = check_rows(rows, spec.in_features)
    source = data_label or source
    holdout = rows
    if activation_scales == "static":
        split = rows.shape[0] // 2 if rows.shape[0] >= 64 else rows.shape[0]
        spec.input_ranges = calibrate_ranges(spec, rows[:split])
        holdout = rows[split:] if split < rows.shape[0] else rows
    reference = torch_outputs(model, holdout)
    if reference.shape[1] != spec.out_features:
        raise ConversionError(
            f"the model returns {reference.shape[1]} values per row but its last Linear has {spec.out_features}"
        )
    fp32_error = float(np.abs(_native(spec, "fp32", False).forward(holdout) - reference).max())
    if not fp32_error <= tolerance:
        raise ConversionError(
            f"the model does not compute a plain chain of its layers (fp32 native vs torch max abs error "
            f"{fp32_error:.3g} > {tolerance:g}); its forward() must apply the layers in order"
        )
    diff = np.abs(_native(spec, precision, activation_scales == "static").forward(holdout) - reference)
    accuracy = Accuracy(float(diff.max()), float(diff.mean()), int(holdout.shape[0]), tolerance, source)
    if not accuracy.max_abs_error <= tolerance:
        raise ConversionError(
            f"{precision} model is not accurate enough: max abs error {accuracy.max_abs_error:.3g} "
            f"> tolerance {tolerance:g} on {accuracy.rows} {source} rows"
        )
    return spec, accuracy


def reference_rows(package: ModelPackage, in_features: int, seed: int = 0) -> tuple[np.ndarray | None, str | None]:
    """Rows drawn from the package's reference profile (its training data, written by
    `vivace train` or attached with --profile) and a description of them; (None, None)
    when the package has none that maps onto its input columns (N(0,1) rows are used then).

    A trained package names its input columns in metadata.features (categories encoded as
    training encoded them); otherwise the profile's features, in order, are the columns.
    """
    from vivace.profile import ProfileError, sample_rows

    path = package.path / package.metadata.get("profile", "profile.json")
    if not path.is_file():
        return None, None
    try:
        profile = json.loads(path.read_text())
        specs = package.metadata.get("features")
        if specs:
            columns = [(s["name"], s.get("categories") if s.get("kind") == "categorical" else None) for s in specs]
        else:
            columns = [(name, None) for name in profile.get("features", {})]
        if len(columns) != in_features:
            return None, None
        rows = sample_rows(profile, columns, SYNTHETIC_ROWS, seed)
    except (OSError, ValueError, ProfileError, TypeError, KeyError):
        return None, None
    return rows, f"reference-profile ({path.name})"


def load_torch_package(package: ModelPackage) -> Any:
    """The torch module of a torchscript package; refuses other platforms with the reason."""
    if package.platform == NATIVE_PLATFORM:
        raise ConversionError(f"{package.name}/{package.version} is already a native package")
    if package.platform != "torchscript":
        raise ConversionError(
            f"platform {package.platform!r} cannot be converted; save the model as TorchScript (platform 'torchscript')"
        )
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(package.model_path), map_location="cpu")


def quantize_package(
    source: str | Path | ModelPackage,
    out: str | Path,
    rows: np.ndarray | None = None,
    precision: str = "int8",
    activation_scales: str = "dynamic",
    tolerance: float = DEFAULT_TOLERANCE,
    version: str | None = None,
    overwrite: bool = False,
    lineage: dict[str, Any] | None = None,
) -> tuple[ModelPackage, Accuracy]:
    """Convert a torchscript package into a native_mlp package at `out` (written atomically)."""
    package = source if isinstance(source, ModelPackage) else load_package(Path(source))
    if len(package.inputs) != 1 or len(package.outputs) != 1:
        raise ConversionError(f"{package.name}: a native MLP has exactly one input and one output")
    for spec in (*package.inputs, *package.outputs):
        if spec.datatype != "FP32" or len(spec.shape) != 2:
            raise ConversionError(f"{package.name}: tensor {spec.name!r} must be FP32 with shape [-1, N]")
    model = load_torch_package(package)
    in_features = spec_from_torch(model).in_features
    if in_features != package.inputs[0].shape[1]:
        raise ConversionError(f"{package.name}: the model takes {in_features} features, the signature says {package.inputs[0].shape[1]}")
    source = None
    if rows is None:
        rows, source = reference_rows(package, in_features)
    mlp, accuracy = convert(model, rows, precision, activation_scales, tolerance, data_label=source)
    manifest = package.manifest()
    manifest.pop("files", None)
    manifest.update(
        platform=NATIVE_PLATFORM,
        model_file="model.npz",
        version=version or f"{package.version}-{precision}",
        instance_group={"count": package.instance_count, "kind": "KIND_CPU"},
        parameters={"precision": precision, "activation_scales": activation_scales, "num_threads": 1},
        metadata=dict(
            package.metadata,
            native_mlp={"layers": mlp.describe(), "macs_per_row": mlp.macs_per_row},
            accuracy=accuracy.to_json(),
            lineage=dict(
                lineage or {},
                quantized_from=f"{package.name}/{package.version}",
                source_model_sha256=package.files.get(package.model_file),
            ),
        ),
    )
    written = write_package(out, manifest, {"model.npz": mlp.to_npz_bytes()}, overwrite=overwrite)
    return written, accuracy


def save_torch_package(model: Any, out: str | Path, name: str, in_features: int, overwrite: bool = False) -> ModelPackage:
    """Write a torch MLP as a torchscript package (tests and benchmarks use this)."""
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(model.eval()), buffer)
    out_features = torch_outputs(model, np.zeros((1, in_features), np.float32)).shape[1]
    manifest = {
        "name": name, "version": "1", "platform": "torchscript", "model_file": "model.pt",
        "inputs": [{"name": "input__0", "datatype": "FP32", "shape": [-1, in_features]}],
        "outputs": [{"name": "output__0", "datatype": "FP32", "shape": [-1, out_features]}],
    }
    return write_package(out, manifest, {"model.pt": buffer.getvalue()}, overwrite=overwrite)
