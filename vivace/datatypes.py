"""The KServe v2 tensor datatypes: the one table every other datatype fact derives from.

Ground floor: this module imports nothing of Vivace (numpy only lazily, for `numpy_dtype`).
The package manifest (vivace.spec), the OIP codecs (engine/oip.py), the OpenAPI document,
the backends, Triton's model configuration and the C++ batcher all look datatypes up here.
The C++ side reads the generated header csrc/common/datatypes.h; regenerate it with

    python -m vivace.datatypes --header > csrc/common/datatypes.h

(tests/test_datatypes.py fails while the checked-in header differs from this table).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Datatype:
    """One KServe v2 datatype and what each part of Vivace needs to know about it."""

    name: str                  # the KServe v2 / OIP name
    kind: str                  # "bool", "uint", "int", "float" or "bytes"
    itemsize: int              # bytes per element; 0 for BYTES (variable-length)
    numpy: str | None          # numpy dtype name (BF16: from ml_dtypes); None for BYTES
    struct_format: str | None  # memoryview.cast / struct code; None where Python has none
    triton: str                # Triton's model-configuration name
    batchable: bool            # the batcher holds it as fixed-size rows (and packages may use it)
    float_max: float | None = None  # largest finite value of a float narrower than a JSON double
    cpp: str = ""              # enumerator in the generated C++ header
    onnx: str = ""             # ONNX tensor type as onnxruntime names it, e.g. "tensor(float)"

    @property
    def int_range(self) -> tuple[int, int] | None:
        """Inclusive (min, max) of an integer type."""
        bits = 8 * self.itemsize
        if self.kind == "uint":
            return 0, 2**bits - 1
        if self.kind == "int":
            return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return None


def _dt(name: str, kind: str, itemsize: int, numpy: str | None, fmt: str | None, cpp: str,
        float_max: float | None = None, triton: str | None = None, batchable: bool = True,
        onnx: str | None = None) -> Datatype:
    return Datatype(name, kind, itemsize, numpy, fmt, triton or f"TYPE_{name}", batchable, float_max, cpp,
                    f"tensor({onnx or numpy})")


TABLE: tuple[Datatype, ...] = (
    _dt("BOOL", "bool", 1, "bool", "?", "kBool"),
    _dt("UINT8", "uint", 1, "uint8", "B", "kUint8"),
    _dt("UINT16", "uint", 2, "uint16", "H", "kUint16"),
    _dt("UINT32", "uint", 4, "uint32", "I", "kUint32"),
    _dt("UINT64", "uint", 8, "uint64", "Q", "kUint64"),
    _dt("INT8", "int", 1, "int8", "b", "kInt8"),
    _dt("INT16", "int", 2, "int16", "h", "kInt16"),
    _dt("INT32", "int", 4, "int32", "i", "kInt32"),
    _dt("INT64", "int", 8, "int64", "q", "kInt64"),
    # memoryview.cast has no half-precision code ("e" is struct-only), hence no format.
    _dt("FP16", "float", 2, "float16", None, "kFp16", float_max=65504.0),
    _dt("BF16", "float", 2, "bfloat16", None, "kBf16", float_max=3.3895313892515355e38),
    _dt("FP32", "float", 4, "float32", "f", "kFp32", float_max=3.4028234663852886e38, onnx="float"),
    _dt("FP64", "float", 8, "float64", "d", "kFp64", onnx="double"),
    # Variable-length strings: Triton calls them TYPE_STRING. Not batchable: the batcher
    # holds them as handles (PACKAGE_DATATYPES, batch_datatype).
    _dt("BYTES", "bytes", 0, None, None, "kBytes", triton="TYPE_STRING", batchable=False, onnx="string"),
)

BY_NAME: dict[str, Datatype] = {d.name: d for d in TABLE}
_BY_ONNX: dict[str, str] = {d.onnx: d.name for d in TABLE}
_BY_NUMPY: dict[str, str] = {d.numpy: d.name for d in TABLE if d.numpy}
# The datatypes a package signature (and so the batcher) may use, in table order.
TENSOR_DATATYPES: tuple[str, ...] = tuple(d.name for d in TABLE if d.batchable)
# A package may also declare BYTES tensors (Python models only): the batcher holds each
# element as an INT64 handle to its bytes (engine/strings.py), so rows keep a fixed size.
PACKAGE_DATATYPES: tuple[str, ...] = (*TENSOR_DATATYPES, "BYTES")
HANDLE_DATATYPE = "INT64"


def batch_datatype(name: str) -> str:
    """The datatype the batcher holds a tensor's elements as: BYTES as INT64 handles."""
    return HANDLE_DATATYPE if name == "BYTES" else name


class DatatypeError(ValueError):
    """An unknown datatype, or one this part of Vivace cannot handle."""


def get(name: str) -> Datatype:
    try:
        return BY_NAME[name]
    except (KeyError, TypeError):
        raise DatatypeError(f"unknown datatype {name!r} (expected one of {', '.join(BY_NAME)})") from None


def itemsize(name: str) -> int:
    return get(name).itemsize


def triton_name(name: str) -> str:
    return get(name).triton


def from_numpy(dtype_name: str) -> str | None:
    """The datatype of a numpy dtype name ("float32"), or None when it has none."""
    return _BY_NUMPY.get(dtype_name)


def from_onnx(onnx_type: str) -> str | None:
    """The datatype of an ONNX tensor type as onnxruntime names it ("tensor(float)"), or None."""
    return _BY_ONNX.get(onnx_type)


def numpy_dtype(name: str) -> Any:
    """The numpy dtype for a datatype; BF16 needs the ml_dtypes package."""
    import numpy as np

    d = get(name)
    if d.numpy is None:
        raise DatatypeError(f"datatype {name} has no numpy dtype")
    if d.name == "BF16":
        try:
            import ml_dtypes
        except ImportError:
            raise DatatypeError("datatype BF16 needs the ml_dtypes package for numpy arrays") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(d.numpy)


def numpy_native(name: str) -> bool:
    """Whether numpy holds the datatype without an extension package (BF16 does not)."""
    d = BY_NAME.get(name)
    return d is not None and d.numpy is not None and d.name != "BF16"


def header() -> str:
    """The C++ header csrc/common/datatypes.h, generated from TABLE."""
    rows = "\n".join(
        f'    {{"{d.name}", DType::{d.cpp}, {d.itemsize}, {"true" if d.batchable else "false"}}},' for d in TABLE
    )
    enum = "\n".join(f"  {d.cpp}," for d in TABLE)
    return f"""\
// Generated by `python -m vivace.datatypes --header` from vivace/datatypes.py: do not edit.
// The KServe v2 datatypes as the native core sees them; tests/test_datatypes.py checks
// this file against the Python table.
#pragma once

#include <cstring>

namespace vivace {{

enum class DType {{
{enum}
}};

struct DTypeInfo {{
  const char* name;  // KServe v2 name
  DType type;
  int size;          // bytes per element; 0 for variable-length BYTES
  bool batchable;    // held by the batcher as fixed-size rows
}};

inline constexpr DTypeInfo kDTypes[] = {{
{rows}
}};

// The entry named `name`, or nullptr.
inline const DTypeInfo* FindDType(const char* name) {{
  for (const auto& d : kDTypes)
    if (std::strcmp(d.name, name) == 0) return &d;
  return nullptr;
}}

}}  // namespace vivace
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["--header"]:
        print("usage: python -m vivace.datatypes --header  (prints csrc/common/datatypes.h)", file=sys.stderr)
        return 2
    sys.stdout.write(header())
    return 0


if __name__ == "__main__":
    sys.exit(main())
