"""Property-based tests of the tensor codecs: engine.oip's InferDecoder and ResponseEncoder
around a real `_core.Batcher` whose backend echoes its inputs as outputs.

For every datatype Vivace serves and any row shape, row count and mix of inputs, a tensor
sent as JSON (flat or nested lists) or with the binary extension comes back unchanged,
as JSON or binary output, as the client asked for each output (JSON writes NaN and
infinities as null). Malformed variants of a
valid request - missing, repeated or unknown tensors, wrong datatype or shape, wrong
binary sizes, header lengths outside the body, bad parameters, truncation, corrupted
bytes - are refused with ProtocolError (or ValueError/TypeError from the batcher's
submit, which the server also answers with 400), never another exception.

BYTES tensors are not supported (registry.package.DATATYPES has no BYTES): such a request
is refused like any unknown datatype.
"""
from __future__ import annotations

import json
from pathlib import Path

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from vivace import _core
from vivace.engine import oip
from vivace.registry.package import DATATYPES, NUMPY_DTYPES, ModelPackage, TensorSpec

# BF16 has no numpy dtype to draw arrays of: tests/test_datatypes.py round-trips it.
SERVED = sorted(d for d in DATATYPES if oip.supported_datatype(d) and d in NUMPY_DTYPES)
OK = int(_core.Status.OK)

tensor_specs = st.lists(
    st.tuples(st.sampled_from(SERVED), st.lists(st.integers(1, 3), min_size=1, max_size=2)),
    min_size=1, max_size=3,
)


def build(specs: list[tuple[str, list[int]]]):
    """Package, decoder, encoder and an echoing batcher for inputs in0.. and outputs out0.."""
    package = ModelPackage(
        path=Path("."), name="codec", version="3", platform="none", model_file="",
        inputs=[TensorSpec(f"in{i}", d, (-1, *shape)) for i, (d, shape) in enumerate(specs)],
        outputs=[TensorSpec(f"out{i}", d, (-1, *shape)) for i, (d, shape) in enumerate(specs)],
        max_batch_size=4,
    )
    holder = {}

    def echo(executor: int, rows: int) -> None:
        for spec, src, dst in zip(package.inputs, holder["in"], holder["out"]):
            n = rows * spec.row_bytes
            np.frombuffer(dst, np.uint8)[:n] = np.frombuffer(src, np.uint8)[:n]

    batcher = _core.Batcher(
        model_name="codec", max_batch_size=4, preferred_batch_sizes=[], max_queue_delay_us=0,
        priority_levels=1, default_priority=1, default_timeout_us=0, allow_timeout_override=True,
        max_queue_size=0, shed_queue_wait_us=0,
        inputs=[(s.datatype, list(s.row_shape)) for s in package.inputs],
        outputs=[(s.datatype, list(s.row_shape)) for s in package.outputs],
        executors=1, inline_execution=True, execute=echo,
    )
    holder["in"], holder["out"] = batcher.input_buffers(0), batcher.output_buffers(0)
    return package, oip.InferDecoder(package), oip.ResponseEncoder(package), batcher


def arrays_for(specs, rows: int, json_safe: bool):
    """A strategy of one array per spec; JSON cannot carry NaN or infinities."""
    return st.tuples(*[
        hnp.arrays(np.dtype(NUMPY_DTYPES[d]), (rows, *shape),
                   elements={"allow_nan": False, "allow_infinity": False} if json_safe and d.startswith("FP") else None)
        for d, shape in specs
    ])


def infer(decoder, encoder, batcher, body: bytes, header_length: int | None):
    """What App._infer does with a body, short of HTTP: the response (body, header length)."""
    decoded = decoder.decode(body, header_length)
    assert batcher.submit(1, decoded.data, decoded.rows, decoded.priority, decoded.timeout_us) == OK
    batcher.run_ready()
    ((token, status, payload),) = batcher.drain()
    assert token == 1 and status == OK, payload
    return encoder.encode(decoded, payload)


def outputs_of(body: bytes, header_length: int | None, package: ModelPackage) -> dict[str, np.ndarray]:
    header = msgspec.json.decode(body if header_length is None else body[:header_length])
    assert header["model_name"] == "codec" and header["model_version"] == "3"
    offset = header_length or 0
    result = {}
    for out in header["outputs"]:
        dtype = np.dtype(NUMPY_DTYPES[out["datatype"]])
        if "data" in out:
            data = out["data"]
            if dtype.kind == "f":
                data = [np.nan if v is None else v for v in data]  # JSON writes NaN as null
            result[out["name"]] = np.asarray(data, dtype).reshape(out["shape"])
        else:
            size = out["parameters"]["binary_data_size"]
            chunk = body[offset:offset + size]
            offset += size
            result[out["name"]] = np.frombuffer(chunk, dtype).reshape(out["shape"])
    assert offset == (len(body) if header_length is not None else 0), "binary parts do not add up"
    return result


@st.composite
def requests(draw, binary_inputs: bool):
    specs = draw(tensor_specs)
    rows = draw(st.integers(1, 6))  # beyond max_batch_size too: the batcher splits and reassembles
    arrays = draw(arrays_for(specs, rows, json_safe=not binary_inputs))
    nested = draw(st.booleans())
    wanted = draw(st.lists(st.booleans(), min_size=len(specs), max_size=len(specs)))
    binary_out = draw(st.lists(st.booleans(), min_size=len(specs), max_size=len(specs)))
    return specs, rows, arrays, nested, wanted, binary_out


def request_body(specs, arrays, nested, wanted, binary_out, binary_inputs: bool, request_id: str):
    inputs, payload = [], []
    for i, ((datatype, _), array) in enumerate(zip(specs, arrays)):
        entry = {"name": f"in{i}", "shape": list(array.shape), "datatype": datatype}
        if binary_inputs:
            entry["parameters"] = {"binary_data_size": array.nbytes}
            payload.append(array.tobytes())
        else:
            entry["data"] = array.tolist() if nested else array.ravel().tolist()
        inputs.append(entry)
    doc = {"id": request_id, "inputs": inputs}
    if any(wanted):  # name some outputs (none named: all of them, as JSON)
        doc["outputs"] = [{"name": f"out{i}", "parameters": {"binary_data": b}}
                          for i, (w, b) in enumerate(zip(wanted, binary_out)) if w]
    header = msgspec.json.encode(doc)
    return header + b"".join(payload), (len(header) if binary_inputs else None)


@pytest.mark.parametrize("binary_inputs", [False, True], ids=["json", "binary"])
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_tensors_round_trip_through_decoder_batcher_and_encoder(binary_inputs, data):
    specs, rows, arrays, nested, wanted, binary_out = data.draw(requests(binary_inputs))
    request_id = data.draw(st.text(max_size=8))
    package, decoder, encoder, batcher = build(specs)
    body, header_length = request_body(specs, arrays, nested, wanted, binary_out, binary_inputs, request_id)
    response, response_header = infer(decoder, encoder, batcher, body, header_length)
    outputs = outputs_of(response, response_header, package)
    named = any(wanted)
    expected_names = {f"out{i}" for i, w in enumerate(wanted) if w or not named}
    assert set(outputs) == expected_names
    assert msgspec.json.decode(response if response_header is None else response[:response_header])["id"] == request_id
    for i, array in enumerate(arrays):
        name = f"out{i}"
        if name not in outputs:
            continue
        got = outputs[name]
        assert got.shape == array.shape
        if named and binary_out[i]:
            assert got.tobytes() == array.tobytes()  # bit for bit, NaN payloads included
        else:  # JSON has no NaN or infinities: both are written as null
            expected = np.where(np.isfinite(array), array, np.nan) if array.dtype.kind == "f" else array
            np.testing.assert_array_equal(got, expected)


# -- malformed variants ---------------------------------------------------------------------

SPECS = [("FP32", [2]), ("INT64", [1]), ("FP16", [3])]


def valid_doc(rows: int = 2, binary: bool = False) -> tuple[dict, bytes]:
    arrays = [np.arange(rows * 2, dtype=np.float32).reshape(rows, 2), np.arange(rows, dtype=np.int64).reshape(rows, 1),
              np.ones((rows, 3), np.float16)]
    inputs, payload = [], b""
    for i, ((datatype, _), array) in enumerate(zip(SPECS, arrays)):
        entry = {"name": f"in{i}", "shape": list(array.shape), "datatype": datatype}
        if binary:
            entry["parameters"] = {"binary_data_size": array.nbytes}
            payload += array.tobytes()
        else:
            entry["data"] = array.ravel().tolist()
        inputs.append(entry)
    return {"inputs": inputs}, payload


def _drop(doc, i): doc["inputs"].pop(i % 3)
def _repeat(doc, i): doc["inputs"].append(dict(doc["inputs"][i % 3]))
def _rename(doc, i): doc["inputs"][i % 3]["name"] = "nope"
def _datatype(doc, i): doc["inputs"][i % 3]["datatype"] = ["BYTES", "FP64", "INT8", "fp32", ""][i % 5]
def _row_shape(doc, i): doc["inputs"][i % 3]["shape"][1:] = [[5], [], [2, 1], [0]][i % 4]
def _rows(doc, i): doc["inputs"][i % 3]["shape"][0] = [0, -1, -(1 << 62)][i % 3]
def _batch_mismatch(doc, i): doc["inputs"][i % 3]["shape"][0] += 1 + i % 2
def _no_data(doc, i): doc["inputs"][i % 3].pop("data", None); doc["inputs"][i % 3].pop("parameters", None)
def _data_type(doc, i): doc["inputs"][i % 3].pop("parameters", None); doc["inputs"][i % 3]["data"] = [{"a": 1}, "text", 3, None][i % 4]
def _unknown_output(doc, i): doc["outputs"] = [{"name": ["nope", "in0", ""][i % 3]}]
def _binary_flag(doc, i): doc["outputs"] = [{"name": "out0", "parameters": {"binary_data": [1, "yes", None][i % 3]}}]
def _classification(doc, i): doc["outputs"] = [{"name": "out0", "parameters": {"classification": 2}}]
def _priority(doc, i): doc["parameters"] = {["priority", "timeout"][i % 2]: [-1, "1", 1.5, True][i % 4]}
def _request_binary_flag(doc, i): doc["parameters"] = {"binary_data_output": [0, "true"][i % 2]}
def _binary_size(doc, i): doc["inputs"][i % 3].setdefault("parameters", {})["binary_data_size"] = [-1, 7, "8", 1.0][i % 4]
def _not_object(doc, i): doc["inputs"] = [[1, 2], "x", None, {}][i % 4]


STRUCTURAL = [_drop, _repeat, _rename, _datatype, _row_shape, _rows, _batch_mismatch, _no_data, _data_type,
              _unknown_output, _binary_flag, _classification, _priority, _request_binary_flag, _binary_size,
              _not_object]


def refused(decoder, batcher, body: bytes, header_length: int | None) -> bool:
    """True when the server would answer 400; any other exception escapes (a finding)."""
    try:
        decoded = decoder.decode(body, header_length)
    except oip.ProtocolError as exc:
        assert exc.status == 400 and str(exc)
        return True
    try:
        status = batcher.submit(1, decoded.data, decoded.rows, decoded.priority, decoded.timeout_us)
    except (ValueError, TypeError):
        return True
    batcher.run_ready()
    batcher.drain()
    return status != OK


@settings(max_examples=150, deadline=None)
@given(mutation=st.sampled_from(STRUCTURAL), which=st.integers(0, 59), binary=st.booleans())
def test_structurally_malformed_requests_are_refused(mutation, which, binary):
    _, decoder, _, batcher = build(SPECS)
    doc, payload = valid_doc(binary=binary)
    mutation(doc, which)
    header = json.dumps(doc).encode()
    assert refused(decoder, batcher, header + payload, len(header) if binary else None), doc


@settings(max_examples=150, deadline=None)
@given(binary=st.booleans(), rows=st.integers(1, 5), cut=st.integers(0, 10_000), flips=st.lists(
    st.tuples(st.integers(0, 10_000), st.integers(0x20, 0x7E)), max_size=4), header_shift=st.integers(-3, 3))
def test_truncated_or_corrupted_bodies_never_escape_as_other_errors(binary, rows, cut, flips, header_shift):
    # Corruption uses ASCII bytes: invalid UTF-8 is the known finding "invalid-utf8-500"
    # (tests/test_fuzz.py::test_invalid_utf8_body_is_a_protocol_error).
    _, decoder, _, batcher = build(SPECS)
    doc, payload = valid_doc(rows, binary)
    header = json.dumps(doc).encode()
    body = bytearray(header + payload)
    for position, byte in flips:
        body[position % len(body)] = byte
    body = bytes(body[: max(1, len(body) - cut % len(body))])
    header_length = len(header) + header_shift if binary else None
    assume(body != header + payload or header_shift != 0)
    refused(decoder, batcher, body, header_length)  # refused or served: never another exception


@pytest.mark.parametrize("header_length", [-1, 10_000, 1 << 70])
def test_header_length_outside_the_body_is_refused(header_length):
    _, decoder, _, batcher = build(SPECS)
    doc, payload = valid_doc(binary=True)
    with pytest.raises(oip.ProtocolError, match="outside the body"):
        decoder.decode(json.dumps(doc).encode() + payload, header_length)
