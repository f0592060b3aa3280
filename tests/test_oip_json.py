"""The native JSON fast path accepts exactly what it can answer identically to the general
path, and declines everything else (which the general path then answers or refuses).

A request the fast path takes must give the same numbers as msgspec-decoded data through
the general path; a body the general path refuses must never be taken by the fast path.
"""
from __future__ import annotations

import json
import random

import msgspec
import numpy as np
import pytest

from vivace import _core

S = _core.Status
DECLINED = 100


def make_batcher(datatype="FP32", width=3, out_datatype="FP32", max_queue_size=0):
    holder = {}

    def execute(executor, rows):
        dtype = {"FP32": np.float32, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_}
        x = np.frombuffer(holder["in"], dtype[datatype]).reshape(-1, width)[:rows]
        out = np.frombuffer(holder["out"], dtype[out_datatype]).reshape(-1, 1)
        out[:rows, 0] = x.astype(np.float64).sum(axis=1)

    b = _core.Batcher("m", 16, [], 0, 1, 1, 0, True, max_queue_size, 0, [(datatype, [width])], [(out_datatype, [1])], 1,
                      True, execute)
    holder["in"] = b.input_buffers(0)[0]
    holder["out"] = b.output_buffers(0)[0]
    assert b.enable_json("m", "1", [("x", datatype, [width])], [("y", out_datatype, [1])])
    return b


def run(b, token, body: bytes):
    status = b.submit_json(token, body)
    if status != int(S.OK):
        return status, None
    b.run_ready()
    ((t, s, payload),) = b.drain()
    assert t == token and s == int(S.OK)
    return status, json.loads(payload)


def general(body: bytes, width=3):
    """What the general path computes for the same body (None when it refuses)."""
    try:
        obj = msgspec.json.decode(body)
        data = np.asarray(obj["inputs"][0]["data"], dtype=np.float64).reshape(-1, width)
    except Exception:  # noqa: BLE001 - any refusal
        return None
    return data.astype(np.float32).astype(np.float64).sum(axis=1)


def body_of(rows, width=3, id=None, nested=False, data=None):
    values = data if data is not None else [[round(0.5 * (r + c), 3) for c in range(width)] for r in range(rows)]
    doc = {"inputs": [{"name": "x", "shape": [rows, width], "datatype": "FP32",
                       "data": values if nested else [v for row in values for v in row]}]}
    if id is not None:
        doc["id"] = id
    return json.dumps(doc).encode()


def test_fast_path_answers_like_the_general_path():
    b = make_batcher()
    for token, (rows, nested, id) in enumerate([(1, False, None), (5, True, "abc"), (16, False, ""), (40, True, "r-9")], 1):
        body = body_of(rows, nested=nested, id=id)
        status, result = run(b, token, body)
        assert status == int(S.OK)
        assert result["model_name"] == "m" and result["model_version"] == "1"
        out = result["outputs"][0]
        assert out["name"] == "y" and out["datatype"] == "FP32" and out["shape"] == [rows, 1]
        np.testing.assert_allclose(out["data"], general(body), rtol=1e-6)
        if id is None:
            assert "id" not in result
        else:
            assert result["id"] == id


@pytest.mark.parametrize(
    "body",
    [
        b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,3]}],"parameters":{"priority":1}}',
        b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,3]}],"outputs":[{"name":"y"}]}',
        b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,3],"parameters":{}}]}',
        b'{"id":"a\\"b","inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,3]}]}',
        b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,3,4]}]}',
        b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2]}]}',
        b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,]}]}',
        b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[[1,2][3]]}]}',
        b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[01,2,3]}]}',
        b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1.,2,3]}]}',
        b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[inf,2,3]}]}',
        b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[NaN,2,3]}]}',
        b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":["1",2,3]}]}',
        b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP64","data":[1,2,3]}]}',
        b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}',
        b'{"inputs":[{"name":"z","shape":[1,3],"datatype":"FP32","data":[1,2,3]}]}',
        b'{"inputs":[{"name":"x","shape":[0,3],"datatype":"FP32","data":[]}]}',
        b'{"inputs":[]}',
        b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,3]}]} trailing',
        b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,3]}]',
        b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,3]},]}',
        b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,3]}],"inputs":[]}',
        b'{"inputs":[{"name":"x","name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,3]}]}',
        b"",
        b"[]",
        b"\xff\xfe",
    ],
)
def test_fast_path_declines_what_it_cannot_answer_identically(body):
    b = make_batcher()
    assert b.submit_json(1, body) == DECLINED
    assert b.queued_requests == 0


@pytest.mark.parametrize(
    "datatype,data,expected",
    [
        ("INT32", [1, -2, 3], 2.0),
        ("INT64", [2**40, 1, -1], float(2**40)),
        ("FP64", [1e300, -1e300, 0.5], 0.5),
        ("BOOL", [True, False, True], 2.0),
    ],
)
def test_other_datatypes(datatype, data, expected):
    b = make_batcher(datatype=datatype, out_datatype="FP64")
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": datatype, "data": data}]}).encode()
    status, result = run(b, 1, body)
    assert status == int(S.OK)
    assert result["outputs"][0]["data"] == [expected]


def test_a_full_queue_refuses_before_decoding_the_body():
    # Under overload a refusal must cost no parsing: a body that would be declined (sent to
    # the general decoder for its 400) is refused like any other while the queue is full.
    b = make_batcher(max_queue_size=1)
    truncated = b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2'
    assert b.submit_json(1, b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,3]}]}') == int(S.OK)
    assert b.submit_json(2, truncated) == int(S.QUEUE_FULL)
    b.run_ready()
    ((token, status, payload),) = b.drain()
    assert (token, status) == (1, int(S.OK)) and json.loads(payload)["outputs"][0]["data"] == [6.0]
    assert b.submit_json(3, truncated) == DECLINED  # room again: decoded, and declined


def test_integer_overflow_declines():
    b = make_batcher(datatype="INT32")
    body = b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"INT32","data":[1,2,3000000000]}]}'
    assert b.submit_json(1, body) == DECLINED


def test_non_finite_outputs_are_null():
    b = make_batcher()
    body = b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[3e38,3e38,3e38]}]}'
    status, result = run(b, 1, body)
    assert result["outputs"][0]["data"] == [None]  # +inf in FP32


def test_unsupported_datatypes_disable_the_fast_path():
    b = _core.Batcher("m", 4, [], 0, 1, 1, 0, True, 0, 0, [("FP16", [2])], [("FP32", [1])], 1, True, lambda e, n: None)
    assert not b.enable_json("m", "1", [("x", "FP16", [2])], [("y", "FP32", [1])])
    assert b.submit_json(1, b'{"inputs":[]}') == DECLINED


def test_random_mutations_never_crash_and_never_disagree():
    b = make_batcher()
    rng = random.Random(0)
    base = body_of(3, id="m")
    alphabet = b'{}[],:"0123456789.-eE+ \ntruefalsnul\\x'
    token = 0
    for _ in range(3000):
        body = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            pos = rng.randrange(len(body) + 1)
            if op < 0.4 and body:
                del body[min(pos, len(body) - 1)]
            elif op < 0.8:
                body.insert(pos, rng.choice(alphabet))
            elif body:
                body[min(pos, len(body) - 1)] = rng.choice(alphabet)
        token += 1
        status = b.submit_json(token, bytes(body))
        if status == DECLINED:
            continue
        assert status == int(S.OK)
        b.run_ready()
        ((_, s, payload),) = b.drain()
        expected = general(bytes(body))
        assert expected is not None, f"fast path took a body the general path refuses: {bytes(body)!r}"
        np.testing.assert_allclose(json.loads(payload)["outputs"][0]["data"], expected, rtol=1e-6)
