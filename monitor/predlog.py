"""Prediction logging for audit: sampled requests and responses, one JSON object per line,
appended to a file with a size cap and rotation.

Each line: {"ts": unix seconds, "request_id", "model", "version", "latency_s", "inputs",
"outputs"} plus any extra fields given. Sampling is decided by a hash of the request id,
so a given request is logged or not whatever the process, and a rate of 0.1 keeps about
one request in ten. When the file would pass ``max_bytes`` it is rotated: ``log.jsonl``
becomes ``log.jsonl.1``, ``.1`` becomes ``.2`` ... and the oldest beyond ``backups`` is
deleted, so the log never holds more than about ``max_bytes * (backups + 1)`` bytes.
"""
from __future__ import annotations

import os
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Self

import msgspec
import numpy as np


def _encode_extra(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot log objects of type {type(obj).__name__}")


class RotatingFile:
    """An append-only file capped at `max_bytes`, rotated to `.1` ... `.backups`. Thread-safe.

    Each `write` is one `write()` call on the file, so records never interleave.
    """

    def __init__(self, path: str | os.PathLike, max_bytes: int = 64 << 20, backups: int = 5):
        if max_bytes < 1024:
            raise ValueError(f"max_bytes must be at least 1024, got {max_bytes}")
        if backups < 0:
            raise ValueError(f"backups must be >= 0, got {backups}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        self._file = open(self.path, "ab")  # noqa: SIM115 - held open for the writer's lifetime
        self._size = self._file.tell()

    def write(self, record: bytes) -> None:
        if len(record) > self.max_bytes:
            raise ValueError(f"record of {len(record)} bytes exceeds max_bytes={self.max_bytes}")
        with self._lock:
            if self._file.closed:
                raise ValueError(f"{self.path} is closed")
            if self._size + len(record) > self.max_bytes:
                self._rotate()
            self._file.write(record)
            self._file.flush()
            self._size += len(record)

    def _rotate(self) -> None:
        self._file.close()
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            Path(f"{self.path}.{self.backups}").unlink(missing_ok=True)
            for i in range(self.backups - 1, 0, -1):
                older = Path(f"{self.path}.{i}")
                if older.exists():
                    os.replace(older, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        self._file = open(self.path, "ab")  # noqa: SIM115 - held open until the next rotation
        self._size = 0

    def close(self) -> None:
        with self._lock:
            self._file.close()


class PredictionLogger:
    """Append-only, sampled, size-capped JSON-lines log of predictions. Thread-safe."""

    def __init__(self, path: str | os.PathLike, sample_rate: float = 1.0, max_bytes: int = 64 << 20,
                 backups: int = 5):
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be within [0, 1], got {sample_rate}")
        self.file = RotatingFile(path, max_bytes, backups)
        self.path = self.file.path
        self.sample_rate = sample_rate
        self._threshold = int(sample_rate * 2**32)
        self._encoder = msgspec.json.Encoder(enc_hook=_encode_extra)

    def sampled(self, request_id: str) -> bool:
        return zlib.crc32(request_id.encode()) < self._threshold

    def log(self, request_id: str, model: str, version: str, latency_s: float, inputs: Any, outputs: Any,
            **extra: Any) -> bool:
        """Append one record if the request is sampled; returns whether it was logged."""
        if not self.sampled(request_id):
            return False
        self.append(request_id, model, version, latency_s, inputs, outputs, **extra)
        return True

    def append(self, request_id: str, model: str, version: str, latency_s: float, inputs: Any, outputs: Any,
               **extra: Any) -> None:
        """Append one record, for a caller that sampled the request itself."""
        record = {"ts": time.time(), "request_id": request_id, "model": model, "version": version,
                  "latency_s": latency_s, "inputs": inputs, "outputs": outputs, **extra}
        try:
            self.file.write(self._encoder.encode(record) + b"\n")
        except ValueError as exc:
            raise ValueError(f"prediction log: {exc}") from None

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
