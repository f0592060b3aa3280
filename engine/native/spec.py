"""The native MLP description stored in a package's model.npz, and its loading (numpy only)."""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ACTIVATIONS = ("identity", "relu", "gelu", "sigmoid", "tanh")
PRECISIONS = ("fp32", "int8")
FORMAT_VERSION = 1


class SpecError(ValueError):
    """A native MLP description (model.npz) is malformed or inconsistent."""


@dataclass
class MLPSpec:
    """Dense layers `y = act(x @ W.T + b)`, applied in order.

    `input_ranges` (int8 with static activation scales only): one (min, max) per layer,
    the calibrated range of that layer's input; values outside it saturate.
    """

    weights: list[np.ndarray]
    biases: list[np.ndarray]
    activations: list[str]
    input_ranges: list[tuple[float, float]] | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.weights:
            raise SpecError("an MLP needs at least one Linear layer")
        if not (len(self.weights) == len(self.biases) == len(self.activations)):
            raise SpecError("weights, biases and activations must have one entry per layer")
        for i, (w, b, act) in enumerate(zip(self.weights, self.biases, self.activations)):
            if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
                raise SpecError(f"layer {i}: weight must be a non-empty 2-D array [out, in], got shape {w.shape}")
            if b.shape != (w.shape[0],):
                raise SpecError(f"layer {i}: bias shape {b.shape} does not match {w.shape[0]} outputs")
            if i and w.shape[1] != self.weights[i - 1].shape[0]:
                raise SpecError(
                    f"layer {i}: {w.shape[1]} inputs do not match the previous layer's {self.weights[i - 1].shape[0]} outputs"
                )
            if act not in ACTIVATIONS:
                raise SpecError(f"layer {i}: unknown activation {act!r} (expected one of {', '.join(ACTIVATIONS)})")
            if not (np.isfinite(w).all() and np.isfinite(b).all()):
                raise SpecError(f"layer {i}: weights or bias hold NaN or Inf")
        if self.input_ranges is not None and len(self.input_ranges) != len(self.weights):
            raise SpecError("input_ranges must have one (min, max) per layer")

    @property
    def in_features(self) -> int:
        return int(self.weights[0].shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weights[-1].shape[0])

    @property
    def macs_per_row(self) -> int:
        return int(sum(w.size for w in self.weights))

    def describe(self) -> str:
        dims = [str(self.in_features)] + [f"{w.shape[0]}({a})" for w, a in zip(self.weights, self.activations)]
        return " -> ".join(dims)

    def to_npz_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {
            "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
            "activations": np.array(self.activations),
        }
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            arrays[f"weight_{i}"] = np.ascontiguousarray(w, dtype=np.float32)
            arrays[f"bias_{i}"] = np.ascontiguousarray(b, dtype=np.float32)
        if self.input_ranges is not None:
            arrays["input_ranges"] = np.array(self.input_ranges, dtype=np.float32)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_npz(cls, path: str | Path) -> "MLPSpec":
        """Load a model.npz written by `to_npz_bytes` (no pickles are ever loaded)."""
        try:
            with np.load(path, allow_pickle=False) as data:
                version = int(data["format_version"])
                if version != FORMAT_VERSION:
                    raise SpecError(f"{path}: native MLP format {version} is not supported (expected {FORMAT_VERSION})")
                activations = [str(a) for a in data["activations"]]
                weights = [np.array(data[f"weight_{i}"], dtype=np.float32) for i in range(len(activations))]
                biases = [np.array(data[f"bias_{i}"], dtype=np.float32) for i in range(len(activations))]
                ranges = None
                if "input_ranges" in data.files:
                    table = np.array(data["input_ranges"], dtype=np.float32)
                    if table.shape != (len(activations), 2):
                        raise SpecError(f"{path}: input_ranges must have shape [{len(activations)}, 2]")
                    ranges = [(float(lo), float(hi)) for lo, hi in table]
        except SpecError:
            raise
        except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
            raise SpecError(f"{path}: not a valid native MLP file ({exc})") from None
        return cls(weights, biases, activations, ranges)
