"""Python fuzz targets: what each feeds to Vivace and what counts as a finding.

Each target is a class with `setup()` (build the real objects once) and `check(data)`,
which raises (any exception, usually AssertionError) when `data` exposes a bug. They are
driven by atheris from fuzz_target.py, and replayed by tests/test_fuzz.py.

- oip_decoder: an infer body (JSON, or JSON header + binary tensors) through
  engine.oip.InferDecoder, the batcher's `submit` and ResponseEncoder, as the server runs
  them. Allowed refusals: ProtocolError from the decoder, ValueError/TypeError from
  submit (the server answers both with 400).
- native_json: the C++ JSON fast path (`Batcher.submit_json`) against the general path.
  The fast path may decline anything, but what it accepts must be accepted by the
  general path and answered with the same response.
- featcache: entity ids (int64 keys from the request) through the native LMDB online store
  lookup (`_core.FeatureLookup`, via FeatureStore.get_online_features) of a real
  materialized store. Finding: a wrong found flag or value, or any exception.
- http: raw bytes of one connection, fed in chunks to engine.http.HttpProtocol of a real
  App serving the reference torch model through a fake transport. Findings: an exception
  escaping data_received, a request never answered, a response that is not well-formed
  HTTP/1.1 with a JSON error body, an "internal error" 500, responses out of order.

Past findings are regression tests in tests/test_fuzz.py; their inputs are replayed from
tests/fuzz/regressions/.
"""
from __future__ import annotations

import asyncio
import logging
import tempfile
from pathlib import Path
from typing import Any

import httptools
import msgspec
import numpy as np

from vivace import _core
from vivace.engine import oip
from vivace.registry.package import NUMPY_DTYPES, ModelPackage, TensorSpec

STATUS_OK = int(_core.Status.OK)
STATUS_INVALID = int(_core.Status.INVALID)
JSON_DECLINED = 100



def package_of(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> ModelPackage:
    """A signature-only package: the codecs and the batcher need nothing else."""
    return ModelPackage(path=Path("."), name=name, version="1", platform="none", model_file="",
                        inputs=inputs, outputs=outputs, max_batch_size=64)


def make_batcher(package: ModelPackage, execute) -> Any:
    """An inline `_core.Batcher` for the package's signature, as ModelRunner builds one."""
    return _core.Batcher(
        model_name=package.name, max_batch_size=package.max_batch_size, preferred_batch_sizes=[],
        max_queue_delay_us=0, priority_levels=1, default_priority=1, default_timeout_us=0,
        allow_timeout_override=True, max_queue_size=0, shed_queue_wait_us=0,
        inputs=[(s.datatype, list(s.row_shape)) for s in package.inputs],
        outputs=[(s.datatype, list(s.row_shape)) for s in package.outputs],
        executors=1, inline_execution=True, execute=execute,
    )


def run_one(batcher: Any, token: int) -> tuple[int, Any]:
    """Run what is queued and return the (status, payload) of `token`, the only request."""
    batcher.run_ready()
    done = batcher.drain()
    assert [t for t, _, _ in done] == [token], f"expected one answer for token {token}, got {done}"
    return done[0][1], done[0][2]


def check_response_body(body: bytes, header_length: int | None, rows: int, package: ModelPackage) -> dict:
    """An infer response body is valid JSON (plus binary parts adding up) for `rows` rows."""
    header = msgspec.json.decode(body if header_length is None else body[:header_length])
    binary = 0
    for out in header["outputs"]:
        assert out["shape"][0] == rows, f"output {out['name']} has shape {out['shape']} for {rows} rows"
        if "data" not in out:
            binary += out["parameters"]["binary_data_size"]
    assert binary == (0 if header_length is None else len(body) - header_length), "binary parts do not add up"
    assert header["model_name"] == package.name
    return header


class OipDecoderTarget:
    """InferDecoder → Batcher.submit → ResponseEncoder, as App._infer runs them.

    Input: byte 0 bit 0 set → bytes 1-4 are a signed little-endian
    Inference-Header-Content-Length and the rest is the body; clear → the rest is a JSON body.
    """

    package = package_of(
        "fuzz",
        [TensorSpec("x", "FP32", (-1, 3)), TensorSpec("k", "INT64", (-1, 1)), TensorSpec("h", "FP16", (-1, 2))],
        [TensorSpec("y", "FP32", (-1, 1)), TensorSpec("z", "UINT16", (-1, 2)), TensorSpec("w", "FP16", (-1, 1))],
    )

    def setup(self) -> None:
        self.decoder = oip.InferDecoder(self.package)
        self.encoder = oip.ResponseEncoder(self.package)
        self.batcher = make_batcher(self.package, self._execute)
        self.inputs = self.batcher.input_buffers(0)
        self.outputs = self.batcher.output_buffers(0)
        self.token = 0

    def _execute(self, executor: int, rows: int) -> None:
        # Outputs repeat the first input's bytes: every bit pattern (NaN, inf) reaches the encoder.
        source = np.frombuffer(self.inputs[0], np.uint8)[: rows * self.package.inputs[0].row_bytes]
        for spec, buffer in zip(self.package.outputs, self.outputs):
            out = np.frombuffer(buffer, np.uint8)[: rows * spec.row_bytes]
            out[:] = np.resize(source, out.size)

    def check(self, data: bytes) -> None:
        if data[:1] and data[0] & 1:
            header_length: int | None = int.from_bytes(data[1:5], "little", signed=True)
            body = data[5:]
        else:
            header_length, body = None, data[1:]
        try:
            decoded = self.decoder.decode(body, header_length)
        except oip.ProtocolError:
            return
        assert decoded.rows >= 1
        self.token += 1
        try:
            status = self.batcher.submit(self.token, decoded.data, decoded.rows, decoded.priority, decoded.timeout_us)
        except (ValueError, TypeError):
            return  # App._infer answers 400
        if status != STATUS_OK:
            assert status == STATUS_INVALID, f"submit returned status {status}"
            return
        status, payload = run_one(self.batcher, self.token)
        assert status == STATUS_OK, f"batch failed: {payload}"
        body_out, header_out = self.encoder.encode(decoded, payload)
        check_response_body(body_out, header_out, decoded.rows, self.package)


class NativeJsonTarget:
    """The C++ fast path must answer exactly like the general path, or decline."""

    package = package_of(
        "fuzz",
        [TensorSpec("x", "FP32", (-1, 3)), TensorSpec("k", "INT64", (-1, 1)), TensorSpec("b", "BOOL", (-1, 2))],
        [TensorSpec("ox", "FP32", (-1, 3)), TensorSpec("ok", "INT64", (-1, 1)), TensorSpec("ob", "BOOL", (-1, 2))],
    )

    def setup(self) -> None:
        self.decoder = oip.InferDecoder(self.package)
        self.encoder = oip.ResponseEncoder(self.package)
        self.fast = make_batcher(self.package, lambda e, rows: self._echo(self.fast, rows))
        self.general = make_batcher(self.package, lambda e, rows: self._echo(self.general, rows))
        specs = [(s.name, s.datatype, list(s.row_shape)) for s in self.package.inputs]
        outs = [(s.name, s.datatype, list(s.row_shape)) for s in self.package.outputs]
        assert self.fast.enable_json(self.package.name, self.package.version, specs, outs)
        self.token = 0

    def _echo(self, batcher: Any, rows: int) -> None:
        """Outputs mirror the inputs, so the response shows exactly what was parsed."""
        for spec, src, dst in zip(self.package.inputs, batcher.input_buffers(0), batcher.output_buffers(0)):
            n = rows * spec.row_bytes
            np.frombuffer(dst, np.uint8)[:n] = np.frombuffer(src, np.uint8)[:n]

    def check(self, body: bytes) -> None:
        self.token += 1
        status = self.fast.submit_json(self.token, body)
        assert status in (STATUS_OK, JSON_DECLINED), f"submit_json returned status {status}"
        fast = run_one(self.fast, self.token) if status == STATUS_OK else None
        try:
            decoded = self.decoder.decode(body, None)
            general_status = self.general.submit(self.token, decoded.data, decoded.rows)
        except (oip.ProtocolError, ValueError, TypeError) as exc:
            assert fast is None, f"the fast path accepted a body the general path refuses: {exc}"
            return
        general = run_one(self.general, self.token) if general_status == STATUS_OK else None
        if fast is None:
            return
        assert general is not None, f"the general path refused with status {general_status}"
        assert fast[0] == STATUS_OK and general[0] == STATUS_OK
        fast_json = msgspec.json.decode(fast[1])  # must be valid JSON (UTF-8 included)
        body_out, _ = self.encoder.encode(decoded, general[1])
        general_json = msgspec.json.decode(body_out)
        assert same_response(fast_json, general_json), f"fast {fast_json} != general {general_json}"


def same_response(a: dict, b: dict) -> bool:
    """Equal responses, numbers compared at the precision of their datatype."""
    if {k: v for k, v in a.items() if k != "outputs"} != {k: v for k, v in b.items() if k != "outputs"}:
        return False
    if len(a["outputs"]) != len(b["outputs"]):
        return False
    for x, y in zip(a["outputs"], b["outputs"]):
        if {k: v for k, v in x.items() if k != "data"} != {k: v for k, v in y.items() if k != "data"}:
            return False
        dtype = NUMPY_DTYPES[x["datatype"]]
        as_array = [np.asarray([np.nan if v is None else v for v in d], np.float64).astype(dtype)
                    if dtype.startswith("float") else np.asarray(d, dtype) for d in (x["data"], y["data"])]
        if not np.array_equal(*as_array, equal_nan=dtype.startswith("float")):
            return False
    return True


class FakeTransport(asyncio.Transport):
    """Collects what the protocol writes; the harness plays the socket."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        assert not self.closing, "write after close"
        self.written.append(bytes(data))

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(name, default)


class ResponseReader:
    """Splits the bytes written to a connection into HTTP/1.1 responses (httptools/llhttp)."""

    def __init__(self) -> None:
        self.responses: list[dict[str, Any]] = []
        self.parser = httptools.HttpResponseParser(self)
        self.current: dict[str, Any] | None = None

    def on_message_begin(self) -> None:
        self.current = {"headers": {}, "body": b""}

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        self.current["headers"][name.lower()] = value

    def on_body(self, body: bytes) -> None:
        assert self.current is not None
        self.current["body"] += body

    def on_message_complete(self) -> None:
        assert self.current is not None
        self.current["status"] = self.parser.get_status_code()
        self.responses.append(self.current)
        self.current = None


class HttpTarget:
    """One connection's bytes through HttpProtocol of a real App.

    Input: byte 0 picks the read size (0: everything at once, n: n-byte reads, so that
    requests split anywhere); the rest is what the client sends.
    """

    def setup(self) -> None:
        from vivace.registry.reference_model import write_reference_model
        from vivace.engine.config import ServerConfig
        from vivace.engine.runtime import ModelRunner
        from vivace.engine.server import App
        from vivace.registry.package import load_package

        # Internal errors are findings, seen in the responses; their log lines are noise.
        logging.getLogger("vivace").setLevel(logging.CRITICAL + 1)
        self._home = tempfile.TemporaryDirectory(prefix="vivace-fuzz-")
        path = Path(self._home.name) / "mlp"
        write_reference_model(path, max_batch_size=8)

        self.runner = ModelRunner(load_package(path), execution="inline")
        config = ServerConfig(max_body_bytes=1 << 16, max_header_bytes=2048, max_headers=24)
        self.app = App([self.runner], config)
        self.loop = asyncio.new_event_loop()
        self.runner.attach(self.loop)
        self.dispatched: dict[int, tuple[bytes, bytes, bytes]] = {}
        dispatch = self.app.dispatch

        def recording_dispatch(protocol, seq, method, url, body):
            self.dispatched[seq] = (method, url, bytes(body))
            return dispatch(protocol, seq, method, url, body)

        self.app.dispatch = recording_dispatch

    def check(self, data: bytes) -> None:
        self.loop.run_until_complete(self._exchange(data))

    async def _exchange(self, data: bytes) -> None:
        from vivace.engine.http import HttpProtocol

        step = data[0] if data else 0
        stream = data[1:]
        self.dispatched.clear()
        protocol = HttpProtocol(self.app)
        transport = FakeTransport()
        protocol.connection_made(transport)
        try:
            chunks = [stream] if step == 0 else [stream[i:i + step] for i in range(0, len(stream), step)]
            for chunk in chunks:
                if chunk:
                    protocol.data_received(chunk)  # an exception escaping here is a finding
            for spin in range(2000):  # inline batches run on the loop: let it turn
                if protocol.closed or (protocol.next_write == protocol.next_seq and not protocol.outstanding):
                    break
                await asyncio.sleep(0 if spin < 50 else 0.001)
            else:
                raise AssertionError(f"{protocol.next_seq - protocol.next_write} requests never answered")
            self._check_responses(b"".join(transport.written), protocol.next_seq)
        finally:
            protocol.connection_lost(None)

    def _check_responses(self, written: bytes, requests: int) -> None:
        reader = ResponseReader()
        try:
            reader.parser.feed_data(written)
        except httptools.HttpParserError as exc:
            raise AssertionError(f"malformed HTTP response: {exc}: {written[:300]!r}") from None
        assert reader.current is None, f"a response is cut short: {written[-300:]!r}"
        final = [r for r in reader.responses if r["status"] != 100]
        assert len(final) == requests, f"{requests} requests, {len(final)} responses"
        for seq, response in enumerate(final):
            status, headers, body = response["status"], response["headers"], response["body"]
            assert b"content-length" in headers, f"response {seq} has no content-length"
            content_type = headers.get(b"content-type", b"")
            header_length = headers.get(b"inference-header-content-length")
            if status >= 400:
                error = msgspec.json.decode(body)["error"]
                assert isinstance(error, str) and error, f"error response {seq} without a message"
                assert not error.startswith("internal error"), f"response {seq}: {status} {error}"
            elif content_type == b"application/json" or header_length is not None:
                head = msgspec.json.decode(body if header_length is None else body[: int(header_length)])
                self._check_order(seq, status, head)

    def _check_order(self, seq: int, status: int, head: Any) -> None:
        """A response answers the request of the same sequence number."""
        request = self.dispatched.get(seq)
        assert request is not None, f"response {seq} answers no dispatched request"
        method, url, body = request
        path = url.split(b"?", 1)[0].rstrip(b"/")
        if path == b"/v2/health/live":
            assert head == {"live": True}, f"response {seq} to {url!r} is {head}"
        elif path.endswith(b"/infer") and status == 200:
            try:
                sent = msgspec.json.decode(body).get("id")
            except (msgspec.DecodeError, UnicodeDecodeError, AttributeError):
                return  # not a JSON object: a binary-extension body, or one the fast path took
            assert head.get("id") == sent, f"response {seq} has id {head.get('id')!r}, request had {sent!r}"


class FeatcacheTarget:
    """Entity-id lookups against a store whose keys include the int64 extremes.

    Input: 9-byte chunks (at most 256); byte 0 < 128 picks a stored key (plus byte 1 - 128),
    otherwise bytes 1-8 are a raw little-endian int64 id.
    """

    KEYS = np.array([-(1 << 63), -(1 << 31), -2, -1, 0, 1, 2, 255, 256, 1 << 31, 1 << 32, 1 << 62, (1 << 63) - 1],
                    dtype=np.int64)

    def setup(self) -> None:
        from datetime import datetime, timedelta, timezone

        import pandas as pd

        from vivace.features import Entity, FeatureStore, FeatureView, Field

        self._home = tempfile.TemporaryDirectory(prefix="vivace-fuzz-")
        root = Path(self._home.name)
        t0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
        self.now = t0 + timedelta(minutes=30)
        frame = pd.DataFrame({"driver_id": self.KEYS, "event_timestamp": pd.Timestamp(t0)})
        self.expected = {int(k): np.array([i, i + 0.5], np.float32) for i, k in enumerate(self.KEYS)}
        frame["f0"] = np.arange(len(self.KEYS), dtype=np.float32)
        frame["f1"] = frame["f0"] + np.float32(0.5)
        frame.to_parquet(root / "stats.parquet")
        self.store = FeatureStore(root / "home")
        self.store.apply([Entity("driver", "driver_id"),
                          FeatureView("stats", "driver", str(root / "stats.parquet"),
                                      [Field("f0", "float32"), Field("f1", "float32")], ttl="2h")])
        self.store.materialize(end=self.now)
        self.features = ("stats:f0", "stats:f1")

    def check(self, data: bytes) -> None:
        ids = []
        for i in range(0, min(len(data), 9 * 256) - 8, 9):
            chunk = data[i:i + 9]
            if chunk[0] < 128:
                key = int(self.KEYS[chunk[0] % len(self.KEYS)]) + chunk[1] - 128
                ids.append(min(max(key, -(1 << 63)), (1 << 63) - 1))
            else:
                ids.append(int.from_bytes(chunk[1:], "little", signed=True))
        values, found = self.store.get_online_features(self.features, np.array(ids, np.int64), now=self.now)
        assert values.shape == (len(ids), 2) and found.shape == (len(ids),)
        for key, row, hit in zip(ids, values, found):
            want = self.expected.get(key)
            assert bool(hit) == (want is not None), f"entity {key}: found={hit}"
            if want is None:
                assert np.isnan(row).all(), f"unknown entity {key} has values {row}"
            else:
                np.testing.assert_array_equal(row, want, err_msg=f"entity {key}")


TARGETS = {"oip_decoder": OipDecoderTarget, "native_json": NativeJsonTarget, "http": HttpTarget,
           "featcache": FeatcacheTarget}
