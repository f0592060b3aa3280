"""A rollout as the server applies it: the split of one served name's requests between
its stable and canary runners, and shadow copies to a third (registry/rollouts.py holds
the rollout itself; the alias follower keeps this in step with it).

Routing is per request: sticky by a key (the request parameter `routing_key`, or the first
value of a named input) when the rollout says so — one key always lands on one version —
otherwise at random with the canary's weight. A shadowed request is answered by the
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
from typing import TYPE_CHECKING, Any

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
                 shadow: ModelRunner | None, shadow_sample: float):
        self.ref = ref
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
             shadow: ModelRunner | None, shadow_sample: float) -> bool:
        return (stable is self.stable and canary is self.canary and shadow is self.shadow
                and weight == self.weight and sticky == self.sticky and shadow_sample == self.shadow_sample)

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

    def compare(self, primary: Outcome, primary_s: float, copy: Outcome, copy_s: float) -> None:
        """Record how the shadow's answer to a copy differs from the answer returned."""
        self.shadowed += 1
        if copy.status != 200:
            self.shadow_failed += 1
            return
        if primary.status != 200:
            return
        try:
            diff, disagree = divergence(outputs_of(primary), outputs_of(copy))
        except (ValueError, KeyError, TypeError, msgspec.DecodeError) as exc:
            log.warning("%s: cannot compare the shadow's answer: %s", self.ref, exc)
            return
        self.disagreements += disagree
        self.max_abs_diff = max(self.max_abs_diff, diff)
        self.sum_abs_diff += diff
        self.primary_latency_s += primary_s
        self.shadow_latency_s += copy_s

    def status(self) -> dict[str, Any]:
        compared = self.shadowed - self.shadow_failed
        return {
            "ref": self.ref,
            "stable": self.stable.version,
            "canary": self.canary.version if self.canary is not None else None,
            "weight": self.weight,
            "sticky": self.sticky,
            "routed": dict(self.routed),
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
