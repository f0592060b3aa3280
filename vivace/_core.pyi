"""Type stubs of vivace._core, the compiled core (csrc/, bound with pybind11)."""
from typing import Any, Callable, Sequence

import numpy as np
import numpy.typing as npt

class Status:
    """Outcome of a batcher request (the `status` in Batcher.drain() tuples)."""

    OK: Status
    QUEUE_FULL: Status
    TIMEOUT: Status
    CANCELLED: Status
    ERROR: Status
    SHUTDOWN: Status
    INVALID: Status
    OVERLOADED: Status
    __members__: dict[str, Status]
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...
    def __int__(self) -> int: ...
    def __index__(self) -> int: ...

_TensorRows = Sequence[tuple[str, Sequence[int]]]  # (datatype, row shape without the batch dim)
_NamedTensors = Sequence[tuple[str, str, Sequence[int]]]  # (name, datatype, row shape)

class Batcher:
    """Dynamic batcher for one model: priority queues, executors, bulk completions."""

    def __init__(
        self,
        model_name: str,
        max_batch_size: int,
        preferred_batch_sizes: Sequence[int],
        max_queue_delay_us: int,
        priority_levels: int,
        default_priority: int,
        default_timeout_us: int,
        allow_timeout_override: bool,
        max_queue_size: int,
        shed_queue_wait_us: int,
        inputs: _TensorRows,
        outputs: _TensorRows,
        executors: int,
        inline_execution: bool,
        execute: Callable[[int, int], None],
    ) -> None: ...
    def submit(
        self, token: int, inputs: list[Any], rows: int, priority: int = 0, timeout_us: int = 0, traced: bool = False
    ) -> int: ...
    def submit_json(
        self, token: int, body: bytes | memoryview, priority: int = 0, timeout_us: int = 0, traced: bool = False
    ) -> int: ...
    def enable_json(self, model_name: str, model_version: str, inputs: _NamedTensors, outputs: _NamedTensors) -> bool: ...
    def drain(self) -> list[tuple[int, int, bytes | str]]: ...
    def take_traces(self) -> list[tuple[int, int, int, int, int, int]]: ...
    def run_ready(self, slice_us: int = -1) -> int: ...
    def expire_due(self) -> None: ...
    def cancel(self, token: int) -> bool: ...
    def fileno(self) -> int: ...
    def ready_fileno(self) -> int: ...
    def shutdown(self, drain: bool = True) -> None: ...
    def input_buffers(self, executor: int) -> list[memoryview]: ...
    def output_buffers(self, executor: int) -> list[memoryview]: ...
    def set_native_forward(self, model: Any, forward: Any, owner: Any) -> None:
        """Run batches with a native C kernel (capsules), without the GIL."""
    def attach_sketches(self, input_sketch: DriftSketch | None, output_sketch: DriftSketch | None) -> None: ...
    def attach_feature_lookup(self, lookup: FeatureLookup, features: Sequence[npt.NDArray[np.float32]]) -> None: ...
    def stats(self) -> dict[str, Any]: ...
    @property
    def queued_requests(self) -> int: ...

class HttpFrontend:
    """Native HTTP/1.1 server on a listening socket (one epoll thread); see engine/frontend.py."""

    def __init__(
        self,
        listen_fd: int,
        max_connections: int,
        max_body_bytes: int,
        max_header_bytes: int,
        max_headers: int,
        header_timeout: float,
        body_timeout: float,
        idle_timeout: float,
    ) -> None: ...
    def set_routes(
        self, routes: list[tuple[str, Batcher, str, str] | tuple[str, Batcher, str, str, Batcher, str, float]]
    ) -> None: ...
    def take_routed(self) -> list[tuple[str, int, int]]: ...
    def set_auth(self, required: bool, grants: list[tuple[bytes, float, bool, str]], open_paths: list[str]) -> None: ...
    def set_driven(self, batchers: list[Batcher]) -> None: ...
    def respond(self, conn: int, seq: int, response: bytes) -> None: ...
    def take(
        self,
    ) -> list[
        tuple[
            int,
            int,
            bytes | None,
            bytes | None,
            bytes | None,
            bytes | None,
            bytes | None,
            str | None,
            tuple[bytes | None, bytes | None, int] | None,
        ]
    ]: ...
    def set_tracing(self, on: bool, ratio: float) -> None: ...
    def take_trace_spans(self, epoch_offset_ns: int) -> tuple[bytes, int, int, int]: ...
    def fileno(self) -> int: ...
    def stop_accepting(self) -> None: ...
    def begin_drain(self) -> None: ...
    def in_flight(self) -> int: ...
    def connections(self) -> int: ...
    def http_errors(self) -> dict[int, int]: ...
    def failures(self) -> dict[tuple[str, str, str], int]: ...
    def stop(self) -> None: ...

def parse_traceparent(value: bytes) -> tuple[bytes, bytes, int] | None: ...
def encode_request_spans(
    trace_id: bytes | None,
    parent_id: bytes | None,
    trace_state: str,
    method: str,
    target: str,
    frontend: str,
    model: str = "",
    version: str = "",
    status: int | None = None,
    rows: int = 0,
    batch_rows: int = 0,
    received: int = 0,
    parsed: int = 0,
    enqueued: int = 0,
    batch_start: int = 0,
    features: int = 0,
    batch_end: int = 0,
    answered: int = 0,
) -> tuple[bytes, int]: ...
def http_load(
    port: int,
    request: bytes,
    rate: float = 0.0,
    concurrency: int = 0,
    duration_s: float = 1.0,
    warmup_s: float = 0.0,
    max_connections: int = 512,
    answer_timeout_s: float = 10.0,
    cpu: int = -1,
) -> list[tuple[float, float, float, int, bool, int, str, bytes]]:
    """Native HTTP load generator (open loop at `rate`, or closed loop with `concurrency`)."""

NATIVE_MLP_FORWARD: Any  # capsule: vivace_native_mlp_forward(model, x, rows, out), for C callers
INLINE_SLICE_US: int  # run_ready's slice in the servers
NATIVE_MLP_RELEASE_GIL_MACS: int  # forward() releases the GIL from this many rows x MACs/row

def cpu_levels() -> list[str]: ...
def cpu_level(requested: str = "") -> str: ...
def int8_peak(level: str = "") -> float | None: ...

class NativeMLP:
    """A prepacked MLP (fp32 or int8) run in one native call; thread-safe."""

    def __init__(
        self,
        weights: Sequence[npt.ArrayLike],
        biases: Sequence[npt.ArrayLike],
        activations: Sequence[str],
        *,
        precision: str = "fp32",
        input_ranges: npt.ArrayLike | None = None,
        level: str | None = None,
        num_threads: int = 1,
    ) -> None: ...
    def forward(self, x: npt.ArrayLike) -> npt.NDArray[np.float32]: ...
    def forward_into(self, x: Any, out: Any) -> None: ...
    def native_handle(self) -> Any: ...
    @property
    def in_features(self) -> int: ...
    @property
    def out_features(self) -> int: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def num_threads(self) -> int: ...
    @property
    def macs_per_row(self) -> int: ...
    @property
    def level(self) -> str: ...
    @property
    def precision(self) -> str: ...

class DriftSketch:
    """Per-feature histogram counts over reference bin edges, over a sliding window."""

    def __init__(
        self,
        edges: Sequence[Sequence[float]],
        num_categories: Sequence[int],
        low: Sequence[float],
        high: Sequence[float],
        columns: Sequence[int],
        window: str = "rows",
        bucket_span: int = 10000,
        buckets: int = 6,
    ) -> None: ...
    def update(self, batch: Any, now_ns: int = -1) -> None: ...
    def snapshot(self, now_ns: int = -1) -> dict[str, Any]: ...
    def reset(self) -> None: ...
    @property
    def num_features(self) -> int: ...
    @property
    def min_columns(self) -> int: ...

def drift_count_categories(rows: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
def drift_sort_finite(
    columns: Sequence[npt.ArrayLike], threads: int = 0
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]: ...
def drift_compare_sorted(
    a: npt.NDArray[np.float64],
    a_counts: npt.NDArray[np.int64],
    b: npt.NDArray[np.float64],
    b_counts: npt.NDArray[np.int64],
    threads: int = 0,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...

class FeatureCacheError(RuntimeError): ...

class FeatureCache:
    """The LMDB online store of a Vivace home, opened read-only once per process."""
    def __init__(self, path: str, cache_capacity: int = 0) -> None: ...
    @property
    def path(self) -> str: ...
    @property
    def cache_capacity(self) -> int: ...
    def generation(self) -> int: ...
    def indexed_rows(self, view: str) -> int: ...

class FeatureLookup:
    """A fixed list of (view, feature) columns read for batches of entity keys."""
    def __init__(self, cache: FeatureCache, columns: Sequence[tuple[str, str]]) -> None: ...
    @property
    def num_features(self) -> int: ...
    @property
    def columns(self) -> list[tuple[str, str]]: ...
    def get(
        self, entity_ids: int | Sequence[int] | npt.NDArray[np.integer], now_us: int | None = None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]: ...
    def lookup_into(
        self,
        entity_ids: int | Sequence[int] | npt.NDArray[np.integer],
        out: npt.NDArray[np.float32],
        found: npt.NDArray[np.bool_],
        now_us: int | None = None,
    ) -> None: ...
