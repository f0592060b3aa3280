"""Fused Triton MLP kernels for the GPU: fp16, int8 W8A8 and fp8 e4m3 (see `mlp`).

Triton is optional: `available()` says whether it can be imported. On a machine without a
GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before this
package is imported), which is how the tests check them on the CPU.
"""
from __future__ import annotations

import importlib.util


def available() -> bool:
    """True when the triton package is installed."""
    return importlib.util.find_spec("triton") is not None
