"""NativeMLPBackend: run a `native_mlp` model package with vivace._core kernels, no torch.

The package's model.npz holds fp32 weights (see spec.MLPSpec); package parameters say
how to run them:
    precision             "fp32" or "int8" (weights quantised per output channel at load)
    activation_scales     "dynamic" (per row, default) or "static" (calibrated input_ranges)
    num_threads           threads per call for batches worth splitting (default 1)
The CPU kernel level is the best this CPU has, or $VIVACE_CPU_LEVEL, or `level=`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from vivace import _core
from vivace.registry.package import ModelPackage, PackageError, load_package

from .spec import MLPSpec, SpecError

NATIVE_PLATFORM = "native_mlp"
INLINE_MAX_BATCH_MACS = 1 << 26  # ~1 ms of int8/fp32 kernel time on one core


class NativeMLPBackend:
    """A loaded native MLP package: `run([x]) -> [y]`, float32 [rows, in] -> [rows, out].

    Thread-safe: `run`/`run_into` may be called from several threads at once; large
    batches release the GIL inside the kernel.
    """

    def __init__(
        self,
        package: ModelPackage | str | os.PathLike,
        level: str | None = None,
        num_threads: int | None = None,
    ):
        if not isinstance(package, ModelPackage):
            package = load_package(Path(package))
        if package.platform != NATIVE_PLATFORM:
            raise PackageError(f"{package.name}: platform {package.platform!r} is not {NATIVE_PLATFORM!r}")
        if len(package.inputs) != 1 or len(package.outputs) != 1:
            raise PackageError(f"{package.name}: a native MLP has exactly one input and one output")
        self.package = package
        self.input_spec, self.output_spec = package.inputs[0], package.outputs[0]
        for spec in (self.input_spec, self.output_spec):
            if spec.datatype != "FP32" or len(spec.shape) != 2:
                raise PackageError(f"{package.name}: tensor {spec.name!r} must be FP32 with shape [-1, N]")
        try:
            self.spec = MLPSpec.from_npz(package.model_path)
        except SpecError as exc:
            raise PackageError(str(exc)) from None
        if (self.spec.in_features, self.spec.out_features) != (self.input_spec.shape[1], self.output_spec.shape[1]):
            raise PackageError(
                f"{package.name}: model.npz maps {self.spec.in_features} -> {self.spec.out_features} features, "
                f"the signature says {self.input_spec.shape[1]} -> {self.output_spec.shape[1]}"
            )
        params = package.parameters
        self.precision = str(params.get("precision", "fp32"))
        scales = str(params.get("activation_scales", "dynamic"))
        if scales not in ("dynamic", "static"):
            raise PackageError(f"{package.name}: activation_scales must be 'dynamic' or 'static', got {scales!r}")
        if scales == "static" and self.spec.input_ranges is None:
            raise PackageError(f"{package.name}: activation_scales 'static' needs input_ranges in model.npz")
        threads = int(num_threads or params.get("num_threads", 1))
        try:
            self.model = _core.NativeMLP(
                self.spec.weights,
                self.spec.biases,
                self.spec.activations,
                precision=self.precision,
                input_ranges=self.spec.input_ranges if scales == "static" else None,
                level=level,
                num_threads=threads,
            )
        except ValueError as exc:
            raise PackageError(f"{package.name}: {exc}") from None
        self.forward = self.model.forward
        self.forward_into = self.model.forward_into

    @property
    def preferred_execution(self) -> str:
        """"inline" unless a full batch is long enough (about a millisecond) to stall the loop.

        The batcher calls the kernel directly either way (no GIL); measured on one pinned
        core, inline answered the reference MLP 1.5x faster than executor threads, which
        pay a thread hand-off per batch.
        """
        full_batch_macs = self.package.max_batch_size * self.model.macs_per_row
        return "threads" if full_batch_macs >= INLINE_MAX_BATCH_MACS else "inline"

    @property
    def level(self) -> str:
        return self.model.level

    def run(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        """One batch: [float32 array [rows, in_features]] -> [float32 array [rows, out_features]]."""
        if len(inputs) != 1:
            raise ValueError(f"{self.package.name} takes 1 input ({self.input_spec.name}), got {len(inputs)}")
        x = inputs[0]
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, dtype=np.float32)
        return [self.model.forward(x)]

    def run_into(self, x: Any, out: Any) -> None:
        """Writes the outputs for rows `x` into `out` (C-contiguous float32 buffers); allocates nothing."""
        self.model.forward_into(x, out)

    def batch_executor(
        self, input_buffers: list[list[memoryview]], output_buffers: list[list[memoryview]]
    ) -> Callable[[int, int], None]:
        """execute(executor, rows) over each executor's preallocated batch buffers (the C++ batcher's)."""
        rows_max = self.package.max_batch_size
        ins = [np.frombuffer(b[0], dtype=np.float32).reshape(rows_max, -1) for b in input_buffers]
        outs = [np.frombuffer(b[0], dtype=np.float32).reshape(rows_max, -1) for b in output_buffers]
        forward_into = self.model.forward_into

        def execute(executor: int, rows: int) -> None:
            forward_into(ins[executor][:rows], outs[executor][:rows])

        return execute

    def native_handle(self) -> Any:
        """(model capsule, forward-function capsule) for native callers; see vivace._core.NativeMLP."""
        return self.model.native_handle(), _core.NATIVE_MLP_FORWARD
