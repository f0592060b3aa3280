"""Property-based tests of the C++ dynamic batcher (`_core.Batcher`), inline and threaded.

Hypothesis generates a configuration and a sequence of operations - submits with random
row counts, priorities, timeouts, poisoned rows (the backend raises on them), cancellations
and runs - then shuts the batcher down, draining or not. Every row carries its token and
row index into the batch, so the execute function records exactly which rows ran together,
and the output of a row names the row it came from. Whatever the sequence:

- every accepted request is answered exactly once, including at shutdown; refused ones never;
- a successful request gets all its rows, each run exactly once, in order;
- a failure status has a cause in the sequence (cancel, timeout, poison in its batch,
  shutdown without drain); no batch exceeds max_batch_size;
- the statistics agree with what ran: inference_count = rows run, execution_count =
  batches run, success = successful requests.
"""
from __future__ import annotations

import select
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vivace import _core

S = _core.Status
OK, INVALID, QUEUE_FULL = int(S.OK), int(S.INVALID), int(S.QUEUE_FULL)
TIMEOUT, CANCELLED, ERROR, SHUTDOWN = int(S.TIMEOUT), int(S.CANCELLED), int(S.ERROR), int(S.SHUTDOWN)
PRIORITY_LEVELS = 2
LONG_TIMEOUT_US = 600_000_000  # never expires within a test

configs = st.fixed_dictionaries({
    "max_batch_size": st.integers(1, 8),
    "max_queue_size": st.sampled_from([0, 0, 3]),
    "executors": st.integers(1, 2),
})
submit = st.tuples(st.just("submit"), st.integers(1, 12), st.integers(0, PRIORITY_LEVELS + 1),
                   st.sampled_from([0, 0, 1, LONG_TIMEOUT_US]), st.sampled_from([False, False, False, True]))
operations = st.lists(
    st.one_of(submit, st.tuples(st.just("cancel"), st.integers(0, 40)), st.just(("run",))),
    min_size=1, max_size=30,
)


class Recorder:
    """A batcher whose backend records every batch: rows are (token, row index, poison)."""

    def __init__(self, inline: bool, max_batch_size: int, max_queue_size: int, executors: int):
        self.inline = inline
        self.max_batch_size = max_batch_size
        self.batches: list[list[tuple[int, int]]] = []
        self.lock = threading.Lock()
        self.batcher = _core.Batcher(
            model_name="p", max_batch_size=max_batch_size, preferred_batch_sizes=[], max_queue_delay_us=0,
            priority_levels=PRIORITY_LEVELS, default_priority=PRIORITY_LEVELS, default_timeout_us=0,
            allow_timeout_override=True, max_queue_size=max_queue_size, shed_queue_wait_us=0,
            inputs=[("FP64", [3])], outputs=[("FP64", [1])], executors=executors,
            inline_execution=inline, execute=self._execute,
        )
        count = 1 if inline else executors
        self.ins = [np.frombuffer(self.batcher.input_buffers(e)[0], np.float64).reshape(-1, 3) for e in range(count)]
        self.outs = [np.frombuffer(self.batcher.output_buffers(e)[0], np.float64).reshape(-1, 1) for e in range(count)]
        self.answers: dict[int, list[tuple[int, object]]] = {}

    def _execute(self, executor: int, rows: int) -> None:
        x = self.ins[executor][:rows]
        with self.lock:
            self.batches.append([(int(t), int(r)) for t, r, _ in x])
        if x[:, 2].any():
            raise RuntimeError("poisoned row")
        self.outs[executor][:rows, 0] = x[:, 0] * 1000 + x[:, 1]

    def submit(self, token: int, rows: int, priority: int, timeout_us: int, poison: bool) -> int:
        data = np.zeros((rows, 3), np.float64)
        data[:, 0] = token
        data[:, 1] = np.arange(rows)
        data[-1, 2] = poison
        return self.batcher.submit(token, [data], rows, priority, timeout_us)

    def collect(self) -> None:
        if self.inline:
            self.batcher.run_ready()
        for token, status, payload in self.batcher.drain():
            self.answers.setdefault(token, []).append((status, payload))

    def wait_for(self, tokens: set[int]) -> None:
        """Threads mode: wait until the executors answered `tokens` (a lost one fails, late)."""
        deadline = time.monotonic() + 60
        while not tokens <= self.answers.keys():
            assert time.monotonic() < deadline, f"never answered: {sorted(tokens - self.answers.keys())}"
            select.select([self.batcher.fileno()], [], [], 0.05)
            self.collect()


def run_sequence(inline: bool, config: dict, ops: list, drain_at_shutdown: bool):
    rec = Recorder(inline, **config)
    accepted: dict[int, dict] = {}
    cancelled: set[int] = set()
    token = 0
    for op in ops:
        if op[0] == "submit":
            _, rows, priority, timeout_us, poison = op
            token += 1
            status = rec.submit(token, rows, priority, timeout_us, poison)
            if status == OK:
                accepted[token] = {"rows": rows, "timeout": timeout_us, "poison": poison}
            elif status == INVALID:
                assert priority > PRIORITY_LEVELS
            else:
                assert status == QUEUE_FULL and config["max_queue_size"] > 0, status
        elif op[0] == "cancel":
            if op[1] in accepted and rec.batcher.cancel(op[1]):
                cancelled.add(op[1])
        else:
            rec.collect()
    if inline and drain_at_shutdown:
        # Run what is queued first, as the server's drain does: shutdown(drain=True) would
        # run it without the GIL (test_inline_shutdown_with_drain_runs_queued_requests).
        for _ in range(len(ops)):
            rec.collect()
    rec.batcher.shutdown(drain_at_shutdown)
    rec.collect()
    return rec, accepted, cancelled


def check(rec: Recorder, accepted: dict[int, dict], cancelled: set[int], drained: bool) -> None:
    # Exactly one answer per accepted request; none for refused ones.
    assert set(rec.answers) == set(accepted), (sorted(rec.answers), sorted(accepted))
    assert all(len(a) == 1 for a in rec.answers.values()), rec.answers
    ran = [row for batch in rec.batches for row in batch]
    assert len(ran) == len(set(ran)), "a row ran twice"
    assert all(1 <= len(b) <= rec.max_batch_size for b in rec.batches)
    poisoned_batches = [b for b in rec.batches if any(accepted[t]["poison"] and r == accepted[t]["rows"] - 1
                                                      for t, r in b)]
    in_poisoned = {t for b in poisoned_batches for t, _ in b}
    successes = 0
    for token, [(status, payload)] in rec.answers.items():
        request = accepted[token]
        if status == OK:
            successes += 1
            expected = token * 1000.0 + np.arange(request["rows"])
            np.testing.assert_array_equal(np.frombuffer(payload, np.float64), expected)
            assert token not in in_poisoned
        elif status == ERROR:
            assert token in in_poisoned, f"token {token} failed without a poisoned batch"
        elif status == CANCELLED:
            assert token in cancelled
        elif status == TIMEOUT:
            assert request["timeout"] == 1
        elif status == SHUTDOWN:
            assert not drained
        else:
            raise AssertionError(f"token {token}: unexpected status {status}")
    stats = rec.batcher.stats()
    assert stats["inference_count"] == len(ran)
    assert stats["execution_count"] == len(rec.batches)
    assert stats["success"] == successes


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "threads"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs, ops=operations, drain_at_shutdown=st.booleans())
def test_any_sequence_answers_every_request_exactly_once(inline, config, ops, drain_at_shutdown):
    rec, accepted, cancelled = run_sequence(inline, config, ops, drain_at_shutdown)
    check(rec, accepted, cancelled, drain_at_shutdown)


@settings(max_examples=30, deadline=None)
@given(config=configs, ops=operations)
def test_threaded_results_arrive_before_shutdown(config, ops):
    """Without shutdown's help: the executors alone answer everything that was accepted."""
    rec = Recorder(False, **config)
    accepted = {}
    for token, op in enumerate((o for o in ops if o[0] == "submit"), 1):
        _, rows, priority, _, poison = op
        if rec.submit(token, rows, min(priority, PRIORITY_LEVELS), LONG_TIMEOUT_US, poison) == OK:
            accepted[token] = {"rows": rows, "timeout": LONG_TIMEOUT_US, "poison": poison}
    rec.wait_for(set(accepted))
    rec.batcher.shutdown(True)
    rec.collect()
    check(rec, accepted, set(), True)


INLINE_DRAIN = """
from vivace import _core
ran = []
b = _core.Batcher(model_name="p", max_batch_size=4, preferred_batch_sizes=[], max_queue_delay_us=0,
                  priority_levels=1, default_priority=1, default_timeout_us=0, allow_timeout_override=True,
                  max_queue_size=0, shed_queue_wait_us=0, inputs=[("FP32", [1])], outputs=[("FP32", [1])],
                  executors=1, inline_execution=True, execute=lambda e, rows: ran.append(rows))
assert b.submit(1, [[1.0, 2.0]], 2) == 0
b.shutdown(True)
assert [(t, s) for t, s, _ in b.drain()] == [(1, 0)] and ran == [2]
"""


def test_inline_shutdown_with_drain_runs_queued_requests():
    # In a child process: the bug kills the interpreter.
    run = subprocess.run([sys.executable, "-c", INLINE_DRAIN], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
