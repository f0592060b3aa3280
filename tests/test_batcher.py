"""Policy tests of the C++ dynamic batcher through its Python binding, in both modes.

`threads`: executor threads call execute() with the GIL; `inline`: the caller runs ready
batches with run_ready(). The execute function here sums each row, so every output can be
checked against its input, and records the size of every batch it ran.
"""
from __future__ import annotations

import select
import threading
import time

import numpy as np
import pytest

from vivace import _core

S = _core.Status
FEATURES = 4


class Harness:
    def __init__(self, inline: bool = False, gate: bool = False, **config):
        defaults = dict(
            model_name="m", max_batch_size=8, preferred_batch_sizes=[], max_queue_delay_us=0,
            priority_levels=1, default_priority=1, default_timeout_us=0, allow_timeout_override=True,
            max_queue_size=0, shed_queue_wait_us=0, inputs=[("FP32", [FEATURES])], outputs=[("FP32", [1])], executors=1,
        )
        defaults.update(config)
        self.inline = inline
        self.batches: list[int] = []
        self.first_values: list[float] = []
        self.gate = threading.Event()
        if not gate:
            self.gate.set()
        self.entered = threading.Event()
        self.fail_with: Exception | None = None
        self.delay_s = 0.0  # simulated compute time per batch
        self.batcher = _core.Batcher(**defaults, inline_execution=inline, execute=self._execute)
        executors = 1 if inline else defaults["executors"]
        mbs = defaults["max_batch_size"]
        self.ins = [np.frombuffer(self.batcher.input_buffers(e)[0], np.float32).reshape(mbs, FEATURES)
                    for e in range(executors)]
        self.outs = [np.frombuffer(self.batcher.output_buffers(e)[0], np.float32).reshape(mbs, 1)
                     for e in range(executors)]
        self.results: dict[int, tuple[int, object]] = {}

    def _execute(self, executor: int, rows: int) -> None:
        self.entered.set()
        self.gate.wait(10)
        time.sleep(self.delay_s)
        if self.fail_with is not None:
            raise self.fail_with
        self.batches.append(rows)
        self.first_values.append(float(self.ins[executor][0, 0]))
        self.outs[executor][:rows, 0] = self.ins[executor][:rows].sum(axis=1)

    def submit(self, token: int, rows: int = 1, value: float = 1.0, **kw) -> int:
        data = np.full((rows, FEATURES), value, np.float32)
        data[:, 0] += np.arange(rows, dtype=np.float32)  # rows differ, so misplaced rows show
        return self.batcher.submit(token, [data], rows, **kw)

    def collect(self, count: int, timeout: float = 10.0) -> dict[int, tuple[int, object]]:
        deadline = time.monotonic() + timeout
        while len(self.results) < count:
            if self.inline:
                self.batcher.run_ready()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"only {len(self.results)} of {count} requests completed")
            select.select([self.batcher.fileno()], [], [], min(left, 0.05))
            for token, status, payload in self.batcher.drain():
                self.results[token] = (status, payload)
        return self.results

    def close(self) -> None:
        self.gate.set()
        self.batcher.shutdown(True)


def expected_sums(rows: int, value: float = 1.0) -> np.ndarray:
    return (np.arange(rows) + value * FEATURES).astype(np.float32)


@pytest.fixture(params=["threads", "inline"])
def mode(request):
    return request.param == "inline"


def test_request_larger_than_max_batch_is_split_and_reassembled(mode):
    h = Harness(inline=mode, max_batch_size=8)
    assert h.submit(1, rows=10) == int(S.OK)
    status, payload = h.collect(1)[1]
    assert status == int(S.OK)
    np.testing.assert_array_equal(np.frombuffer(payload, np.float32), expected_sums(10))
    assert sorted(h.batches) == [2, 8]
    h.close()


def test_queued_rows_form_full_batches_in_order():
    h = Harness(gate=True, max_batch_size=8)
    assert h.submit(100) == int(S.OK)
    assert h.entered.wait(5)  # the first batch is running and held
    for token in range(1, 21):
        assert h.submit(token, value=float(token)) == int(S.OK)
    h.gate.set()
    results = h.collect(21)
    assert h.batches == [1, 8, 8, 4]
    for token in range(1, 21):
        status, payload = results[token]
        assert status == int(S.OK)
        assert np.frombuffer(payload, np.float32)[0] == token * FEATURES
    h.close()


def test_inline_mode_batches_everything_queued_since_the_last_run():
    h = Harness(inline=True, max_batch_size=64)
    for token in range(1, 41):
        assert h.submit(token) == int(S.OK)
    h.collect(40)
    assert h.batches == [40]
    h.close()


def test_max_queue_delay_holds_a_partial_batch_then_runs_it(mode):
    h = Harness(inline=mode, max_batch_size=64, max_queue_delay_us=300_000)
    start = time.monotonic()
    assert h.submit(1) == int(S.OK)
    time.sleep(0.1)
    if mode:
        assert h.batcher.run_ready() > 0  # due later: nothing runs yet
    assert h.batches == []
    h.collect(1)
    assert time.monotonic() - start >= 0.3
    assert h.batches == [1]
    h.close()


def test_preferred_batch_size_runs_without_waiting_for_the_delay(mode):
    h = Harness(inline=mode, max_batch_size=16, preferred_batch_sizes=[4], max_queue_delay_us=5_000_000)
    for token in range(1, 4):
        assert h.submit(token) == int(S.OK)
    time.sleep(0.1)
    if mode:
        h.batcher.run_ready()
    assert h.batches == []  # 3 rows: below the preferred size, the delay has not passed
    assert h.submit(4) == int(S.OK)
    start = time.monotonic()
    h.collect(4)
    assert h.batches == [4]
    assert time.monotonic() - start < 4.0  # well before the 5 s delay
    h.close()


def test_higher_priority_runs_first():
    h = Harness(gate=True, max_batch_size=1, priority_levels=2, default_priority=2)
    assert h.submit(1) == int(S.OK)
    assert h.entered.wait(5)
    assert h.submit(2, value=2.0) == int(S.OK)               # default priority (2)
    assert h.submit(3, value=3.0, priority=2) == int(S.OK)
    assert h.submit(4, value=4.0, priority=1) == int(S.OK)   # most urgent
    h.gate.set()
    h.collect(4)
    assert h.first_values == [1.0, 4.0, 2.0, 3.0]
    h.close()


def test_priority_out_of_range_is_refused():
    h = Harness(priority_levels=2)
    assert h.submit(1, priority=3) == int(S.INVALID)
    h.close()


def test_queue_timeout_answers_without_running():
    h = Harness(gate=True, default_timeout_us=100_000)
    assert h.submit(1) == int(S.OK)
    assert h.entered.wait(5)
    assert h.submit(2, value=2.0) == int(S.OK)
    time.sleep(0.3)
    h.gate.set()
    results = h.collect(2)
    assert results[1][0] == int(S.OK)
    assert results[2][0] == int(S.TIMEOUT)
    assert h.first_values == [1.0]  # the expired request never ran
    h.close()


def test_request_timeout_may_lower_but_not_raise_the_default():
    h = Harness(gate=True, default_timeout_us=10_000_000)
    assert h.submit(1) == int(S.OK)
    assert h.entered.wait(5)
    assert h.submit(2, timeout_us=50_000) == int(S.OK)    # lowered: expires
    time.sleep(0.2)
    h.gate.set()
    assert h.collect(2)[2][0] == int(S.TIMEOUT)
    h.close()

    h = Harness(gate=True, default_timeout_us=100_000)
    assert h.submit(1) == int(S.OK)
    assert h.entered.wait(5)
    assert h.submit(2, timeout_us=60_000_000) == int(S.OK)  # raising is ignored
    time.sleep(0.3)
    h.gate.set()
    assert h.collect(2)[2][0] == int(S.TIMEOUT)
    h.close()


def test_timed_out_request_is_answered_while_executor_is_idle():
    # No batch is running: the executor wakes at the deadline rather than waiting for work.
    h = Harness(max_batch_size=64, max_queue_delay_us=10_000_000, default_timeout_us=100_000)
    assert h.submit(1) == int(S.OK)
    assert h.collect(1, timeout=5)[1][0] == int(S.TIMEOUT)
    h.close()


def test_full_queue_rejects_immediately():
    h = Harness(gate=True, max_queue_size=2)
    assert h.submit(1) == int(S.OK)
    assert h.entered.wait(5)
    assert h.submit(2) == int(S.OK)
    assert h.submit(3) == int(S.OK)
    assert h.submit(4) == int(S.QUEUE_FULL)
    h.gate.set()
    results = h.collect(3)
    assert all(results[t][0] == int(S.OK) for t in (1, 2, 3))
    assert h.batcher.stats()["failures"]["queue_full"] == 0  # refusals are not queued requests
    h.close()


def test_overload_sheds_new_requests_once_the_oldest_has_waited_too_long():
    # Load shedding: while a queued request has waited longer than shed_queue_wait_us, new
    # arrivals are refused at once; admitted ones still run, and admission resumes after.
    h = Harness(gate=True, max_batch_size=1, shed_queue_wait_us=20_000)
    assert h.submit(1) == int(S.OK)
    assert h.entered.wait(5)  # token 1 holds the executor
    assert h.submit(2) == int(S.OK)  # queued: nothing has waited yet
    time.sleep(0.05)
    assert h.submit(3) == int(S.OVERLOADED)
    h.gate.set()
    results = h.collect(2)
    assert results[1][0] == int(S.OK) and results[2][0] == int(S.OK)
    assert h.submit(4) == int(S.OK)  # the queue drained: requests are admitted again
    assert h.collect(3)[4][0] == int(S.OK)
    h.close()


def test_shedding_looks_only_at_requests_at_least_as_urgent():
    # An old low-priority request does not shed urgent traffic; it does shed its own level.
    h = Harness(gate=True, max_batch_size=1, priority_levels=2, shed_queue_wait_us=20_000)
    assert h.submit(1) == int(S.OK)
    assert h.entered.wait(5)
    assert h.submit(2, priority=2) == int(S.OK)
    time.sleep(0.05)
    assert h.submit(3, priority=1) == int(S.OK)
    assert h.submit(4, priority=2) == int(S.OVERLOADED)
    h.gate.set()
    assert all(status == int(S.OK) for status, _ in h.collect(3).values())
    h.close()


def test_overload_sheds_when_the_queued_work_would_take_too_long():
    # Batches take >= 10 ms per row here: with a 50 ms budget, the queue is refused new rows
    # once it holds more than 50 ms of work, before anything has waited that long.
    h = Harness(max_batch_size=1, shed_queue_wait_us=50_000)
    h.delay_s = 0.01
    assert h.submit(1) == int(S.OK)
    h.collect(1)  # one batch measured the time per row
    h.gate.clear()
    h.entered.clear()
    assert h.submit(2) == int(S.OK)
    assert h.entered.wait(5)  # token 2 holds the executor
    statuses = [h.submit(token) for token in range(3, 13)]
    assert statuses[:2] == [int(S.OK)] * 2 and statuses[-1] == int(S.OVERLOADED)
    h.gate.set()
    h.close()


def test_deadline_is_honoured_while_the_executor_runs_a_long_batch():
    h = Harness(gate=True, max_batch_size=1)
    assert h.submit(1) == int(S.OK)
    assert h.entered.wait(5)  # token 1's batch runs until the gate opens
    assert h.submit(2, timeout_us=1000) == int(S.OK)
    time.sleep(0.01)
    h.batcher.expire_due()
    assert h.collect(1)[2][0] == int(S.TIMEOUT)  # answered while token 1 still runs
    h.gate.set()
    assert h.collect(2)[1][0] == int(S.OK)
    h.close()


def test_cancelled_request_is_dropped_before_execution(mode):
    h = Harness(inline=mode, gate=not mode)
    if not mode:
        assert h.submit(1) == int(S.OK)
        assert h.entered.wait(5)
    assert h.submit(2, rows=3, value=2.0) == int(S.OK)
    assert h.batcher.cancel(2)
    assert not h.batcher.cancel(999)
    h.gate.set()
    results = h.collect(1 if mode else 2)
    assert results[2][0] == int(S.CANCELLED)
    assert 2.0 not in h.first_values
    h.close()


def test_backend_error_fails_only_that_batch(mode):
    h = Harness(inline=mode)
    h.fail_with = ValueError("boom")
    assert h.submit(1) == int(S.OK)
    status, payload = h.collect(1)[1]
    assert status == int(S.ERROR)
    assert "boom" in payload
    h.fail_with = None
    assert h.submit(2) == int(S.OK)
    assert h.collect(2)[2][0] == int(S.OK)
    h.close()


def test_shutdown_with_drain_runs_queued_requests():
    h = Harness(gate=True)
    assert h.submit(1) == int(S.OK)
    assert h.entered.wait(5)
    for token in range(2, 6):
        assert h.submit(token) == int(S.OK)
    stopper = threading.Thread(target=h.batcher.shutdown, args=(True,))
    stopper.start()
    time.sleep(0.05)
    assert h.submit(99) == int(S.SHUTDOWN)  # no new work once stopping
    h.gate.set()
    stopper.join(10)
    results = h.collect(5)
    assert all(results[t][0] == int(S.OK) for t in range(1, 6))


def test_shutdown_without_drain_fails_queued_requests():
    h = Harness(gate=True)
    assert h.submit(1) == int(S.OK)
    assert h.entered.wait(5)
    for token in range(2, 6):
        assert h.submit(token) == int(S.OK)
    stopper = threading.Thread(target=h.batcher.shutdown, args=(False,))
    stopper.start()
    time.sleep(0.05)
    h.gate.set()
    stopper.join(10)
    results = h.collect(5)
    assert results[1][0] == int(S.OK)  # already running: finishes
    assert all(results[t][0] == int(S.SHUTDOWN) for t in range(2, 6))


def test_several_executors_complete_everything_exactly_once():
    h = Harness(executors=3, max_batch_size=4)
    for token in range(1, 201):
        assert h.submit(token, rows=1 + token % 5, value=float(token)) == int(S.OK)
    results = h.collect(200)
    for token in range(1, 201):
        status, payload = results[token]
        assert status == int(S.OK)
        np.testing.assert_array_equal(np.frombuffer(payload, np.float32), expected_sums(1 + token % 5, token))
    stats = h.batcher.stats()
    assert stats["success"] == 200
    assert stats["inference_count"] == sum(1 + t % 5 for t in range(1, 201))
    assert stats["execution_count"] == len(h.batches)
    assert max(h.batches) <= 4
    h.close()


def test_stats_histograms_count_every_batch():
    h = Harness(inline=True, max_batch_size=8)
    for token in range(1, 6):
        h.submit(token)
    h.collect(5)
    stats = h.batcher.stats()
    bounds, counts, total = stats["histograms"]["batch_size"]
    assert sum(counts) == stats["execution_count"] == 1
    assert total == 5
    assert sum(stats["histograms"]["request_seconds"][1]) == 5
    h.close()


@pytest.mark.parametrize(
    "dtype,values,expected",
    [
        ("INT64", [[1, -2], [3, 2**40]], np.array([[1, -2], [3, 2**40]], np.int64)),
        ("BOOL", [True, False, True, True], np.array([True, False, True, True])),
        ("FP16", [0.5, -1.25, 65504.0, 1e-7], np.array([0.5, -1.25, 65504.0, 1e-7], np.float16)),
        ("UINT8", [0, 255, 7, 8], np.array([0, 255, 7, 8], np.uint8)),
        ("FP64", [0.1, 0.2, 1e300, -3], np.array([0.1, 0.2, 1e300, -3], np.float64)),
    ],
)
def test_json_lists_convert_to_each_datatype(dtype, values, expected):
    seen = {}

    def execute(executor, rows):
        seen["data"] = np.frombuffer(b.input_buffers(0)[0], expected.dtype)[: expected.size].copy()

    b = _core.Batcher("m", 4, [], 0, 1, 1, 0, True, 0, 0, [(dtype, [2])], [("FP32", [1])], 1, True, execute)
    assert b.submit(1, [values], 2) == int(S.OK)
    b.run_ready()
    assert b.drain()[0][1] == int(S.OK)
    np.testing.assert_array_equal(seen["data"], expected.reshape(-1))


@pytest.mark.parametrize(
    "dtype,values,message",
    [
        ("FP32", [1.0, "x"], "non-numeric"),
        ("FP32", [1.0, 2.0, 3.0], "3 elements, its shape needs 1 x 2"),
        ("FP32", [1.0], "1 elements"),
        ("INT8", [1, 300], "out of range"),
        ("UINT16", [1, -1], "out of range"),
        ("INT32", [1.5, 2], "integers"),
        ("BOOL", [1, 0], "true/false"),
        ("INT64", [1, 2**70], "out of range"),
    ],
)
def test_bad_json_data_is_refused_with_a_reason(dtype, values, message):
    b = _core.Batcher("m", 4, [], 0, 1, 1, 0, True, 0, 0, [(dtype, [2])], [("FP32", [1])], 1, True, lambda e, n: None)
    with pytest.raises(ValueError, match=message):
        b.submit(1, [values], 1)
    assert b.queued_requests == 0  # nothing half-queued


def test_binary_data_of_the_wrong_size_is_refused():
    b = _core.Batcher("m", 4, [], 0, 1, 1, 0, True, 0, 0, [("FP32", [4])], [("FP32", [1])], 1, True, lambda e, n: None)
    with pytest.raises(ValueError, match="bytes"):
        b.submit(1, [b"\x00" * 15], 1)
    with pytest.raises(TypeError):
        b.submit(1, [object()], 1)
    with pytest.raises(ValueError, match="inputs"):
        b.submit(1, [], 1)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(max_batch_size=0), "max_batch_size"),
        (dict(preferred_batch_sizes=[9]), "preferred"),
        (dict(default_priority=3), "default_priority"),
        (dict(inputs=[("FP32", [-1])]), "batch dimension"),
        (dict(inputs=[("BYTES", [1])]), "unsupported datatype"),
    ],
)
def test_invalid_configuration_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        Harness(**change)


def test_bf16_json_values_round_to_nearest_even():
    # bfloat16 is the top half of a float32; the bit patterns are written out so the
    # test needs no bfloat16 library. 1 + 2**-8 and 1 + 3 * 2**-8 are ties: to even.
    values = [1.0, -2.5, 1.00390625, 1.01171875, 3.0e38, 1e39, float("nan"), 0.0]
    expected = [0x3F80, 0xC020, 0x3F80, 0x3F82, 0x7F62, 0x7F80, 0x7FC0, 0x0000]
    seen = {}

    def execute(executor, rows):
        seen["bits"] = np.frombuffer(b.input_buffers(0)[0], np.uint16)[:8].tolist()

    b = _core.Batcher("m", 4, [], 0, 1, 1, 0, True, 0, 0, [("BF16", [8])], [("FP32", [1])], 1, True, execute)
    assert b.submit(1, [values], 1) == int(S.OK)
    b.run_ready()
    assert b.drain()[0][1] == int(S.OK)
    assert seen["bits"] == expected


def test_bf16_binary_rows_pass_through_to_bf16_outputs():
    rows = np.array([[0x3F80, 0x4000, 0xC040], [0x0001, 0x7F7F, 0xFF80]], np.uint16)

    def execute(executor, n):
        out = np.frombuffer(b.output_buffers(0)[0], np.uint16).reshape(4, 3)
        out[:n] = np.frombuffer(b.input_buffers(0)[0], np.uint16).reshape(4, 3)[:n]

    b = _core.Batcher("m", 4, [], 0, 1, 1, 0, True, 0, 0, [("BF16", [3])], [("BF16", [3])], 1, True, execute)
    with pytest.raises(ValueError, match="whole number of 2"):
        b.submit(1, [rows.tobytes()[:-1]], 2)
    assert b.submit(1, [rows.tobytes()], 2) == int(S.OK)
    b.run_ready()
    token, status, payload = b.drain()[0]
    assert (token, status) == (1, int(S.OK))
    assert bytes(payload) == rows.tobytes()


def test_a_run_ready_slice_answers_each_batch_and_leaves_the_rest_for_the_next():
    # The servers run inline batches in slices so that reading and refusing requests never
    # waits behind a whole queue; each batch is answered as soon as it ran.
    h = Harness(inline=True, max_batch_size=1)
    h.delay_s = 0.01
    for token in range(1, 5):
        assert h.submit(token, value=float(token)) == int(S.OK)
    assert h.batcher.run_ready(0) == 0  # one batch, and more are ready
    assert h.batches == [1]
    assert [token for token, _, _ in h.batcher.drain()] == [1]  # answered before the rest ran
    assert h.batcher.run_ready(60_000_000) == -1  # a long slice: everything, nothing left waiting
    assert h.batches == [1, 1, 1, 1] and sorted(t for t, _, _ in h.batcher.drain()) == [2, 3, 4]
    assert _core.INLINE_SLICE_US > 0
    h.close()
