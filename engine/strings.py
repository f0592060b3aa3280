"""BYTES tensors through the batcher: each element held as an INT64 handle.

The C++ batcher keeps fixed-size rows. A BYTES element (a string of any length) is put in
this process-wide store when its request is submitted, and the batcher carries its handle;
the Python backend turns handles back into bytes for `predict` and puts what `predict`
returns here, writing those handles into the output rows; the response encoder reads them.
The runner releases a request's handles, inputs and outputs, once the batcher has answered
it (whatever the outcome), so nothing outlives its request.

Handle 0 is the empty string: the zeros of a warm-up batch, or an output row never written.
Dict operations hold the GIL, so the loop and executor threads may use the store at once.
"""
from __future__ import annotations

import itertools
import struct
from typing import Any, Iterable

import numpy as np

_LENGTH = struct.Struct("<I")


class StringStore:
    def __init__(self) -> None:
        self._values: dict[int, bytes] = {0: b""}
        self._next = itertools.count(1)

    def __len__(self) -> int:
        return len(self._values) - 1

    def put(self, values: Iterable[bytes]) -> np.ndarray:
        """Handles (int64) of `values`, in order."""
        handles = []
        for value in values:
            handle = next(self._next)
            self._values[handle] = value
            handles.append(handle)
        return np.array(handles, np.int64)

    def get(self, handles: np.ndarray) -> np.ndarray:
        """An object array of the bytes the handles stand for, shaped as `handles`."""
        values = self._values
        flat = np.empty(handles.size, object)
        for k, handle in enumerate(handles.ravel().tolist()):  # element-wise: numpy would strip trailing NULs
            flat[k] = values.get(handle, b"")
        return flat.reshape(handles.shape)

    def release(self, handles: Any) -> None:
        values = self._values
        for handle in np.asarray(handles, np.int64).ravel().tolist():
            if handle:
                values.pop(handle, None)


STRINGS = StringStore()


def length_prefixed(values: Iterable[bytes]) -> bytes:
    """Triton's binary BYTES encoding: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(_LENGTH.pack(len(v)) + v for v in values)


def split_length_prefixed(data: bytes | memoryview, count: int) -> list[bytes]:
    """The `count` elements of Triton's binary BYTES encoding, which must fill `data` exactly;
    raises ValueError saying what is wrong."""
    view = memoryview(data)
    out, offset = [], 0
    for k in range(count):
        if offset + 4 > len(view):
            raise ValueError(f"element {k} of {count}: its 4-byte length is cut off at byte {offset}")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise ValueError(f"element {k} of {count}: declares {length} bytes, {len(view) - offset} remain")
        out.append(bytes(view[offset:offset + length]))
        offset += length
    if offset != len(view):
        raise ValueError(f"{len(view) - offset} bytes follow the {count} elements the shape holds")
    return out
