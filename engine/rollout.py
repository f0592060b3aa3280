"""A rollout as the server applies it: the split of one served name's requests between
its stable and canary runners, and shadow copies to a third (registry/rollouts.py holds
the rollout itself; the alias follower keeps this in step with it).

Routing is per request: sticky by a key (the request parameter `routing_key`, or the first
value of a named input) when the rollout says so — one key always lands on one version —
otherwise at random with the canary's weight (`choose`; for a plain weighted split on the
native front end, the C++ side draws instead: engine/frontend.py). A shadowed request is answered by the
version it was routed to; a copy runs on the shadow version in-process (engine/infer.py),
and the two answers are compared: the largest absolute difference of their outputs, and
whether their labels (argmax, or a 0.5 threshold for one column) disagree.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
import zlib
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from vivace import datatypes

from .infer import Outcome

if TYPE_CHECKING:
    from .runtime import ModelRunner

log = logging.getLogger("vivace.rollout")


class _Routing(msgspec.Struct):
    """The parts of an infer body a sticky split reads; the rest is skipped unparsed."""

    parameters: dict[str, Any] | None = None
    inputs: list[dict[str, Any]] = []


_routing = msgspec.json.Decoder(_Routing)


class Split:
    """How the requests to one served name are shared (see the module docstring)."""

    def __init__(self, ref: str, stable: ModelRunner, canary: ModelRunner | None, weight: float, sticky: str,
                 shadow: ModelRunner | None, shadow_sample: float, policy: dict[str, Any] | None = None):
        self.ref = ref
        self.policy = policy or {}       # automatic analysis (registry/rollouts.py POLICY_DEFAULTS)
        self.applied_at = time.monotonic()
        self.baseline: dict[str, Counts] | None = None  # per version, when this step began
        self.acting = False              # an automatic decision is being written to the registry
        self.verdict: dict[str, Any] | None = None  # the latest automatic judgement
        self.stable = stable
        self.canary = canary
        self.weight = weight if canary is not None else 0.0
        self.sticky = sticky
        self.shadow = shadow
        self.shadow_sample = shadow_sample if shadow is not None else 0.0
        self.routed: dict[str, int] = {}  # version -> requests routed to it
        self.shadowed = 0
        self.shadow_failed = 0           # copies the shadow version did not answer 200
        self.disagreements = 0           # compared answers whose labels differ
        self.max_abs_diff = 0.0          # largest output difference seen
        self.sum_abs_diff = 0.0
        self.primary_latency_s = 0.0     # summed over compared requests
        self.shadow_latency_s = 0.0

    def same(self, stable: ModelRunner, canary: ModelRunner | None, weight: float, sticky: str,
             shadow: ModelRunner | None, shadow_sample: float, policy: dict[str, Any] | None = None) -> bool:
        return (stable is self.stable and canary is self.canary and shadow is self.shadow
                and weight == self.weight and sticky == self.sticky and shadow_sample == self.shadow_sample
                and (policy or {}) == self.policy)

    def runners(self) -> list[ModelRunner]:
        return [r for r in (self.stable, self.canary, self.shadow) if r is not None]

    def choose(self, body: bytes) -> ModelRunner:
        """The runner that answers this request."""
        canary = self.canary
        if canary is None or self.weight <= 0:
            runner = self.stable
        elif self.weight >= 100:
            runner = canary
        else:
            key = self._key(body) if self.sticky else None
            if key is None:
                draw = random.random() * 100
            else:  # a stable hash: one key, one version, in every worker and after restarts
                draw = zlib.crc32(key.encode()) % 10_000 / 100
            runner = canary if draw < self.weight else self.stable
        self.routed[runner.version] = self.routed.get(runner.version, 0) + 1
        return runner

    def _key(self, body: bytes) -> str | None:
        try:
            request = _routing.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError):
            return None  # the decoder will refuse it with the reason
        if self.sticky == "parameter":
            value = (request.parameters or {}).get("routing_key")
            return None if value is None else str(value)
        wanted = self.sticky[len("input:"):]
        for inp in request.inputs:
            if inp.get("name") == wanted:
                data = inp.get("data")
                while isinstance(data, list) and data:
                    data = data[0]
                return None if data is None or isinstance(data, list) else str(data)
        return None

    def shadows(self) -> bool:
        return self.shadow is not None and random.random() < self.shadow_sample

    def compare(self, primary: Outcome, primary_s: float, copy: Outcome, copy_s: float) -> tuple[float, int] | None:
        """Record how the shadow's answer to a copy differs from the answer returned;
        returns (max abs difference, label disagreement 0/1), or None when not compared."""
        self.shadowed += 1
        if copy.status != 200:
            self.shadow_failed += 1
            return None
        if primary.status != 200:
            return None
        try:
            diff, disagree = divergence(outputs_of(primary), outputs_of(copy))
        except (ValueError, KeyError, TypeError, msgspec.DecodeError) as exc:
            log.warning("%s: cannot compare the shadow's answer: %s", self.ref, exc)
            return None
        self.disagreements += disagree
        self.max_abs_diff = max(self.max_abs_diff, diff)
        self.sum_abs_diff += diff
        self.primary_latency_s += primary_s
        self.shadow_latency_s += copy_s
        return diff, disagree

    def status(self) -> dict[str, Any]:
        compared = self.shadowed - self.shadow_failed
        return {
            "ref": self.ref,
            "stable": self.stable.version,
            "canary": self.canary.version if self.canary is not None else None,
            "weight": self.weight,
            "sticky": self.sticky,
            "routed": dict(self.routed),
            "automatic": None if not self.policy else {"policy": self.policy, "verdict": self.verdict},
            "shadow": None if self.shadow is None else {
                "version": self.shadow.version, "sample": self.shadow_sample, "requests": self.shadowed,
                "failed": self.shadow_failed, "label_disagreements": self.disagreements,
                "max_abs_diff": self.max_abs_diff,
                "mean_abs_diff": self.sum_abs_diff / compared if compared else None,
                "mean_latency_s": {"answered": self.primary_latency_s / compared if compared else None,
                                   "shadow": self.shadow_latency_s / compared if compared else None},
            },
        }


class TeeSink:
    """A connection's sink that also keeps the outcome, for comparison with a shadow copy."""

    __slots__ = ("sink", "answered", "started")

    def __init__(self, sink: Any):
        self.sink = sink
        self.answered: asyncio.Future = asyncio.get_running_loop().create_future()
        self.started = time.monotonic()

    @property
    def closed(self) -> bool:
        return self.sink.closed

    @property
    def outstanding(self) -> dict[int, Any]:
        return self.sink.outstanding

    def answer(self, seq: int, outcome: Outcome) -> None:
        self.sink.answer(seq, outcome)
        if not self.answered.done():
            self.answered.set_result((outcome, time.monotonic() - self.started))


def outputs_of(outcome: Outcome) -> dict[str, Any]:
    """An infer answer's outputs as numpy arrays, from JSON data or binary tensors."""
    import numpy as np

    header = outcome.body if outcome.header_length is None else outcome.body[:outcome.header_length]
    offset = len(header)
    arrays = {}
    for out in msgspec.json.decode(header)["outputs"]:
        dtype = datatypes.numpy_dtype(out["datatype"])
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is None:
            values = np.asarray(out["data"], dtype=dtype)
        else:
            values = np.frombuffer(outcome.body[offset:offset + size], dtype=dtype)
            offset += size
        arrays[out["name"]] = values.reshape(out["shape"])
    return arrays


def divergence(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, int]:
    """(largest absolute difference over the outputs, 1 if any row's label differs else 0)."""
    import numpy as np

    diff, disagree = 0.0, 0
    for name, x in a.items():
        y = b[name]
        if x.shape != y.shape:
            raise ValueError(f"output {name!r} has shape {list(y.shape)} in the shadow, {list(x.shape)} answered")
        xf, yf = x.astype(np.float64), y.astype(np.float64)
        if xf.size:
            diff = max(diff, float(np.nanmax(np.abs(xf - yf))))
        rows_x, rows_y = xf.reshape(len(xf), -1), yf.reshape(len(yf), -1)
        if rows_x.shape[1] > 1:
            disagree |= int(np.any(rows_x.argmax(axis=1) != rows_y.argmax(axis=1)))
        elif rows_x.shape[1] == 1:
            disagree |= int(np.any((rows_x > 0.5) != (rows_y > 0.5)))
    return diff, disagree


class Counts(NamedTuple):
    """A version's cumulative request counts: successes, failures, and the request-duration
    histogram (bucket upper bounds in seconds; counts per bucket, the last one overflow)."""

    success: int
    failures: int
    bounds: tuple[float, ...]
    buckets: tuple[int, ...]

    def since(self, earlier: Counts) -> Counts:
        return Counts(self.success - earlier.success, self.failures - earlier.failures, self.bounds,
                      tuple(a - b for a, b in zip(self.buckets, earlier.buckets)))

    @property
    def requests(self) -> int:
        return self.success + self.failures

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0

    def p99(self) -> float | None:
        """Upper bound of the bucket holding the 99th percentile of successful requests."""
        total = sum(self.buckets)
        if not total:
            return None
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.buckets):
            running += count
            if running >= 0.99 * total:
                return bound
        return float("inf")


def judge(split: Split, stable: Counts, canary: Counts | None, canary_drifting: list[str],
          elapsed: float) -> tuple[str, dict[str, Any]]:
    """The automatic analysis of one step: ("wait" | "step" | "promote" | "abort", evidence).

    A failed check aborts at once (errors and latency need `min_requests` canary answers;
    drift and shadow disagreement their own minimum); a step passes after `min_requests`
    answers and `step_seconds`."""
    policy = split.policy
    evidence: dict[str, Any] = {"weight": split.weight, "seconds_at_step": round(elapsed, 3),
                                "stable": _summary(stable)}
    failed = []
    enough = False
    if canary is not None:
        evidence["canary"] = _summary(canary)
        enough = canary.requests >= policy["min_requests"]
        if enough and canary.error_rate - stable.error_rate > policy["max_error_rate"]:
            failed.append(f"error rate {canary.error_rate:.4f} vs stable {stable.error_rate:.4f}")
        stable_p99, canary_p99 = stable.p99(), canary.p99()
        if enough and stable_p99 and canary_p99 and canary_p99 > policy["max_p99_ratio"] * stable_p99:
            failed.append(f"p99 {canary_p99 * 1e3:g} ms vs stable {stable_p99 * 1e3:g} ms")
    if policy["fail_on_drift"] and canary_drifting:
        failed.append(f"drift in {', '.join(canary_drifting)}")
        evidence["canary_drifting"] = canary_drifting
    if split.shadow is not None and split.shadowed >= policy["min_requests"]:
        share = split.disagreements / split.shadowed
        evidence["shadow_disagreement"] = share
        if share > policy["max_disagreement"]:
            failed.append(f"shadow labels differ on {share:.1%} of copies")
    if failed:
        evidence["failed"] = failed
        return "abort", evidence
    if canary is None or not enough or elapsed < policy["step_seconds"]:
        return "wait", evidence
    later = [w for w in policy["steps"] if w > split.weight]
    if not later or later[0] >= 100:
        return "promote", evidence
    evidence["next_weight"] = later[0]
    return "step", evidence


def _summary(counts: Counts) -> dict[str, Any]:
    return {"requests": counts.requests, "error_rate": counts.error_rate, "p99_s": counts.p99()}
