"""Model backends: what runs a batch.

A backend loads a package and offers two entry points:
  run(inputs)                       offline: a list of arrays/tensors in, outputs out
  batch_executor(inputs, outputs)   online: returns execute(executor, rows), called by the
                                    C++ batcher once per batch with the executor's batch
                                    buffers already filled (inputs) and to be filled (outputs)

The torch backend takes the GIL once per batch (the batcher's executor thread calls it).
On CUDA it captures one CUDA graph per batch-size bucket and stages through pinned memory.
The ONNX Runtime backend binds the batch buffers themselves as the session's inputs and
outputs (IOBinding): onnxruntime reads the rows where the batcher put them and writes its
outputs where the batcher answers from. The Python backend calls a user's class on
read-only views of the batch buffers and copies what it returns into the output buffers.
The ensemble backend runs its steps' backends one after another on the same batch, each
step reading and writing the buffers the batcher and the earlier steps filled.
"""
from __future__ import annotations

import threading
import time
import warnings
from typing import Any, Callable, Sequence

import numpy as np

from vivace import datatypes
from vivace import spec as package_spec
from vivace.spec import ENSEMBLE_PLATFORM, ONNX_PLATFORM, PYTHON_PLATFORM
from vivace.registry.package import NUMPY_DTYPES, ModelPackage, PackageError, TensorSpec

TORCH_PLATFORMS = ("torchscript", "torch_export")


class BackendError(RuntimeError):
    """A model failed to load or returned something its signature does not allow."""


class SignatureMismatch(BackendError):
    """The model's outputs do not match the package's declared signature."""


def _buffer_arrays(buffers: Sequence[memoryview], specs: Sequence[TensorSpec], max_batch: int) -> list[np.ndarray]:
    return [
        np.frombuffer(buf, dtype=datatypes.get(datatypes.batch_datatype(spec.datatype)).numpy)
        .reshape(max_batch, *spec.row_shape)
        for buf, spec in zip(buffers, specs)
    ]


class TorchBackend:
    """TorchScript or torch.export packages on CPU or CUDA."""

    @property
    def preferred_execution(self) -> str:
        # CPU torch holds the GIL for its Python dispatch: running batches on the loop
        # thread avoids a GIL hand-off per batch and batches a whole loop iteration.
        # A GPU batch mostly waits on the device, so it runs on executor threads.
        return "threads" if self.device.type == "cuda" else "inline"

    def __init__(self, package: ModelPackage, device: str | None = None, num_threads: int | None = None):
        import torch

        self.torch = torch
        self.package = package
        threads = num_threads or package.parameters.get("torch_num_threads")
        if threads:
            torch.set_num_threads(int(threads))
        if device is None:
            wants_gpu = package.instance_kind == "KIND_GPU" or (
                package.instance_kind == "KIND_AUTO" and torch.cuda.is_available()
            )
            device = "cuda" if wants_gpu else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError(f"model {package.name!r} asks for a GPU but CUDA is not available")
        self.device = torch.device(device)
        self.model = self._load()
        for spec in (*package.inputs, *package.outputs):
            if not datatypes.numpy_native(spec.datatype):  # torch.from_numpy needs a numpy dtype
                raise PackageError(f"{package.name}: datatype {spec.datatype} is not supported by the torch backend")

    def _load(self):
        torch, package = self.torch, self.package
        path = str(package.model_path)
        try:
            if package.platform == "torchscript":
                with warnings.catch_warnings():  # TorchScript is deprecated upstream, still served
                    warnings.simplefilter("ignore", DeprecationWarning)
                    model = torch.jit.load(path, map_location=self.device)
                model.eval()
                if self.device.type == "cpu" and package.parameters.get("torch_optimize", True):
                    model = _optimize_torchscript(torch, model)
            elif package.platform == "torch_export":
                model = torch.export.load(path).module().to(self.device)
            else:
                raise BackendError(f"the torch backend cannot run platform {package.platform!r}")
        except BackendError:
            raise
        except Exception as exc:  # torch raises many types for a bad file
            raise BackendError(f"cannot load model {package.name!r} from {path}: {exc}") from exc
        return model

    def _check_outputs(self, result: Any, rows: int) -> Sequence[Any]:
        torch = self.torch
        outputs = (result,) if isinstance(result, torch.Tensor) else result
        if not isinstance(outputs, (tuple, list)) or len(outputs) != len(self.package.outputs):
            raise SignatureMismatch(
                f"model {self.package.name!r} returned {type(result).__name__}, "
                f"expected {len(self.package.outputs)} tensor(s)"
            )
        for out, spec in zip(outputs, self.package.outputs):
            expected = (rows, *spec.row_shape)
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise SignatureMismatch(
                    f"model {self.package.name!r} returned {spec.name} with shape {shape}, expected {expected}"
                )
        return outputs

    def run(self, inputs: Sequence[Any]) -> list[Any]:
        """Run one batch; numpy in → numpy out, torch in → torch out (on the input's device)."""
        torch = self.torch
        as_numpy = isinstance(inputs[0], np.ndarray)
        tensors = [torch.from_numpy(x) if isinstance(x, np.ndarray) else x for x in inputs]
        source_device = tensors[0].device
        if source_device != self.device:
            tensors = [t.to(self.device) for t in tensors]
        with torch.inference_mode():
            outputs = self._check_outputs(self.model(*tensors), tensors[0].shape[0])
        if as_numpy:
            return [o.cpu().numpy() for o in outputs]
        return [o.to(source_device) for o in outputs]

    def batch_executor(
        self, input_buffers: list[list[memoryview]], output_buffers: list[list[memoryview]]
    ) -> Callable[[int, int], None]:
        """Build execute(executor, rows) over each executor's batch buffers."""
        torch, package = self.torch, self.package
        mbs = package.max_batch_size
        ins = [[torch.from_numpy(a) for a in _buffer_arrays(b, package.inputs, mbs)] for b in input_buffers]
        outs = [[torch.from_numpy(a) for a in _buffer_arrays(b, package.outputs, mbs)] for b in output_buffers]
        if self.device.type == "cuda":
            graphs = [_CudaGraphRunner(self, mbs) for _ in input_buffers]

            def execute_cuda(executor: int, rows: int) -> None:
                graphs[executor].run(ins[executor], outs[executor], rows)

            return execute_cuda

        model, check = self.model, self._check_outputs
        inference_mode = torch.inference_mode

        def execute(executor: int, rows: int) -> None:
            with inference_mode():
                result = check(model(*[t[:rows] for t in ins[executor]]), rows)
                for dst, src in zip(outs[executor], result):
                    dst[:rows].copy_(src)

        return execute


def _optimize_torchscript(torch, model):
    """Freeze and fuse a TorchScript module for CPU inference (about 2x faster at batch 1).

    The TorchScript passes are deprecated upstream but still the fastest CPU path here;
    a module they cannot handle is served as it was loaded.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return torch.jit.optimize_for_inference(torch.jit.freeze(model))
        except Exception:  # noqa: BLE001 - any failure means: keep the plain module
            return model


class _CudaGraphRunner:
    """One executor's CUDA graphs, one per batch-size bucket (powers of two up to max)."""

    def __init__(self, backend: TorchBackend, max_batch: int):
        torch = backend.torch
        self.torch = torch
        package = backend.package
        self.buckets = []
        b = 1
        while b < max_batch:
            self.buckets.append(b)
            b *= 2
        self.buckets.append(max_batch)
        specs = (*package.inputs, *package.outputs)
        dt = {s.name: getattr(torch, datatypes.get(s.datatype).numpy) for s in specs}
        dev = backend.device
        self.static_in = [torch.zeros((max_batch, *s.row_shape), dtype=dt[s.name], device=dev) for s in package.inputs]
        self.pinned_in = [torch.zeros((max_batch, *s.row_shape), dtype=dt[s.name]).pin_memory() for s in package.inputs]
        self.pinned_out = [torch.zeros((max_batch, *s.row_shape), dtype=dt[s.name]).pin_memory() for s in package.outputs]
        self.stream = torch.cuda.Stream(device=dev)
        self.graphs = {}
        model = backend.model
        with torch.inference_mode():
            self.stream.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(self.stream):
                for _ in range(3):  # warm up kernels and allocator before capture
                    model(*self.static_in)
            torch.cuda.current_stream(dev).wait_stream(self.stream)
            for bucket in self.buckets:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream):
                    out = backend._check_outputs(model(*[t[:bucket] for t in self.static_in]), bucket)
                self.graphs[bucket] = (graph, out)
        self.lock = threading.Lock()

    def run(self, host_in: list[Any], host_out: list[Any], rows: int) -> None:
        bucket = next(b for b in self.buckets if b >= rows)
        graph, outputs = self.graphs[bucket]
        with self.lock, self.torch.cuda.stream(self.stream):
            for pinned, static, src in zip(self.pinned_in, self.static_in, host_in):
                pinned[:rows].copy_(src[:rows])
                static[:rows].copy_(pinned[:rows], non_blocking=True)
            graph.replay()
            for pinned, out in zip(self.pinned_out, outputs):
                pinned[:rows].copy_(out[:rows], non_blocking=True)
            self.stream.synchronize()
            for dst, pinned in zip(host_out, self.pinned_out):
                dst[:rows].copy_(pinned[:rows])


class OnnxBackend:
    """ONNX models through onnxruntime: the CPU execution provider, or CUDA's when the
    package asks for a GPU (KIND_GPU, or KIND_AUTO on a machine that has one)."""

    def __init__(self, package: ModelPackage, device: str | None = None, num_threads: int | None = None):
        from vivace.registry import onnx_model

        self.package = package
        for s in (*package.inputs, *package.outputs):
            if not datatypes.numpy_native(s.datatype):  # IOBinding is given numpy dtypes
                raise PackageError(f"{package.name}: datatype {s.datatype} is not supported by the onnxruntime backend")
        if device is None:
            wants_gpu = package.instance_kind == "KIND_GPU" or (
                package.instance_kind == "KIND_AUTO" and onnx_model.cuda_available()
            )
            device = "cuda" if wants_gpu else "cpu"
        self.device = device
        parameters = dict(package.parameters)
        if num_threads:
            parameters["intra_op_thread_count"] = num_threads
        try:
            self.session = onnx_model.open_session(package.model_path, parameters, device)
            onnx_model.check_signature(self.session, package.inputs, package.outputs, package.name)
        except PackageError as exc:
            raise BackendError(f"cannot load model {package.name!r}: {exc}") from None
        self._input_names = [s.name for s in package.inputs]
        self._output_names = [s.name for s in package.outputs]
        # run(None, ...) answers in the graph's order without looking names up (5 us a call)
        self._fetch = None if [o.name for o in self.session.get_outputs()] == self._output_names else self._output_names
        self._row_shapes = [s.row_shape for s in package.outputs]

    @property
    def preferred_execution(self) -> str:
        # onnxruntime releases the GIL while it runs; a CPU batch of a small model is a few
        # microseconds, cheaper on the loop than a hand-off to an executor thread. A GPU
        # batch mostly waits on the device, so it runs on executor threads.
        return "threads" if self.device.startswith("cuda") else "inline"

    def _check(self, outputs: Sequence[np.ndarray], rows: int) -> None:
        for out, row_shape, s in zip(outputs, self._row_shapes, self.package.outputs):
            if out.shape[0] != rows or out.shape[1:] != row_shape:
                raise SignatureMismatch(f"model {self.package.name!r} returned {s.name} with shape {out.shape}, "
                                        f"expected {(rows, *s.row_shape)}")

    def run(self, inputs: Sequence[Any]) -> list[Any]:
        """Run one batch; numpy in → numpy out, torch in → torch out."""
        first = inputs[0]
        as_torch = not isinstance(first, np.ndarray)
        arrays = [x.detach().cpu().numpy() for x in inputs] if as_torch else inputs
        try:
            outputs = self.session.run(self._fetch, dict(zip(self._input_names, arrays)))
        except Exception as exc:  # onnxruntime's own error types
            raise BackendError(f"model {self.package.name!r} failed: {exc}") from None
        self._check(outputs, arrays[0].shape[0])
        if as_torch:
            import torch

            return [torch.from_numpy(o).to(first.device) for o in outputs]
        return outputs

    def batch_executor(
        self, input_buffers: list[list[memoryview]], output_buffers: list[list[memoryview]]
    ) -> Callable[[int, int], None]:
        """execute(executor, rows): the session reads the rows from the executor's input
        buffers and writes its outputs into the executor's output buffers (IOBinding),
        with one binding per (executor, rows) made on first use."""
        package, session = self.package, self.session
        mbs = package.max_batch_size
        ins = [_buffer_arrays(b, package.inputs, mbs) for b in input_buffers]
        outs = [_buffer_arrays(b, package.outputs, mbs) for b in output_buffers]
        bindings: dict[tuple[int, int], Any] = {}

        def bind(executor: int, rows: int) -> Any:
            binding = session.io_binding()
            for s, array in zip(package.inputs, ins[executor]):
                binding.bind_input(s.name, "cpu", 0, array.dtype, [rows, *s.row_shape], array.ctypes.data)
            for s, array in zip(package.outputs, outs[executor]):
                binding.bind_output(s.name, "cpu", 0, array.dtype, [rows, *s.row_shape], array.ctypes.data)
            bindings[executor, rows] = binding
            return binding

        run_with_iobinding, check = session.run_with_iobinding, self._check

        def execute(executor: int, rows: int) -> None:
            binding = bindings.get((executor, rows)) or bind(executor, rows)
            try:
                run_with_iobinding(binding)
            except Exception:  # onnxruntime's own error types
                # An output whose shape is not its declaration cannot be written into its
                # buffer: say so (SignatureMismatch) rather than onnxruntime's wording.
                feed = {s.name: array[:rows] for s, array in zip(package.inputs, ins[executor])}
                check(session.run(self._fetch, feed), rows)
                raise

        return execute


class PythonBackend:
    """A user's class (registry/python_model.py has the contract) run by the batcher.

    Each executor has an instance of its own (created and loaded here), so predict is
    never called concurrently on one instance. Errors in user code and outputs the
    signature does not allow fail their batch with a message naming the model (a 500);
    a predict that hangs is failed by the server's execution-timeout watchdog, which is
    why batches run on executor threads.
    """

    preferred_execution = "threads"

    def __init__(self, package: ModelPackage, device: str | None = None, num_threads: int | None = None):
        from vivace.registry import python_model

        self.package = package
        self.python_model = python_model
        for s in (*package.inputs, *package.outputs):
            if not (datatypes.numpy_native(s.datatype) or s.datatype == "BYTES"):
                raise PackageError(f"{package.name}: datatype {s.datatype} is not supported by the python backend")
        try:
            self.cls = python_model.load_class(package.model_path, package.parameters["python_class"], package.name)
            self.models = [python_model.instantiate(self.cls, package.path, package.name)]
        except python_model.UserCodeError as exc:
            raise BackendError(str(exc)) from None
        self._names = [s.name for s in package.outputs]

    def _outputs(self, model: Any, arrays: Sequence[np.ndarray], rows: int) -> list[np.ndarray]:
        pm, package = self.python_model, self.package
        try:
            result = pm.predict(model, pm.batch_of(arrays, package.inputs), package.name)
            values = pm.returned(result, self._names, package.name)
            return [pm.check_output(v, s, rows, package.name) for v, s in zip(values, package.outputs)]
        except pm.OutputMismatch as exc:
            raise SignatureMismatch(str(exc)) from None

    def run(self, inputs: Sequence[Any]) -> list[Any]:
        """Run one batch; numpy in → numpy out, torch in → torch out."""
        as_torch = not isinstance(inputs[0], np.ndarray)
        arrays = [x.detach().cpu().numpy() if as_torch else x for x in inputs]
        try:
            arrays = [self.python_model.as_bytes(a) if s.datatype == "BYTES" else a
                      for a, s in zip(arrays, self.package.inputs)]
            outputs = self._outputs(self.models[0], arrays, arrays[0].shape[0])
        except self.python_model.UserCodeError as exc:
            raise BackendError(str(exc)) from None
        outputs = [o if s.datatype == "BYTES" else o.astype(NUMPY_DTYPES[s.datatype], copy=False)
                   for o, s in zip(outputs, self.package.outputs)]
        if as_torch:
            import torch

            return [torch.from_numpy(np.ascontiguousarray(o)).to(inputs[0].device) for o in outputs]
        return outputs

    def batch_executor(
        self, input_buffers: list[list[memoryview]], output_buffers: list[list[memoryview]]
    ) -> Callable[[int, int], None]:
        """execute(executor, rows): predict on read-only views of the executor's input rows,
        its outputs checked and copied into the executor's output buffers."""
        package, pm = self.package, self.python_model
        mbs = package.max_batch_size
        ins = [_buffer_arrays(b, package.inputs, mbs) for b in input_buffers]
        for arrays in ins:
            for array in arrays:
                array.flags.writeable = False  # a view of the batch buffer: user code must not change it
        outs = [_buffer_arrays(b, package.outputs, mbs) for b in output_buffers]
        try:
            while len(self.models) < len(input_buffers):
                self.models.append(pm.instantiate(self.cls, package.path, package.name))
        except pm.UserCodeError as exc:
            raise BackendError(str(exc)) from None
        models, outputs = self.models, self._outputs
        string_in = [s.datatype == "BYTES" for s in package.inputs]
        string_out = [s.datatype == "BYTES" for s in package.outputs]
        if any(string_in) or any(string_out):  # BYTES rows hold handles (engine/strings.py)
            from .strings import STRINGS

            def execute_strings(executor: int, rows: int) -> None:
                arrays = [STRINGS.get(a[:rows]) if text else a[:rows] for a, text in zip(ins[executor], string_in)]
                results = outputs(models[executor], arrays, rows)
                for dst, src, text in zip(outs[executor], results, string_out):
                    dst[:rows] = STRINGS.put(src.ravel()).reshape(src.shape) if text else src

            return execute_strings

        def execute(executor: int, rows: int) -> None:
            results = outputs(models[executor], [a[:rows] for a in ins[executor]], rows)
            for dst, src in zip(outs[executor], results):
                dst[:rows] = src

        return execute


class _Step:
    __slots__ = ("name", "ensemble_step", "backend", "counts")

    def __init__(self, ensemble_step: package_spec.EnsembleStep, backend: Any):
        self.name = ensemble_step.name
        self.ensemble_step = ensemble_step
        self.backend = backend
        # [executions, rows, nanoseconds] per executor: each counted by its executor's thread only
        self.counts: list[list[int]] = [[0, 0, 0]]


class EnsembleBackend:
    """An `ensemble` package (a pipeline of models, e.g. Python preprocessing, then an
    ONNX, torch or native model, then Python postprocessing) served as one model.

    The batcher forms the ensemble's batches; each batch runs every step in order, each
    through its own backend on the whole batch: a native step stays a GIL-free kernel call
    per batch, a Python step one `predict` per batch. Tensors pass between steps in buffers
    allocated once per executor (no copies): a step's input buffer is the ensemble input or
    the earlier step's output buffer that feeds it, and a step producing an ensemble output
    writes straight into the batcher's output buffer. Per-step executions, rows and time
    are counted (`step_stats`: /v2/models/{m}/stats and the vivace_step_* metrics).
    """

    def __init__(self, package: ModelPackage, device: str | None = None, num_threads: int | None = None):
        self.package = package
        try:
            ensemble = package_spec.decode_ensemble(package.model_path.read_bytes())
            self.tensors = package_spec.check_wiring(ensemble, package.inputs, package.outputs)
        except package_spec.ManifestError as exc:
            raise PackageError(f"{package.path / package.model_file}: {exc}") from None
        self.steps = []
        for step in ensemble.steps:
            step_package = ModelPackage(
                path=package.path, name=f"{package.name}/{step.name}", version=package.version,
                platform=step.platform, model_file=step.model_file, inputs=step.inputs, outputs=step.outputs,
                max_batch_size=package.max_batch_size, instance_count=package.instance_count,
                instance_kind=package.instance_kind, parameters=step.parameters, files=package.files)
            self.steps.append(_Step(step, load_backend(step_package, device=device, num_threads=num_threads)))
        served = {t.name for t in (*package.inputs, *package.outputs)}
        # Tensors that live only between steps: a buffer per executor each.
        self._between = [t for name, t in self.tensors.items() if name not in served]

    @property
    def preferred_execution(self) -> str:
        # A step that must not stall the loop (a Python predict may hang) puts the whole batch on threads.
        return "threads" if any(s.backend.preferred_execution == "threads" for s in self.steps) else "inline"

    def run(self, inputs: Sequence[Any]) -> list[Any]:
        """Run one batch offline: each step's backend on the tensors the earlier steps produced."""
        values = {s.name: x for s, x in zip(self.package.inputs, inputs)}
        for step in self.steps:
            s = step.ensemble_step
            outputs = step.backend.run([values[s.source(t.name)] for t in s.inputs])
            values.update((s.target(t.name), out) for t, out in zip(s.outputs, outputs))
        return [values[t.name] for t in self.package.outputs]

    def batch_executor(
        self, input_buffers: list[list[memoryview]], output_buffers: list[list[memoryview]]
    ) -> Callable[[int, int], None]:
        """execute(executor, rows): every step in order on the executor's batch."""
        mbs = self.package.max_batch_size
        buffers = []
        for ins, outs in zip(input_buffers, output_buffers):
            named = {t.name: b for t, b in zip(self.package.inputs, ins)}
            named.update((t.name, b) for t, b in zip(self.package.outputs, outs))
            named.update((t.name, memoryview(bytearray(mbs * t.row_bytes))) for t in self._between)
            buffers.append(named)
        runs = []
        for step in self.steps:
            s = step.ensemble_step
            step.counts = [[0, 0, 0] for _ in buffers]
            runs.append((step.counts, step.backend.batch_executor(
                [[named[s.source(t.name)] for t in s.inputs] for named in buffers],
                [[named[s.target(t.name)] for t in s.outputs] for named in buffers])))
        # Strings produced between steps are handles (engine/strings.py) nobody answers with:
        # freed once the batch has run.
        between_strings = [(t.row_elements, [named[t.name] for named in buffers])
                           for t in self._between if t.datatype == "BYTES"]
        clock = time.perf_counter_ns

        def execute(executor: int, rows: int) -> None:
            try:
                for counts, run in runs:
                    started = clock()
                    run(executor, rows)
                    mine = counts[executor]
                    mine[0] += 1
                    mine[1] += rows
                    mine[2] += clock() - started
            finally:
                if between_strings:
                    from .strings import STRINGS

                    for elements, per_executor in between_strings:
                        handles = np.frombuffer(per_executor[executor], np.int64, rows * elements)
                        STRINGS.release(handles)
                        handles.fill(0)

        return execute

    def reset_step_stats(self) -> None:
        """Forget what was counted so far (the server's warm-up batches)."""
        for step in self.steps:
            for counts in step.counts:
                counts[:] = [0, 0, 0]

    def step_stats(self) -> list[dict[str, Any]]:
        stats = []
        for s in self.steps:
            executions, rows, ns = (sum(c[k] for c in s.counts) for k in range(3))
            stats.append({"name": s.name, "platform": s.ensemble_step.platform, "execution_count": executions,
                          "inference_count": rows, "compute_ns": ns})
        return stats


def load_backend(package: ModelPackage, device: str | None = None, num_threads: int | None = None):
    """The backend for a package's platform."""
    if package.platform == ENSEMBLE_PLATFORM:
        return EnsembleBackend(package, device=device, num_threads=num_threads)
    if package.platform in TORCH_PLATFORMS:
        return TorchBackend(package, device=device, num_threads=num_threads)
    if package.platform == ONNX_PLATFORM:
        return OnnxBackend(package, device=device, num_threads=num_threads)
    if package.platform == PYTHON_PLATFORM:
        return PythonBackend(package, device=device, num_threads=num_threads)
    if package.platform == "native_mlp":
        try:
            from vivace.engine.native import NativeMLPBackend
        except ImportError as exc:
            raise BackendError(f"model {package.name!r}: the native MLP backend is not available ({exc})") from exc
        return NativeMLPBackend(package, num_threads=num_threads)
    raise BackendError(f"model {package.name!r}: no backend for platform {package.platform!r}")
