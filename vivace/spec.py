"""The model-package manifest (package.json, format "vivace-model-package/1") as typed Structs.

Ground floor: imports msgspec and the datatype table (vivace.datatypes), nothing else of
Vivace. registry/package.py reads and writes package.json only through `decode` and
`encode` here, so the format has one definition and one writer.

Field names follow Triton's model configuration where one exists. Constraints live in
the types, so a bad manifest is refused with the field's path, e.g.
"Expected `int` >= 1 - at `$.max_batch_size`". Unknown fields are ignored (and dropped
when a package is written), as they always were.
"""
from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec

# TENSOR_DATATYPES: re-exported for importers of the spec (the batchable names)
from vivace.datatypes import PACKAGE_DATATYPES, TENSOR_DATATYPES, batch_datatype, itemsize  # noqa: F401

FORMAT: Final = "vivace-model-package/1"
MANIFEST = "package.json"

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
# A plain file name inside the package directory: no path separator, not hidden.
FILE_NAME_PATTERN = r"^[^/.][^/]*$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"

Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
FileName = Annotated[str, msgspec.Meta(pattern=FILE_NAME_PATTERN)]
Sha256 = Annotated[str, msgspec.Meta(pattern=SHA256_PATTERN)]
# The batcher holds counts and microseconds as int64 and priority levels as int.
INT64_MAX, INT32_MAX = 2**63 - 1, 2**31 - 1
NonNegative = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
Positive = Annotated[int, msgspec.Meta(ge=1, le=INT64_MAX)]
Level = Annotated[int, msgspec.Meta(ge=1, le=INT32_MAX)]
# A bound on one row of one tensor, so that size arithmetic in int64 never overflows.
MAX_ROW_BYTES = 2**40
Datatype = Literal[PACKAGE_DATATYPES]  # type: ignore[valid-type]  # batchable names, and BYTES
InstanceKind = Literal["KIND_CPU", "KIND_GPU", "KIND_AUTO"]
# A Python identifier (the class a `python` package serves).
IDENTIFIER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"

ONNX_PLATFORM: Final = "onnxruntime"
PYTHON_PLATFORM: Final = "python"
ENSEMBLE_PLATFORM: Final = "ensemble"
# The platforms whose tensors may be strings (BYTES): Python models, and ensembles that
# feed them or return what they return.
STRING_PLATFORMS: Final = (PYTHON_PLATFORM, ENSEMBLE_PLATFORM)


class TensorSpec(msgspec.Struct, frozen=True):
    """One input or output: shapes include the batch dimension first, as -1."""

    name: Annotated[str, msgspec.Meta(min_length=1)]
    datatype: Datatype
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        # The types are only enforced when decoding; these checks also guard direct use.
        if self.datatype not in PACKAGE_DATATYPES:
            raise ValueError(f"tensor {self.name!r} has unsupported datatype {self.datatype!r}")
        if not self.shape or self.shape[0] != -1:
            raise ValueError(f"tensor {self.name!r} shape must start with the batch dimension -1")
        if any(d < 1 for d in self.shape[1:]):
            raise ValueError(f"tensor {self.name!r} may only have a variable batch dimension; got {list(self.shape)}")
        if self.row_bytes > MAX_ROW_BYTES:
            raise ValueError(f"tensor {self.name!r} rows of shape {list(self.shape)} exceed {MAX_ROW_BYTES} bytes")

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
        """Bytes of one row in the batcher (a BYTES element is an 8-byte handle there)."""
        return self.row_elements * itemsize(batch_datatype(self.datatype))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


class QueuePolicy(msgspec.Struct):
    default_timeout_microseconds: NonNegative = 0
    allow_timeout_override: bool = True
    max_queue_size: NonNegative = 0


class DynamicBatching(msgspec.Struct):
    preferred_batch_size: list[Positive] = msgspec.field(default_factory=list)
    max_queue_delay_microseconds: NonNegative = 0
    priority_levels: Level = 1
    default_priority_level: Level = 1
    # null reads as the defaults, as it always has
    default_queue_policy: QueuePolicy | None = msgspec.field(default_factory=QueuePolicy)

    def __post_init__(self) -> None:
        if self.default_queue_policy is None:
            self.default_queue_policy = QueuePolicy()
        if self.default_priority_level > self.priority_levels:
            raise ValueError("default_priority_level must be within 1..priority_levels")
        self.preferred_batch_size = sorted(self.preferred_batch_size)


class InstanceGroup(msgspec.Struct):
    count: Positive = 1
    kind: InstanceKind = "KIND_CPU"


class Manifest(msgspec.Struct, kw_only=True):
    """package.json; field order is the order written."""

    format: Literal["vivace-model-package/1"]
    name: Name
    # Written as a string; an integer (hand-written manifests) reads as its decimal form.
    version: Name | int = "1"
    platform: Annotated[str, msgspec.Meta(min_length=1)]
    model_file: FileName
    inputs: Annotated[list[TensorSpec], msgspec.Meta(min_length=1)]
    outputs: Annotated[list[TensorSpec], msgspec.Meta(min_length=1)]
    max_batch_size: Positive = 128
    dynamic_batching: DynamicBatching | None = msgspec.field(default_factory=DynamicBatching)
    instance_group: InstanceGroup | None = msgspec.field(default_factory=InstanceGroup)
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)  # free-form: run, lineage, profile, ...
    files: dict[FileName, Sha256] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.version, int):
            if self.version < 0:
                raise ValueError(f"version must be a non-negative integer or match {NAME_PATTERN}")
            self.version = str(self.version)
        if self.dynamic_batching is None:
            self.dynamic_batching = DynamicBatching()
        if self.instance_group is None:
            self.instance_group = InstanceGroup()
        for kind, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            names = [t.name for t in specs]
            if len(set(names)) != len(names):
                raise ValueError(f"duplicate {kind} names {names}")
        if any(p > self.max_batch_size for p in self.dynamic_batching.preferred_batch_size):
            raise ValueError(f"preferred_batch_size entries must be integers in 1..{self.max_batch_size}")
        _strings_allowed(self.platform, self.inputs, self.outputs, "$.")
        platform_parameters(self.platform, self.parameters)


def _strings_allowed(platform: str, inputs: list[TensorSpec], outputs: list[TensorSpec], path: str) -> None:
    if platform in STRING_PLATFORMS:
        return
    for kind, specs in (("inputs", inputs), ("outputs", outputs)):
        for i, t in enumerate(specs):
            if t.datatype == "BYTES":
                raise ValueError(f"tensor {t.name!r} is BYTES: only python models take or return strings "
                                 f"- at `{path}{kind}[{i}].datatype`")


ENSEMBLE_FORMAT: Final = "vivace-ensemble/1"
ENSEMBLE_FILE: Final = "ensemble.json"


class EnsembleStep(msgspec.Struct, kw_only=True):
    """One step of an ensemble: a model of its own (any platform but ensemble), whose
    files lie in the ensemble's package, and how its tensors connect. `input_map` names,
    for each of the step's inputs, the tensor that feeds it: an input of the ensemble or an
    earlier step's output; `output_map` names the tensor each output becomes (default: its
    own name). Steps run in order, so the graph cannot have a cycle."""

    name: Name
    platform: Annotated[str, msgspec.Meta(min_length=1)]
    model_file: FileName
    inputs: Annotated[list[TensorSpec], msgspec.Meta(min_length=1)]
    outputs: Annotated[list[TensorSpec], msgspec.Meta(min_length=1)]
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)
    input_map: dict[str, Annotated[str, msgspec.Meta(min_length=1)]] = msgspec.field(default_factory=dict)
    output_map: dict[str, Annotated[str, msgspec.Meta(min_length=1)]] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.platform == ENSEMBLE_PLATFORM:
            raise ValueError(f"step {self.name!r}: an ensemble cannot be a step of another")
        _strings_allowed(self.platform, self.inputs, self.outputs, f"step {self.name!r} ")
        for kind, specs, mapping in (("inputs", self.inputs, self.input_map),
                                     ("outputs", self.outputs, self.output_map)):
            names = [t.name for t in specs]
            if len(set(names)) != len(names):
                raise ValueError(f"step {self.name!r}: duplicate {kind} names {names}")
            unknown = sorted(set(mapping) - set(names))
            if unknown:
                raise ValueError(f"step {self.name!r}: {kind} map names {unknown}, which are not among its {kind} {names}")
        platform_parameters(self.platform, self.parameters)

    def source(self, input_name: str) -> str:
        """The ensemble tensor that feeds this step's input."""
        return self.input_map.get(input_name, input_name)

    def target(self, output_name: str) -> str:
        """The ensemble tensor this step's output becomes."""
        return self.output_map.get(output_name, output_name)


class Ensemble(msgspec.Struct, kw_only=True):
    """ensemble.json, the model file of an `ensemble` package: its steps in the order they run."""

    format: Literal["vivace-ensemble/1"]
    steps: Annotated[list[EnsembleStep], msgspec.Meta(min_length=1)]


def check_wiring(ensemble: Ensemble, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> dict[str, TensorSpec]:
    """Check that the steps connect the ensemble's inputs to its outputs: every step input
    is fed by an ensemble input or an earlier step's output of the same datatype and row
    shape, no tensor is produced twice, and every ensemble output is produced. Returns every
    tensor of the graph by name; raises ManifestError naming the step and tensor."""
    tensors = {t.name: t for t in inputs}
    for step in ensemble.steps:
        for t in step.inputs:
            source = tensors.get(step.source(t.name))
            if source is None:
                raise ManifestError(f"step {step.name!r}: input {t.name!r} is fed by {step.source(t.name)!r}, which "
                                    f"is neither an input of the ensemble nor an output of an earlier step")
            if (source.datatype, source.shape) != (t.datatype, t.shape):
                raise ManifestError(f"step {step.name!r}: input {t.name!r} is {t.datatype} {list(t.shape)}, its source "
                                    f"{source.name!r} is {source.datatype} {list(source.shape)}")
        for t in step.outputs:
            target = step.target(t.name)
            if target in tensors:
                raise ManifestError(f"step {step.name!r}: output {t.name!r} becomes {target!r}, which already exists "
                                    f"(an ensemble input or an earlier step's output): map it to another name")
            tensors[target] = TensorSpec(target, t.datatype, t.shape)
    for t in outputs:
        produced = tensors.get(t.name)
        if produced is None or t.name in {i.name for i in inputs}:
            raise ManifestError(f"ensemble output {t.name!r} is not produced by any step")
        if (produced.datatype, produced.shape) != (t.datatype, t.shape):
            raise ManifestError(f"ensemble output {t.name!r} is {t.datatype} {list(t.shape)}, the step producing it "
                                f"returns {produced.datatype} {list(produced.shape)}")
    return tensors


_ensemble_decoder = msgspec.json.Decoder(Ensemble)


def decode_ensemble(data: bytes) -> Ensemble:
    """Parse ensemble.json bytes."""
    return _decode(_ensemble_decoder, data)


def encode_ensemble(ensemble: Ensemble) -> bytes:
    """ensemble.json bytes: indented, newline-terminated."""
    return msgspec.json.format(_encoder.encode(ensemble), indent=2) + b"\n"


class OnnxRuntimeParameters(msgspec.Struct, kw_only=True):
    """The `parameters` an `onnxruntime` package may set (names as Triton's onnxruntime
    backend spells them where it has one); other keys (e.g. `execution`) are not read here.

    Threads default to 1: the batcher runs batches on one core per executor, and
    onnxruntime's own default (a thread per core) fights the server's other threads.
    0 means onnxruntime's default.
    """

    intra_op_thread_count: Annotated[int, msgspec.Meta(ge=0, le=4096)] = 1
    inter_op_thread_count: Annotated[int, msgspec.Meta(ge=0, le=4096)] = 1
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = "all"
    execution_mode: Literal["sequential", "parallel"] = "sequential"
    enable_cpu_mem_arena: bool = True
    enable_mem_pattern: bool = True
    # onnxruntime session configuration entries (SessionOptions.add_session_config_entry),
    # e.g. {"session.intra_op.allow_spinning": "0"}
    session_config: dict[Annotated[str, msgspec.Meta(min_length=1)], str] = msgspec.field(default_factory=dict)


class PythonParameters(msgspec.Struct, kw_only=True):
    """The `parameters` a `python` package must set: the class of model_file to serve."""

    python_class: Annotated[str, msgspec.Meta(pattern=IDENTIFIER_PATTERN)]


# platform -> the Struct its package parameters must satisfy
PLATFORM_PARAMETERS: dict[str, type[msgspec.Struct]] = {
    ONNX_PLATFORM: OnnxRuntimeParameters, PYTHON_PLATFORM: PythonParameters,
}


def platform_parameters(platform: str, parameters: dict[str, Any]) -> Any:
    """The typed parameters of a platform that declares them (None for the others);
    raises ManifestError naming the parameter."""
    struct = PLATFORM_PARAMETERS.get(platform)
    if struct is None:
        return None
    try:
        return msgspec.convert(parameters, struct)
    except msgspec.ValidationError as exc:
        raise ManifestError(f"{platform} parameters: {exc}".replace("`$.", "`$.parameters.")) from None


_decoder = msgspec.json.Decoder(Manifest)
_encoder = msgspec.json.Encoder()


class ManifestError(ValueError):
    """A manifest is not valid JSON or breaks the format; the message names the field path."""


def decode(data: bytes) -> Manifest:
    """Parse package.json bytes."""
    return _decode(_decoder, data)


def _decode(decoder: msgspec.json.Decoder, data: bytes) -> Any:
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise ManifestError(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise ManifestError(f"invalid JSON ({exc})") from None
    except RecursionError:
        raise ManifestError("invalid JSON (nested too deeply)") from None


def convert(obj: Any) -> Manifest:
    """Validate a manifest given as Python objects (a dict as json.loads returns it)."""
    try:
        return msgspec.convert(obj, Manifest)
    except msgspec.ValidationError as exc:
        raise ManifestError(str(exc)) from None
    except RecursionError:
        raise ManifestError("nested too deeply") from None


def encode(manifest: Manifest) -> bytes:
    """package.json bytes: indented, fields in declaration order, newline-terminated."""
    try:
        return msgspec.json.format(_encoder.encode(manifest), indent=2) + b"\n"
    except RecursionError:
        raise ManifestError("nested too deeply") from None


def to_dict(manifest: Manifest) -> dict[str, Any]:
    """The manifest as fresh JSON-typed Python objects (lists, not tuples)."""
    return msgspec.json.decode(_encoder.encode(manifest))
