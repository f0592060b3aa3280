"""The one datatype table (vivace/datatypes.py): its facts against numpy, the generated C++
header against the checked-in one, and BF16 carried end to end by the OIP codecs and the
batcher binding."""
from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest

from vivace import _core, datatypes
from vivace.engine import oip
from vivace.engine.openapi import _FLOAT_LIMITS, _INT_RANGES
from vivace.registry.package import ModelPackage, TensorSpec

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "csrc" / "common" / "datatypes.h"


def test_checked_in_header_is_the_generated_one():
    generated = subprocess.run([sys.executable, "-m", "vivace.datatypes", "--header"],
                               capture_output=True, text=True, check=True, timeout=60).stdout
    assert HEADER.read_text() == generated, "regenerate: python -m vivace.datatypes --header > csrc/common/datatypes.h"


def test_header_writer_refuses_unknown_arguments():
    assert datatypes.main(["--bogus"]) == 2


@pytest.mark.parametrize("d", [d for d in datatypes.TABLE if d.name not in ("BF16", "BYTES")], ids=lambda d: d.name)
def test_table_agrees_with_numpy_and_struct(d):
    dtype = datatypes.numpy_dtype(d.name)
    assert dtype.itemsize == d.itemsize
    if d.struct_format:
        assert struct.calcsize(d.struct_format) == d.itemsize
        assert memoryview(np.zeros(1, dtype).tobytes()).cast(d.struct_format).tolist() == [dtype.type(0)]
    if d.kind in ("int", "uint"):
        info = np.iinfo(dtype)
        assert d.int_range == (int(info.min), int(info.max))
    if d.float_max is not None:
        assert d.float_max == float(np.finfo(dtype).max)
    assert d.triton == f"TYPE_{d.name}" and d.batchable


def test_bf16_and_bytes():
    bf16, raw = datatypes.get("BF16"), datatypes.get("BYTES")
    assert (bf16.itemsize, bf16.triton, bf16.batchable) == (2, "TYPE_BF16", True)
    # the largest finite bfloat16: 0x7F7F, the top half of a float32
    assert bf16.float_max == struct.unpack("<f", struct.pack("<I", 0x7F7F0000))[0]
    assert not datatypes.numpy_native("BF16") and datatypes.numpy_native("FP16")
    assert (raw.triton, raw.batchable, raw.itemsize) == ("TYPE_STRING", False, 0)
    assert "BYTES" not in datatypes.TENSOR_DATATYPES
    with pytest.raises(datatypes.DatatypeError, match="no numpy dtype"):
        datatypes.numpy_dtype("BYTES")
    with pytest.raises(datatypes.DatatypeError, match="unknown datatype 'FP8'"):
        datatypes.get("FP8")


def test_engine_tables_are_views_of_the_table():
    assert set(_INT_RANGES) == {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"}
    assert _INT_RANGES["INT8"] == (-128, 127) and _INT_RANGES["UINT64"] == (0, 2**64 - 1)
    assert _FLOAT_LIMITS == {"FP16": 65504.0, "BF16": 3.3895313892515355e38, "FP32": 3.4028234663852886e38}
    assert [d for d in datatypes.TENSOR_DATATYPES if oip.supported_datatype(d)] == list(datatypes.TENSOR_DATATYPES)
    assert not oip.supported_datatype("BYTES")


def _bf16_pipeline():
    package = ModelPackage(
        path=Path("."), name="b", version="1", platform="none", model_file="",
        inputs=[TensorSpec("x", "BF16", (-1, 3))], outputs=[TensorSpec("y", "BF16", (-1, 3))], max_batch_size=4,
    )
    holder = {}

    def echo(executor: int, rows: int) -> None:
        np.frombuffer(holder["out"][0], np.uint8)[: rows * 6] = np.frombuffer(holder["in"][0], np.uint8)[: rows * 6]

    batcher = _core.Batcher("b", 4, [], 0, 1, 1, 0, True, 0, 0, [("BF16", [3])], [("BF16", [3])], 1, True, echo)
    holder["in"], holder["out"] = batcher.input_buffers(0), batcher.output_buffers(0)
    return oip.InferDecoder(package), oip.ResponseEncoder(package), batcher


def _infer(decoder, encoder, batcher, body: bytes, header_length: int | None = None):
    decoded = decoder.decode(body, header_length)
    assert batcher.submit(1, decoded.data, decoded.rows, decoded.priority, decoded.timeout_us) == int(_core.Status.OK)
    batcher.run_ready()
    ((_, status, payload),) = batcher.drain()
    assert status == int(_core.Status.OK)
    return encoder.encode(decoded, payload)


def test_bf16_json_round_trip_through_codecs_and_batcher():
    decoder, encoder, batcher = _bf16_pipeline()
    # values a bfloat16 holds exactly come back unchanged; 1 + 2**-9 rounds to 1
    values = [[1.0, -2.5, 3.3895313892515355e38], [0.0078125, 1.001953125, -0.0]]
    body = msgspec.json.encode({"inputs": [{"name": "x", "shape": [2, 3], "datatype": "BF16", "data": values}]})
    out, header_length = _infer(decoder, encoder, batcher, body)
    assert header_length is None
    (output,) = msgspec.json.decode(out)["outputs"]
    assert (output["datatype"], output["shape"]) == ("BF16", [2, 3])
    assert output["data"] == [1.0, -2.5, 3.3895313892515355e38, 0.0078125, 1.0, -0.0]


def test_bf16_binary_round_trip_through_codecs_and_batcher():
    decoder, encoder, batcher = _bf16_pipeline()
    raw = np.array([0x3F80, 0xC020, 0x7F7F, 0x0001, 0xFF80, 0x7FC1], np.uint16).tobytes()
    header = msgspec.json.encode({
        "inputs": [{"name": "x", "shape": [2, 3], "datatype": "BF16", "parameters": {"binary_data_size": 12}}],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
    })
    out, header_length = _infer(decoder, encoder, batcher, header + raw, len(header))
    assert out[header_length:] == raw  # opaque 2-byte elements: NaN payloads survive too


def test_onnx_names_are_the_ones_onnxruntime_reports():
    """Each datatype's `onnx` name is the type onnxruntime gives a graph input of it."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import helper

    for d in datatypes.TABLE:
        element = helper.np_dtype_to_tensor_dtype(np.dtype(object if d.name == "BYTES" else datatypes.numpy_dtype(d.name)))
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                                  [helper.make_tensor_value_info("x", element, ["n"])],
                                  [helper.make_tensor_value_info("y", element, ["n"])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        reported = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).get_inputs()[0].type
        assert (d.onnx, datatypes.from_onnx(reported)) == (reported, d.name)
    assert datatypes.from_onnx("tensor(complex64)") is None
