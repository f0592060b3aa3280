"""KServe v2 / Open Inference Protocol messages and Triton's binary tensor extension.

Requests are decoded with typed msgspec Structs (never `json`); tensors carried in the
binary extension are sliced out of the body without copying. This module knows nothing of
HTTP framing or of the batcher: it turns bodies into validated tensors and results back
into bodies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from vivace import datatypes
from vivace.registry.package import ModelPackage

from .strings import STRINGS, length_prefixed, split_length_prefixed


class ProtocolError(Exception):
    """A request the server refuses; `status` is the HTTP status code to answer with,
    `headers` any header lines the answer needs (e.g. Allow on a 405)."""

    def __init__(self, message: str, status: int = 400, headers: bytes = b""):
        super().__init__(message)
        self.status = status
        self.headers = headers


class RequestInput(msgspec.Struct, kw_only=True):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = None


class RequestOutput(msgspec.Struct, kw_only=True):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(msgspec.Struct, kw_only=True):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(msgspec.Struct, omit_defaults=True):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list | None = None


class InferResponse(msgspec.Struct, omit_defaults=True):
    model_name: str
    model_version: str
    outputs: list[ResponseOutput]
    id: str | None = None


_request_decoder = msgspec.json.Decoder(InferRequest)
_encoder = msgspec.json.Encoder()
encode = _encoder.encode

# memoryview.cast formats for turning output bytes into JSON numbers.
_CAST_FORMATS = {d.name: d.struct_format for d in datatypes.TABLE if d.struct_format}


@dataclass(slots=True)
class DecodedInfer:
    """A validated request: per-input data in signature order, plus output choices."""

    id: str | None
    rows: int
    data: list[Any]            # a (nested) list of numbers or a bytes-like, per input
    binary_outputs: list[bool]  # per model output, in signature order
    wanted: list[bool]          # outputs the client asked for (all when it named none)
    priority: int
    timeout_us: int


def _bool_param(params: dict | None, key: str, where: str) -> bool | None:
    if not params or key not in params:
        return None
    value = params[key]
    if not isinstance(value, bool):
        raise ProtocolError(f"{where}: parameter {key!r} must be true or false")
    return value


def _int_param(params: dict | None, key: str, where: str) -> int:
    if not params or key not in params:
        return 0
    value = params[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"{where}: parameter {key!r} must be a non-negative integer")
    return value


# Datatypes a numeric raw feature may arrive as (JSON numbers either way).
_NUMERIC_DATATYPES = frozenset(d.name for d in datatypes.TABLE if d.numpy and d.name not in ("BOOL", "BF16"))


class RawFeatures:
    """The named raw columns of a model `vivace train` made, encoded into its one input.

    Such a package takes `input__0 [-1, F]` FP32 in the order of `metadata.features`, with
    a categorical column sent as the index of its value in that feature's `categories`.
    A client may instead send one input per feature, named as the feature: numbers (null
    for missing) for a numeric one, strings (BYTES) for a categorical one. They are encoded
    exactly as `registry.train.encode` encodes training rows: an unseen or null category
    becomes -1, a null number NaN.
    """

    def __init__(self, specs: list[dict[str, Any]], model: str):
        self.model = model
        self.names = [s["name"] for s in specs]
        self.position = {name: j for j, name in enumerate(self.names)}
        # per column: None (numeric) or {category: code}
        self.codes = [None if s["kind"] == "numeric" else {c: float(k) for k, c in enumerate(s["categories"])}
                      for s in specs]

    @classmethod
    def of(cls, package: ModelPackage) -> "RawFeatures | None":
        specs = package.metadata.get("features") if isinstance(package.metadata, dict) else None
        if not specs or len(package.inputs) != 1:
            return None
        spec = package.inputs[0]
        if spec.datatype != "FP32" or list(spec.shape[1:]) != [len(specs)]:
            return None
        return cls(specs, package.name)

    def encode(self, inputs: list[RequestInput]) -> tuple[bytes, int]:
        """(the FP32 rows as bytes, number of rows) from one input per feature."""
        import numpy as np

        columns: list[Any] = [None] * len(self.names)
        rows = -1
        for inp in inputs:
            j = self.position.get(inp.name)
            if j is None:
                raise ProtocolError(f"unknown input {inp.name!r} for model {self.model!r}; send its features "
                                    f"{self.names} by name, or its one input as a tensor")
            if columns[j] is not None:
                raise ProtocolError(f"input {inp.name!r} given more than once")
            if len(inp.shape) not in (1, 2) or inp.shape[1:] not in ([], [1]) or inp.shape[0] < 1:
                raise ProtocolError(f"feature {inp.name!r} has shape {inp.shape}; a feature column is [rows] or [rows, 1]")
            if rows == -1:
                rows = inp.shape[0]
            elif inp.shape[0] != rows:
                raise ProtocolError(f"feature {inp.name!r} has {inp.shape[0]} rows, other features have {rows}")
            values = inp.data
            if values.__class__ is not list:
                raise ProtocolError(f"feature {inp.name!r} has no data (raw features are sent as JSON lists)")
            if inp.shape[1:] == [1]:
                values = [v[0] if v.__class__ is list and len(v) == 1 else v for v in values]
            if len(values) != rows:
                raise ProtocolError(f"feature {inp.name!r} declares {rows} rows and holds {len(values)} values")
            codes = self.codes[j]
            if codes is None:
                if inp.datatype not in _NUMERIC_DATATYPES:
                    raise ProtocolError(f"feature {inp.name!r} is numeric: send it as FP32/FP64/INT*, not {inp.datatype}")
                if any(v is not None and (v.__class__ not in (int, float)) for v in values):
                    raise ProtocolError(f"feature {inp.name!r} is numeric: its values must be numbers or null")
                columns[j] = values
            else:
                if inp.datatype != "BYTES":
                    raise ProtocolError(f"feature {inp.name!r} is categorical: send it as BYTES (strings), "
                                        f"not {inp.datatype}")
                if any(v is not None and v.__class__ is not str for v in values):
                    raise ProtocolError(f"feature {inp.name!r} is categorical: its values must be strings or null")
                columns[j] = [codes.get(v, -1.0) for v in values]
        missing = [name for name, col in zip(self.names, columns) if col is None]
        if missing:
            raise ProtocolError(f"missing features {missing} for model {self.model!r} (it takes {self.names})")
        matrix = np.array(columns, dtype=np.float32).T  # None -> NaN
        return np.ascontiguousarray(matrix).tobytes(), rows


def _json_strings(inp: RequestInput, count: int) -> list[bytes]:
    """A BYTES input's JSON data (strings, flat or nested by row) as `count` UTF-8 byte strings."""
    values = inp.data
    while values and values[0].__class__ is list:  # nested: flatten one level at a time
        values = [v for row in values for v in (row if row.__class__ is list else [row])]
    if len(values) != count:
        raise ProtocolError(f"input {inp.name!r} has {len(values)} elements, its shape {inp.shape} needs {count}")
    for v in values:
        if v.__class__ is not str:
            raise ProtocolError(f"input {inp.name!r} is BYTES: its elements must be strings, got {type(v).__name__}")
    return [v.encode() for v in values]


class InferDecoder:
    """Decodes and validates infer bodies for one model; per-model facts are computed once."""

    def __init__(self, package: ModelPackage):
        self.package = package
        self.raw_features = RawFeatures.of(package)
        self.specs = package.inputs
        self.index = {s.name: i for i, s in enumerate(package.inputs)}
        # name → (position, datatype, full shape as a list, bytes per row)
        self.expect = {
            s.name: (i, s.datatype, list(s.shape), s.row_bytes) for i, s in enumerate(package.inputs)
        }
        self.output_index = {s.name: j for j, s in enumerate(package.outputs)}
        self.n_outputs = len(package.outputs)

    def decode(self, body: bytes | memoryview, header_length: int | None) -> DecodedInfer:
        """Decode and validate an infer body against the model's signature.

        `header_length` is the Inference-Header-Content-Length value when the client used the
        binary tensor extension: the JSON header is the first `header_length` bytes and the
        binary tensors follow, in the order of the inputs that declare `binary_data_size`.
        """
        if header_length is None:
            json_part, binary = body, None
        else:
            if header_length < 0 or header_length > len(body):
                raise ProtocolError(
                    f"Inference-Header-Content-Length {header_length} is outside the body of {len(body)} bytes"
                )
            view = memoryview(body)
            json_part, binary = view[:header_length], view[header_length:]
        try:
            request = _request_decoder.decode(json_part)
        except msgspec.ValidationError as exc:
            raise ProtocolError(f"invalid inference request: {exc}") from None
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"malformed JSON in inference request: {exc}") from None
        except UnicodeDecodeError:  # msgspec's error for invalid UTF-8 in a string
            raise ProtocolError("malformed JSON in inference request: invalid UTF-8") from None
        except RecursionError:
            raise ProtocolError("malformed JSON in inference request: nested too deeply") from None

        package = self.package
        expect = self.expect
        if self.raw_features is not None and request.inputs and request.inputs[0].name not in expect:
            if binary is not None:
                raise ProtocolError(f"model {package.name!r}: raw features are sent as JSON, not binary tensors")
            encoded, rows = self.raw_features.encode(request.inputs)
            return self._outputs(request, rows, [encoded])
        data: list[Any] = [None] * len(self.specs)
        rows = -1
        offset = 0
        for inp in request.inputs:
            found = expect.get(inp.name)
            if found is None:
                raise ProtocolError(
                    f"unknown input {inp.name!r} for model {package.name!r}; expected {list(expect)}"
                )
            i, datatype, shape, row_bytes = found
            if data[i] is not None:
                raise ProtocolError(f"input {inp.name!r} given more than once")
            if inp.datatype != datatype:
                raise ProtocolError(f"input {inp.name!r} has datatype {inp.datatype}, model expects {datatype}")
            got = inp.shape
            if len(got) != len(shape) or got[1:] != shape[1:] or got[0] < 1:
                raise ProtocolError(f"input {inp.name!r} has shape {got}, model expects {shape}")
            if rows == -1:
                rows = got[0]
            elif got[0] != rows:
                raise ProtocolError(f"input {inp.name!r} has batch size {got[0]}, other inputs have {rows}")
            binary_size = inp.parameters.get("binary_data_size") if inp.parameters else None
            if binary_size is None:
                if inp.data.__class__ is not list:
                    raise ProtocolError(f"input {inp.name!r} has no data (expected a list or binary_data_size)")
                data[i] = _json_strings(inp, rows * self.specs[i].row_elements) if datatype == "BYTES" else inp.data
                continue
            if binary is None:
                raise ProtocolError(
                    f"input {inp.name!r} declares binary_data_size but the request has no "
                    "Inference-Header-Content-Length header"
                )
            if not isinstance(binary_size, int) or isinstance(binary_size, bool) or binary_size < 0:
                raise ProtocolError(f"input {inp.name!r}: binary_data_size must be a non-negative integer")
            if datatype == "BYTES":
                if offset + binary_size > len(binary):
                    raise ProtocolError(f"input {inp.name!r}: binary data truncated ({len(binary) - offset} bytes "
                                        f"left, {binary_size} declared)")
                try:
                    data[i] = split_length_prefixed(binary[offset:offset + binary_size],
                                                    rows * self.specs[i].row_elements)
                except ValueError as exc:
                    raise ProtocolError(f"input {inp.name!r} (BYTES, shape {got}): {exc}") from None
                offset += binary_size
                continue
            expected = rows * row_bytes
            if binary_size != expected:
                raise ProtocolError(
                    f"input {inp.name!r}: binary_data_size {binary_size} does not match shape {got} "
                    f"of {datatype} ({expected} bytes)"
                )
            if offset + binary_size > len(binary):
                raise ProtocolError(
                    f"input {inp.name!r}: binary data truncated ({len(binary) - offset} bytes left, "
                    f"{binary_size} declared)"
                )
            data[i] = binary[offset:offset + binary_size]
            offset += binary_size
        if binary is not None and offset != len(binary):
            raise ProtocolError(
                f"the body has {len(binary) - offset} bytes of binary data beyond the declared binary_data_size"
            )
        if None in data:
            missing = [self.specs[i].name for i, d in enumerate(data) if d is None]
            raise ProtocolError(f"missing inputs {missing} for model {package.name!r}")
        return self._outputs(request, rows, data)

    def _outputs(self, request: InferRequest, rows: int, data: list[Any]) -> DecodedInfer:
        """The decoded request, with the outputs it asks for and its scheduling parameters."""
        package = self.package
        n_out = self.n_outputs
        params = request.parameters
        if params is None and request.outputs is None:
            return DecodedInfer(request.id, rows, data, [False] * n_out, [True] * n_out, 0, 0)
        default_binary = bool(_bool_param(params, "binary_data_output", "request"))
        binary_outputs = [default_binary] * n_out
        wanted = [True] * n_out
        if request.outputs:
            wanted = [False] * n_out
            for out in request.outputs:
                j = self.output_index.get(out.name)
                if j is None:
                    raise ProtocolError(
                        f"unknown output {out.name!r} for model {package.name!r}; "
                        f"expected {list(self.output_index)}"
                    )
                wanted[j] = True
                if out.parameters and "classification" in out.parameters:
                    raise ProtocolError("the classification extension is not supported")
                flag = _bool_param(out.parameters, "binary_data", f"output {out.name!r}")
                if flag is not None:
                    binary_outputs[j] = flag
        return DecodedInfer(
            request.id, rows, data, binary_outputs, wanted,
            _int_param(params, "priority", "request"), _int_param(params, "timeout", "request"),
        )


class ResponseEncoder:
    """Encodes results for one model; the per-model parts are computed once."""

    def __init__(self, package: ModelPackage):
        self.model_name = package.name
        self.model_version = package.version
        self.outputs = [(s.name, s.datatype, list(s.row_shape), s.row_bytes) for s in package.outputs]
        self.offset_per_row = []
        total = 0
        for spec in package.outputs:
            self.offset_per_row.append(total)
            total += spec.row_bytes

    def encode(self, call: DecodedInfer, payload: bytes) -> tuple[bytes, int | None]:
        """Returns (body, json_header_length or None when no output is binary)."""
        rows = call.rows
        view = memoryview(payload)
        outputs = []
        binary_parts = []
        for j, (name, datatype, row_shape, row_bytes) in enumerate(self.outputs):
            if not call.wanted[j]:
                continue
            start = self.offset_per_row[j] * rows
            chunk = view[start:start + row_bytes * rows]
            shape = [rows, *row_shape]
            if datatype == "BYTES":  # the rows hold handles (engine/strings.py)
                values = STRINGS.get(np.frombuffer(chunk, np.int64)).tolist()
                if call.binary_outputs[j]:
                    chunk = memoryview(length_prefixed(values))
                else:  # JSON strings: bytes that are not UTF-8 need binary_data
                    outputs.append(ResponseOutput(name, datatype, shape, None,
                                                  [v.decode(errors="backslashreplace") for v in values]))
                    continue
            if call.binary_outputs[j]:
                binary_parts.append(chunk)
                outputs.append(ResponseOutput(name, datatype, shape, {"binary_data_size": len(chunk)}))
            else:
                outputs.append(ResponseOutput(name, datatype, shape, None, _to_list(chunk, datatype)))
        header = encode(InferResponse(self.model_name, self.model_version, outputs, call.id))
        if not binary_parts:
            return header, None
        return b"".join([header, *binary_parts]), len(header)


def _to_list(chunk: memoryview, datatype: str) -> list:
    fmt = _CAST_FORMATS.get(datatype)
    if fmt is not None:
        return chunk.cast(fmt).tolist()
    # FP16, BF16: no memoryview format; rare enough to pay for numpy
    if datatype == "BF16":  # the top half of a float32: widen without a bfloat16 library
        return (np.frombuffer(chunk, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32).tolist()
    return np.frombuffer(chunk, dtype=np.float16).astype(np.float32).tolist()


def supported_datatype(datatype: str) -> bool:
    """Whether the codecs (and the batcher) carry tensors of this datatype."""
    return datatype in datatypes.TENSOR_DATATYPES
