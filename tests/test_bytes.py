"""BYTES (string) tensors end to end for Python models: OIP JSON strings and Triton's binary
encoding (a 4-byte little-endian length before each element), in and out, through the
batcher (each element carried as a handle); malformed encodings refused with a 400 naming
the input; no string outlives its request, whatever the outcome."""
from __future__ import annotations

import asyncio
import json
import struct
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import ServerProcess
from vivace.engine import Scorer
from vivace.engine.config import ServerConfig
from vivace.engine.runtime import ModelRunner
from vivace.engine.server import App
from vivace.engine.strings import STRINGS
from vivace.registry.package import PackageError, load_package, write_package
from vivace.registry.packaging import package_python_model

MODULE = '''
import numpy as np


class Text:
    """text BYTES [-1, 2], weight FP32 [-1, 1] -> reversed BYTES [-1, 2] (bytewise), length INT64 [-1, 2],
    upper BYTES [-1, 2] (UTF-8 text, upper case), weighted FP32 [-1, 1]. A text "raise" raises."""

    def predict(self, batch):
        text = batch["text"]
        if any(v == b"raise" for v in text.ravel()):
            raise ValueError("asked to raise")
        return {
            "reversed": np.vectorize(lambda b: b[::-1], otypes=[object])(text),
            "length": np.vectorize(len, otypes=[np.int64])(text),
            "upper": np.vectorize(lambda b: b.decode(errors="replace").upper(), otypes=[object])(text),
            "weighted": batch["weight"] * 2,
        }
'''


def pack(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def unpack(data: bytes) -> list[bytes]:
    out, offset = [], 0
    while offset < len(data):
        (n,) = struct.unpack_from("<I", data, offset)
        out.append(data[offset + 4:offset + 4 + n])
        offset += 4 + n
    return out


def json_body(texts: list[list[str]], weights: list[float]) -> bytes:
    return json.dumps({"inputs": [
        {"name": "text", "shape": [len(texts), 2], "datatype": "BYTES", "data": texts},
        {"name": "weight", "shape": [len(weights), 1], "datatype": "FP32", "data": weights}]}).encode()


def binary_body(texts: list[bytes], weights: list[float], text_size: int | None = None) -> tuple[bytes, int]:
    text = pack(texts)
    weight = struct.pack(f"<{len(weights)}f", *weights)
    header = json.dumps({
        "inputs": [{"name": "text", "shape": [len(weights), 2], "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(text) if text_size is None else text_size}},
                   {"name": "weight", "shape": [len(weights), 1], "datatype": "FP32",
                    "parameters": {"binary_data_size": len(weight)}}],
        "outputs": [{"name": "reversed", "parameters": {"binary_data": True}}, {"name": "length"}]}).encode()
    return header + text + weight, len(header)


def post(server, body: bytes, header_length: int | None = None) -> tuple[int, bytes, int | None]:
    headers = {} if header_length is None else {"Inference-Header-Content-Length": str(header_length)}
    request = urllib.request.Request(f"{server.url}/v2/models/text/infer", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            length = response.headers.get("Inference-Header-Content-Length")
            return response.status, response.read(), None if length is None else int(length)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), None


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    src = tmp_path_factory.mktemp("src") / "text.py"
    src.write_text(MODULE)
    return package_python_model(f"{src}:Text", tmp_path_factory.mktemp("pkg") / "text", name="text",
                                inputs=["text:BYTES:2", "weight:FP32:1"]).path


@pytest.fixture(scope="module")
def server(package):
    srv = ServerProcess([package])
    yield srv
    assert srv.stop() == 0


def test_the_signature_declares_strings_and_triton_sees_type_string(package, server):
    pkg = load_package(package)
    assert [(s.name, s.datatype, list(s.shape)) for s in pkg.outputs] == [
        ("reversed", "BYTES", [-1, 2]), ("length", "INT64", [-1, 2]), ("upper", "BYTES", [-1, 2]),
        ("weighted", "FP32", [-1, 1])]
    with urllib.request.urlopen(f"{server.url}/v2/models/text/config", timeout=10) as response:
        config = json.loads(response.read())
    assert config["input"][0] == {"name": "text", "data_type": "TYPE_STRING", "dims": [2]}
    with urllib.request.urlopen(f"{server.url}/v2/openapi.json", timeout=10) as response:
        document = json.loads(response.read())
    request = document["paths"]["/v2/models/text/infer"]["post"]["requestBody"]["content"]["application/json"]
    example = request["examples"]["one_row"]["value"]["inputs"][0]
    assert example == {"name": "text", "shape": [1, 2], "datatype": "BYTES", "data": ["", ""]}
    schema = json.dumps(document["components"]["schemas"]["InferRequest.text"])
    assert '"datatype": {"const": "BYTES"}' in schema and '"items": {"type": "string"}' in schema


def test_json_strings_in_and_out(server):
    texts = [["héllo", ""], ["naïve café", "x" * 1000]]
    status, body, _ = post(server, json_body(texts, [0.5, 1.0]))
    assert status == 200, body
    outputs = {o["name"]: o for o in json.loads(body)["outputs"]}
    assert outputs["upper"] == {"name": "upper", "datatype": "BYTES", "shape": [2, 2],
                                "data": ["HÉLLO", "", "NAÏVE CAFÉ", "X" * 1000]}
    assert outputs["length"]["data"] == [len("héllo".encode()), 0, len("naïve café".encode()), 1000]
    assert outputs["weighted"]["data"] == [1.0, 2.0]
    flat = json.dumps({"inputs": [  # flat data, as well as one list per row
        {"name": "text", "shape": [1, 2], "datatype": "BYTES", "data": ["a", "b"]},
        {"name": "weight", "shape": [1, 1], "datatype": "FP32", "data": [1]}]}).encode()
    status, body, _ = post(server, flat)
    assert status == 200 and json.loads(body)["outputs"][0]["data"] == ["a", "b"]


def test_binary_strings_in_and_out_keep_every_byte(server):
    texts = [b"\x00\xffabc\x00", b"", b"\xe2\x82\xac", b"z" * 70000]  # NULs, invalid UTF-8, a long one
    body, header_length = binary_body(texts, [1.0, 2.0])
    status, answer, length = post(server, body, header_length)
    assert status == 200, answer
    header = json.loads(answer[:length])
    by_name = {o["name"]: o for o in header["outputs"]}
    assert set(by_name) == {"reversed", "length"}  # the outputs asked for
    size = by_name["reversed"]["parameters"]["binary_data_size"]
    assert unpack(answer[length:length + size]) == [t[::-1] for t in texts]
    assert by_name["length"]["data"] == [len(t) for t in texts]


@pytest.mark.parametrize("make, message", [
    (lambda: binary_body([b"a", b"b", b"c", b"d"], [1.0, 2.0], text_size=30), "binary data truncated"),
    (lambda: (lambda b, n: (b[:n] + b[n:n + 8] + struct.pack("<I", 99) + b[n + 12:], n))(
        *binary_body([b"abcd", b"b", b"c", b"d"], [1.0, 2.0])), "element 1 of 4: declares 99 bytes"),
    (lambda: binary_body([b"a", b"b", b"c"], [1.0, 2.0]), "element 3 of 4: its 4-byte length is cut off"),
    (lambda: binary_body([b"a", b"b", b"c", b"d", b"e"], [1.0, 2.0]), "follow the 4 elements"),
    (lambda: (json_body([["a", 1], ["b", "c"]], [1.0, 2.0]), None), "its elements must be strings, got int"),
    (lambda: (json_body([["a", "b"], ["c"]], [1.0, 2.0]), None), "has 3 elements, its shape [2, 2] needs 4"),
    (lambda: (json_body([["a", None], ["b", "c"]], [1.0, 2.0]), None), "got NoneType"),
    (lambda: (json_body([["a", "b"]], [1.0]).replace(b'"BYTES"', b'"FP32"'), None),
     "has datatype FP32, model expects BYTES"),
])
def test_malformed_strings_are_refused_with_a_400_naming_the_input(server, make, message):
    body, header_length = make()
    status, answer, _ = post(server, body, header_length)
    assert status == 400 and message in json.loads(answer)["error"], answer
    assert post(server, json_body([["ok", "ok"]], [1.0]))[0] == 200


def test_no_string_outlives_its_request_whatever_the_outcome(package):
    """In process (App.infer, the same batcher and codecs): after answers, refusals, a failing
    predict and a timeout in the queue, the store holds no string."""
    async def main():
        runner = ModelRunner(load_package(package))
        app = App([runner], ServerConfig())
        runner.attach(asyncio.get_running_loop())
        try:
            assert len(STRINGS) == 0
            ok = await app.infer("text", json_body([["a", "b"], ["c", "d"]], [1.0, 2.0]))
            failed = await app.infer("text", json_body([["raise", "b"]], [1.0]))
            refused = await app.infer("text", json_body([["a", 1]], [1.0]))
            body, length = binary_body([b"x", b"y"], [3.0])
            binary = await app.infer("text", body, header_length=length)
            many = await asyncio.gather(*(app.infer("text", json_body([[f"s{i}", "t"]], [float(i)])) for i in range(50)))
            return ok, failed, refused, binary, many, len(STRINGS)
        finally:
            runner.close(drain=False)

    ok, failed, refused, binary, many, left = asyncio.run(main())
    assert (ok.status, failed.status, refused.status, binary.status) == (200, 500, 400, 200)
    assert b"predict raised ValueError: asked to raise" in failed.body
    assert all(m.status == 200 for m in many)
    assert left == 0


def test_scorer_takes_string_arrays(package):
    scored = Scorer(package).predict({"text": np.array([["ab", "ç"]]), "weight": np.ones((1, 1), np.float32)})
    assert scored["reversed"].tolist() == [[b"ba", "ç".encode()[::-1]]]
    assert scored["length"].tolist() == [[2, 2]]


def test_only_python_models_may_declare_strings(tmp_path):
    manifest = {"name": "m", "platform": "onnxruntime", "model_file": "model.onnx",
                "inputs": [{"name": "t", "datatype": "BYTES", "shape": [-1, 1]}],
                "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}]}
    with pytest.raises(PackageError, match=r"tensor 't' is BYTES: only python models"):
        write_package(tmp_path / "m", manifest, {"model.onnx": b"x"})
    src = tmp_path / "m.py"
    src.write_text("class M:\n    def predict(self, b):\n        return b\n")
    with pytest.raises(PackageError, match="one numeric input"):
        package_python_model(f"{src}:M", tmp_path / "p", name="p", inputs=["t:BYTES:2"],
                             profile=tmp_path / "profile.json")
