"""ONNX models (`platform: onnxruntime`): the session a package's parameters describe, and
the signature an ONNX graph declares.

Shared by `vivace package` (which verifies a model before writing its package) and the
engine's ONNX Runtime backend (which serves it), so a package is checked with the very
session options it will be served with. onnxruntime is an optional dependency
(`pip install 'vivace[onnx]'`): it is imported only here, and only when needed.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from vivace import datatypes, spec

from .package import PackageError

GRAPH_LEVELS = {
    "disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL",
}
CPU_PROVIDER, CUDA_PROVIDER = "CPUExecutionProvider", "CUDAExecutionProvider"


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise PackageError("ONNX models need onnxruntime: pip install 'vivace[onnx]'") from None
    return onnxruntime


def session_options(ort: Any, parameters: dict[str, Any]) -> Any:
    """onnxruntime SessionOptions from a package's parameters (spec.OnnxRuntimeParameters)."""
    try:
        p = spec.platform_parameters(spec.ONNX_PLATFORM, parameters)
    except spec.ManifestError as exc:
        raise PackageError(str(exc)) from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = p.intra_op_thread_count
    options.inter_op_num_threads = p.inter_op_thread_count
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_LEVELS[p.graph_optimization_level])
    options.execution_mode = ort.ExecutionMode.ORT_PARALLEL if p.execution_mode == "parallel" else \
        ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_cpu_mem_arena = p.enable_cpu_mem_arena
    options.enable_mem_pattern = p.enable_mem_pattern
    for key, value in p.session_config.items():
        try:
            options.add_session_config_entry(key, value)
        except Exception as exc:  # onnxruntime raises its own types
            raise PackageError(f"onnxruntime refuses session_config {key!r}={value!r}: {exc}") from None
    return options


def providers(ort: Any, device: str) -> list[str]:
    """Execution providers for "cpu" or "cuda" (then CPU for the nodes CUDA cannot run)."""
    if device.startswith("cuda"):
        if CUDA_PROVIDER not in ort.get_available_providers():
            raise PackageError("the CUDA execution provider is not available (install onnxruntime-gpu on a CUDA machine)")
        return [CUDA_PROVIDER, CPU_PROVIDER]
    return [CPU_PROVIDER]


def cuda_available() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return CUDA_PROVIDER in onnxruntime.get_available_providers()


def open_session(model: bytes | str | os.PathLike, parameters: dict[str, Any], device: str = "cpu") -> Any:
    """An InferenceSession of an ONNX file or its bytes; raises PackageError saying why not."""
    ort = import_onnxruntime()
    options = session_options(ort, parameters)
    source = model if isinstance(model, bytes) else os.fspath(model)
    try:
        session = ort.InferenceSession(source, options, providers=providers(ort, device))
    except PackageError:
        raise
    except Exception as exc:  # InvalidProtobuf, Fail, InvalidGraph, ... (onnxruntime's own types)
        raise PackageError(f"not a model onnxruntime can load: {exc}") from None
    return session


def graph_signature_or_declared(session: Any, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]
                                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The inputs and outputs as manifest tensor entries: those declared, else as the graph
    declares them (every tensor's first dimension the dynamic batch, the others fixed)."""
    def entries(args: Sequence[Any], kind: str, declared: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if declared:
            return declared  # checked against the graph by check_signature
        out = []
        for arg in args:
            datatype = datatypes.from_onnx(arg.type)
            if datatype is None or datatype not in datatypes.TENSOR_DATATYPES:
                raise PackageError(f"{kind} {arg.name!r} has type {arg.type}, which Vivace cannot batch")
            shape = list(arg.shape or [])
            if not shape:
                raise PackageError(f"{kind} {arg.name!r} is a scalar: every tensor needs a batch dimension first")
            if isinstance(shape[0], int) and shape[0] > 0:
                raise PackageError(f"{kind} {arg.name!r} has a fixed batch dimension {shape[0]}: export the model "
                                   f"with a dynamic first axis (e.g. dynamic_axes={{{arg.name!r}: {{0: 'batch'}}}})")
            if not all(isinstance(d, int) and d > 0 for d in shape[1:]):
                raise PackageError(f"{kind} {arg.name!r} has shape {shape}: only the first (batch) dimension may "
                                   f"vary; declare its row shape (--{kind} NAME:DATATYPE:DIMS)")
            out.append({"name": arg.name, "datatype": datatype, "shape": [-1, *shape[1:]]})
        return out

    return entries(session.get_inputs(), "input", inputs), entries(session.get_outputs(), "output", outputs)


def check_signature(session: Any, inputs: Sequence[Any], outputs: Sequence[Any], name: str) -> None:
    """Refuse a package whose declared tensors are not the graph's (names, types, fixed dims)."""
    for kind, declared, args in (("inputs", inputs, session.get_inputs()), ("outputs", outputs, session.get_outputs())):
        graph = {a.name: a for a in args}
        names = [s.name for s in declared]
        if sorted(names) != sorted(graph):
            raise PackageError(f"{name}: the package declares {kind} {names}, the ONNX graph has {list(graph)}")
        for s in declared:
            arg = graph[s.name]
            if datatypes.get(s.datatype).onnx != arg.type:
                raise PackageError(f"{name}: {s.name!r} is {s.datatype} in the package, {arg.type} in the ONNX graph")
            shape = list(arg.shape or [])
            if len(shape) != len(s.shape) or any(
                isinstance(g, int) and g > 0 and g != d for g, d in zip(shape[1:], s.shape[1:])
            ) or (isinstance(shape[0], int) and shape[0] > 0):
                raise PackageError(f"{name}: {s.name!r} has shape {list(s.shape)} in the package, {shape} in the ONNX "
                                   f"graph (the first dimension must be the dynamic batch)")
