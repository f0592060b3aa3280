"""Writes the committed seed corpus: tests/fuzz/corpus/<target>/<seed name>.

    python tests/fuzz/seeds.py

Seeds are small, valid or nearly valid inputs of each target's input layout (see
targets.py and csrc/fuzz/*.cpp), from which the fuzzers mutate. Rerun after changing a
layout; the files are committed so a fuzzing run needs nothing but the repository.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "corpus"


def _json(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _decoder_input(rows: int, *, binary: list[str] = (), **extra) -> dict:
    """An infer request for targets.OipDecoderTarget's signature (x FP32[3], k INT64[1], h FP16[2])."""
    tensors = {"x": ("FP32", 3, 4), "k": ("INT64", 1, 8), "h": ("FP16", 2, 2)}
    inputs = []
    for name, (datatype, width, size) in tensors.items():
        entry = {"name": name, "shape": [rows, width], "datatype": datatype}
        if name in binary:
            entry["parameters"] = {"binary_data_size": rows * width * size}
        else:
            entry["data"] = [float(i) / 4 if datatype != "INT64" else i for i in range(rows * width)]
        inputs.append(entry)
    return {"inputs": inputs, **extra}


def decoder_seeds() -> dict[str, bytes]:
    plain = b"\x00"  # layout byte: no Inference-Header-Content-Length

    def binary(doc: dict, payload: bytes) -> bytes:
        header = _json(doc)
        return b"\x01" + struct.pack("<i", len(header)) + header + payload

    seeds = {
        "json_one_row": plain + _json(_decoder_input(1)),
        "json_rows_id_params": plain + _json(_decoder_input(3, id="r-1", parameters={"priority": 1, "timeout": 5000})),
        "json_outputs_binary": plain + _json(_decoder_input(2, outputs=[
            {"name": "y", "parameters": {"binary_data": True}}, {"name": "w"}])),
        "json_request_binary_output": plain + _json(_decoder_input(2, parameters={"binary_data_output": True})),
        "json_nested_data": plain + _json({"inputs": [
            {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [[1, 2, 3], [4, 5, 6]]},
            {"name": "k", "shape": [2, 1], "datatype": "INT64", "data": [[7], [8]]},
            {"name": "h", "shape": [2, 2], "datatype": "FP16", "data": [[0.5, 1], [2, 3]]}]}),
        "binary_all": binary(_decoder_input(2, binary=["x", "k", "h"]), bytes(range(2 * (12 + 8 + 4)))),
        "binary_mixed": binary(_decoder_input(1, binary=["k"]), struct.pack("<q", -5)),
        "binary_truncated": binary(_decoder_input(2, binary=["x"]), b"\x00" * 7),
        "bad_shape": plain + _json({"inputs": [{"name": "x", "shape": [0, 3], "datatype": "FP32", "data": []}]}),
        "bad_json": plain + b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,',
        "unknown_output": plain + _json(_decoder_input(1, outputs=[{"name": "nope"}])),
    }
    return seeds


def native_json_seeds() -> dict[str, bytes]:
    """Bodies for targets.NativeJsonTarget (x FP32[3], k INT64[1], b BOOL[2])."""

    def body(rows: int, nested: bool = False, **extra) -> bytes:
        x = [[0.5 * r + c for c in range(3)] for r in range(rows)]
        k = [[r - 2] for r in range(rows)]
        b = [[r % 2 == 0, True] for r in range(rows)]
        flat = (lambda v: v) if nested else (lambda v: [e for row in v for e in row])
        return _json({**extra, "inputs": [
            {"name": "x", "shape": [rows, 3], "datatype": "FP32", "data": flat(x)},
            {"name": "k", "shape": [rows, 1], "datatype": "INT64", "data": flat(k)},
            {"name": "b", "shape": [rows, 2], "datatype": "BOOL", "data": flat(b)}]})

    return {
        "one_row": body(1),
        "rows_nested_id": body(4, nested=True, id="abc"),
        "empty_id": body(2, id=""),
        "spaced": b'{ "inputs" : [ {"name":"k","shape":[1,1],"datatype":"INT64","data":[ -9223372036854775808 ]},\n'
                  b'{"datatype":"BOOL","name":"b","shape":[1,2],"data":[false,true]},'
                  b'{"name":"x","data":[1e3,-0.0,3.5E-2],"shape":[1,3],"datatype":"FP32"} ] }',
        "with_parameters": body(1, parameters={"priority": 1}),
        "big_numbers": body(1).replace(b"0.0", b"1e39").replace(b"-2", b"9223372036854775807"),
    }


def http_seeds() -> dict[str, bytes]:
    """Connections for targets.HttpTarget (byte 0: read size, 0 = all at once)."""
    row = [round(0.01 * i, 2) for i in range(32)]

    def infer(rows: int = 1, id: str | None = None, close: bool = False, **extra) -> bytes:
        doc = {"inputs": [{"name": "input__0", "shape": [rows, 32], "datatype": "FP32", "data": row * rows}], **extra}
        if id is not None:
            doc["id"] = id
        body = _json(doc)
        return (b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"%sContent-Length: %d\r\n\r\n%s" % (b"Connection: close\r\n" if close else b"", len(body), body))

    def binary_infer(rows: int = 2) -> bytes:
        header = _json({"inputs": [{"name": "input__0", "shape": [rows, 32], "datatype": "FP32",
                                    "parameters": {"binary_data_size": rows * 128}}],
                        "outputs": [{"name": "output__0", "parameters": {"binary_data": True}}]})
        body = header + bytes(rows * 128)
        return (b"POST /v2/models/mlp/versions/1/infer HTTP/1.1\r\nInference-Header-Content-Length: %d\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(header), len(body), body))

    def get(path: bytes) -> bytes:
        return b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path

    chunked_body = _json({"inputs": [{"name": "input__0", "shape": [1, 32], "datatype": "FP32", "data": row}]})
    return {
        "health": b"\x00" + get(b"/v2/health/live"),
        "metadata_routes": b"\x00" + get(b"/v2") + get(b"/v2/models/mlp") + get(b"/v2/models/mlp/config")
                           + get(b"/v2/models/mlp/versions/1/ready") + get(b"/v2/models/stats"),
        "infer_json": b"\x00" + infer(2, id="a"),
        "infer_binary": b"\x00" + binary_infer(),
        "pipelined_mixed": b"\x00" + infer(1, id="first") + get(b"/v2/health/live") + infer(3, id="second")
                           + get(b"/nope") + infer(1, id="third", parameters={"binary_data_output": True}),
        "split_reads": b"\x07" + infer(1, id="s") + get(b"/v2/health/live"),
        "chunked": b"\x00POST /v2/models/mlp/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunked_body), chunked_body),
        "expect_continue": b"\x00" + infer(1).replace(b"Host: x\r\n", b"Expect: 100-continue\r\n"),
        "connection_close": b"\x00" + infer(1, id="c", close=True) + get(b"/v2/health/live"),
        "bad_requests": b"\x00" + get(b"/v2/models/mlp/infer") + b"POST /v2/models/nope/infer HTTP/1.1\r\n"
                        b"Content-Length: 2\r\n\r\n{}" + infer(1).replace(b'"FP32"', b'"INT8"'),
        "malformed": b"\x00GET /v2/health/live HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        "http10_keepalive": b"\x00GET /v2/health/ready HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" + get(b"/metrics"),
        "many_headers": b"\x00GET /v2/health/live HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(30)) + b"\r\n",
        "body_over_limit": b"\x00POST /v2/models/mlp/infer HTTP/1.1\r\nContent-Length: 70000\r\n\r\n{",
        "bad_header_length": b"\x00" + binary_infer().replace(b"Inference-Header-Content-Length: ",
                                                              b"Inference-Header-Content-Length: -"),
    }


def oip_json_seeds() -> dict[str, bytes]:
    """C++ fast path seeds (csrc/fuzz/fuzz_oip_json.cpp): 2 signature bytes + body."""
    def sig(x_type: int, width: int, y_type: int | None = None) -> bytes:
        return bytes([x_type + 5 * (width - 1), 0 if y_type is None else 1 | (y_type << 1)])

    names = ["BOOL", "INT32", "INT64", "FP32", "FP64"]
    values = {"BOOL": ["true", "false"], "INT32": ["-2147483648", "7"], "INT64": ["9223372036854775807", "-1"],
              "FP32": ["3.5e-2", "-0.0"], "FP64": ["1e308", "2.5"]}
    seeds = {}
    for t, name in enumerate(names):
        data = ",".join(values[name])
        seeds[f"{name.lower()}_flat"] = sig(t, 2) + (
            '{"inputs":[{"name":"x","shape":[1,2],"datatype":"%s","data":[%s]}],"id":"q"}' % (name, data)).encode()
    seeds["nested_two_inputs"] = sig(3, 1, 2) + (
        b'{"inputs":[{"name":"y","datatype":"INT64","shape":[2,2],"data":[[1,2],[3,4]]},'
        b' {"name":"x","shape":[2,1],"datatype":"FP32","data":[[1.5],[2]]}]}')
    seeds["bad_nesting"] = sig(3, 1) + b'{"inputs":[{"name":"x","shape":[2,1],"datatype":"FP32","data":[[1],,[2]]]}]}'
    return seeds


def http_parse_seeds() -> dict[str, bytes]:
    """Request framing seeds (csrc/fuzz/fuzz_http_parse.cpp): a limits byte (bit 0: small
    limits), then the bytes a client sent: heads, absolute-form targets, chunked bodies."""
    body = b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}]}'
    return {
        "content_length": b"\x00POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                          % (len(body), body),
        "absolute_form": b"\x00POST http://127.0.0.1:8000/v2/models/m/infer HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        "leading_crlf_http10": b"\x00\r\n\r\nGET /v2/health/live HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        "chunked_ext_trailer": b"\x00POST /x HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                               b"5;name=v\r\nhello\r\n1 \t;x\r\n!\r\n0\r\nChecksum: 1\r\n\r\n",
        "small_limits": b"\x01POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nA: 1\r\nB: 2\r\n\r\n40\r\n"
                        + b"a" * 64 + b"\r\n1\r\nb\r\n0\r\n\r\n",
        "smuggling": b"\x00POST /x HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "bare_lf": b"\x00GET / HTTP/1.1\nHost: x\r\n\r\n",
    }


def sketch_seeds() -> dict[str, bytes]:
    """Drift sketch seeds (csrc/fuzz/fuzz_sketch.cpp): window byte, features byte, rows."""
    floats = struct.pack("<8f", 0.5, -3.0, float("nan"), float("inf"), 2.0, 1e30, -0.0, 3.0)
    doubles = struct.pack("<6d", 1.0, float("-inf"), 4.0, 2.5, float("nan"), 1e300)
    stamp = struct.pack("<q", 10)
    return {
        "rows_numeric": bytes([0x21, (4 << 3) | 0]) + floats,
        "rows_two_features_doubles": bytes([0x13, (3 << 3) | 4 | 1]) + doubles,
        "time_window": bytes([0x35, (5 << 3) | 1]) + stamp + floats + struct.pack("<q", 100) + floats,
        "categories": bytes([0x02, (3 << 3) | 3]) + floats * 2,
    }


def featcache_seeds() -> dict[str, bytes]:
    """Entity ids for targets.FeatcacheTarget: 9-byte chunks (stored key + delta, or raw int64)."""
    def stored(index: int, delta: int = 0) -> bytes:
        return bytes([index, 128 + delta]) + bytes(7)

    def raw(key: int) -> bytes:
        return b"\xff" + struct.pack("<q", key)

    return {
        "all_stored": b"".join(stored(i) for i in range(13)),
        "neighbours": b"".join(stored(i, d) for i in range(13) for d in (-1, 1)),
        "raw_extremes": raw(-(1 << 63)) + raw((1 << 63) - 1) + raw(0) + raw(12345),
        "repeated": stored(4) * 20 + raw(4),
    }


SEEDS = {"oip_decoder": decoder_seeds, "native_json": native_json_seeds, "http": http_seeds,
         "featcache": featcache_seeds,
         "oip_json": oip_json_seeds, "sketch": sketch_seeds, "http_parse": http_parse_seeds}


def main() -> None:
    for target, make in SEEDS.items():
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in make().items():
            (folder / name).write_bytes(data)
        print(f"{target}: {len(list(folder.iterdir()))} seeds in {folder}")


if __name__ == "__main__":
    main()
