"""Native MLP backend: torch MLPs converted to prepacked fp32/int8 kernels (vivace._core).

- `convert`  turns a torch model (nn.Sequential or a TorchScript of one) into a
  `native_mlp` model package, checking its accuracy against fp32 torch (needs torch).
- `backend`  loads and runs such a package with no torch import (`NativeMLPBackend`).
- `cli`      the `vivace quantize` command.
"""
from .backend import NATIVE_PLATFORM, NativeMLPBackend
from .spec import MLPSpec, SpecError

__all__ = ["NATIVE_PLATFORM", "MLPSpec", "NativeMLPBackend", "SpecError"]
